"""SPIN training step: pairs/s and peak memory of train.py's step against the same step
written the way TRL's DPOTrainer does it with `transformers` models, and against the same step
training LoRA adapters on a frozen base (lora.py), in one run.

Claims: (issue 8) on CPU with the tiny model, ours >= 2x pairs/s and <= 0.6x peak memory of
trl-style; (issue 19) at the SmolLM2-135M shape, LoRA >= 1.4x pairs/s and <= 0.5x peak memory
(resident + step) of full-parameter ours.

    ours      our Mistral; real and generated rows in one left-padded (2B, T) forward; per-token
              log-probs through the fused LM-head path (spin_kernels/logprob.py, no (N, V) logits);
              spin_loss against opponent log-probs precomputed at generation time, so no
              reference model is resident. Exactly stage.py's train_stage step for one
              micro-batch, minus FSDP (one process here) and the metric bookkeeping.
    lora      ours with LoRA adapters (lora.add_adapters, --lora-* flags) on the same loaded model:
              the base frozen, RMSprop and clipping over the adapters only.
    baseline  transformers MistralForCausalLM policy plus a second, resident MistralForCausalLM
              reference (TRL DPOTrainer without precompute_ref_log_probs): policy forward on
              the concatenated chosen+rejected rows, full logits -> log_softmax -> gather;
              then the reference forward under no_grad, every step, while the policy graph
              is alive (TRL's get_batch_loss_metrics order); the sigmoid loss written inline.
Both: same weights (an HF random init saved to a folder; ours loads it with
hf_folder.load_model), same batch, RMSprop(alpha 0.99, eps 1e-8), clipping at 1.0, fp32.
The reference/opponent is a second random init, so the first-step loss is not trivially
log 2 and its agreement checks both log-prob paths. The batch is built once (collate_pairs)
and reused; collation is not timed on either side.

    python bench/train.py                    # CPU figures -> bench/RESULTS_train_cpu.md
    python bench/train.py --threads 1 --steps 7
    python bench/train.py --shape smollm2 --arms ours,lora --batch 4 --threads 1   # issue 19

Peak memory = the highest live-bytes level during one whole step (forward, backward, clip,
optimiser step, zero_grad) above the level before it, measured after warm-up so the RMSprop
state already exists. So it counts activations, logits, gradients, autograd and optimiser
temporaries, and the reference forward; it does not count what is resident before the step
(policy weights, RMSprop state, and for the baseline the reference weights), which is
printed beside it. On CPU the figure replays torch.profiler allocator events
(bench/logprob.py's peak_extra_bytes); on CUDA it is max_memory_allocated.

GPU (prepared, not run; no figures are claimed). One GPU, the tiny model in bf16:
    python bench/train.py --device cuda --dtype bf16 --batch 8 --steps 20
(--dtype bf16 puts the parameters of both sides in bf16, unlike train.py's fp32 master copy; the
first-step loss then agrees only to bf16 precision.)
Mistral-7B SPIN on 8 GPUs, the run that would measure it (metrics.jsonl logs tokens_per_s
and peak_mem_mb per step):
    torchrun --nproc_per_node=8 train.py --model zephyr-7b-sft-full --data train.parquet \\
        --eval-data test.parquet --micro-batch-size 8 --activation-checkpointing
PREDICTED, not measured: memory per GPU comes from bench/memory.py (a model checked against CPU
peaks); throughput is arithmetic with assumed MFU (docs/GPU_ESTIMATE.md). Per A100 80GB at
8 pairs x 1024 tokens per GPU, activation checkpointing on both sides:
    memory     ours 18.1 GB vs the official ZeRO-3 recipe 30.2 GB (`python bench/memory.py`)
    FLOPs      ours 8N + attention = 58.2 GFLOP/token vs official 10N + attention = 72.4
    tokens/s   ours ~1,600-2,700 (MFU 30-50%, assumed) vs official ~1,100-1,700 (MFU 25-40%,
               assumed); 1.24x at equal MFU
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import types

import torch
import torch.nn.functional as F
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.logprob import peak_extra_bytes  # noqa: E402
from data.pairs import Pair, collate_pairs  # noqa: E402
import lora  # noqa: E402
import spin_kernels  # noqa: E402
from hf_folder import load_model  # noqa: E402
from spin_loss import sequence_logps, spin_loss  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# --shape presets; flags given explicitly win over them.
SHAPES = {"tiny": dict(layers=4, hidden=256, heads=8, kv_heads=4, head_dim=32, intermediate=688, vocab=32000,
                       tied=False),
          "smollm2": dict(layers=30, hidden=576, heads=9, kv_heads=3, head_dim=64, intermediate=1536, vocab=49152,
                          tied=True)}  # SmolLM2-135M-Instruct's config


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arms", default="ours,trl-style", help="comma list of ours, lora, trl-style")
    # model (default: the tiny CPU model of the issue)
    p.add_argument("--shape", choices=SHAPES, default="tiny", help="a preset for the flags below")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--intermediate", type=int, default=None)
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--tied", type=int, choices=[0, 1], default=None, help="tie the LM head to the embedding")
    # the lora arm (lora.py); alpha defaults to 2 * rank, as in train.py
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=None, help="default 2 * rank")
    p.add_argument("--lora-targets", default="q,k,v,o,gate,up,down")
    # batch: random token ids; each pair = prompt + real response and prompt + generated response
    p.add_argument("--batch", type=int, default=8, help="pairs per step (the forward sees 2x rows)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--response-len", type=int, default=64)
    p.add_argument("--ragged", action="store_true",
                   help="prompt and response lengths uniform in [len/2, len], so rows are padded")
    # SPIN step
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=5e-7, help="the official recipe's lr")
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--checkpointing", action="store_true",
                   help="activation checkpointing per block on every arm (train.py --activation-checkpointing)")
    # measurement
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side after the first")
    p.add_argument("--steps", type=int, default=5, help="timed steps per side, interleaved")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="parameter and compute dtype, both sides")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write settings and results to this JSON file")
    args = p.parse_args()
    for k, v in SHAPES[args.shape].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.tied = bool(args.tied)
    args.lora_alpha = args.lora_alpha or 2.0 * args.lora_rank
    args.arms = args.arms.split(",")
    if not set(args.arms) <= {"ours", "lora", "trl-style"} or not args.arms:
        p.error(f"--arms {','.join(args.arms)}: choose from ours, lora, trl-style")
    return args


# ----------------------------------------------------------------------------------------------
# Weights: two HF random inits (policy, opponent) saved as folders that both sides load.

def hf_config(args):
    from transformers import MistralConfig
    return MistralConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
                         max_position_embeddings=4096, sliding_window=None, tie_word_embeddings=args.tied,
                         attention_dropout=0.0)


def save_random_init(args, folder, seed):
    from transformers import MistralForCausalLM
    torch.manual_seed(seed)
    MistralForCausalLM(hf_config(args)).save_pretrained(folder)


def make_batch(args, gen):
    """Random token ids -> Pair items -> collate_pairs (left padding, targets shifted by one)."""
    def length(n):
        return int(torch.randint(n // 2, n + 1, (), generator=gen)) if args.ragged else n

    ids = lambda n: torch.randint(3, args.vocab, (n,), generator=gen).tolist()  # skip 0-2 (unk/bos/eos)
    items = [Pair(prompt_ids=ids(length(args.prompt_len)), real_ids=ids(length(args.response_len)),
                  generated_ids=ids(length(args.response_len))) for _ in range(args.batch)]
    return collate_pairs(items, pad_id=2)


# ----------------------------------------------------------------------------------------------
# The steps. Each returns (loss, pre-clip grad norm, sequence log-probs (2B,)) as floats.

def make_ours(folder, opponent_folder, batch, args, device, dtype, lora_settings=None):
    model = spin_kernels.install(load_model(folder, dtype=dtype, device=device)).train()
    if lora_settings is not None:  # the lora arm: adapters in place, the rest frozen, B = 0
        lora.add_adapters(model, lora_settings, torch.Generator().manual_seed(args.seed))
    if args.checkpointing:  # as stage.build_model wraps them
        for i, block in enumerate(model.model.layers):
            model.model.layers[i] = checkpoint_wrapper(block)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.RMSprop(params, lr=args.lr, alpha=0.99, eps=1e-8)  # train.py's optimiser
    ids, mask, tgt = (batch[k].to(device) for k in ("input_ids", "attention_mask", "targets"))
    n = args.batch
    # Generation time (generate.py's scoring prefill): the opponent p_t scores both responses
    # once; only these 2B numbers, not the model, stay around for training.
    opponent = spin_kernels.install(load_model(opponent_folder, dtype=dtype, device=device))
    with torch.no_grad():
        ref = sequence_logps(opponent(ids, attention_mask=mask, targets=tgt), tgt != -100)
    ref_real, ref_gen = ref[:n].clone(), ref[n:].clone()
    del opponent

    def step():  # stage.py's train_stage, one micro-batch == the whole local batch
        lp = model(ids, attention_mask=mask, targets=tgt)  # (2B, T) fused per-token log-probs
        seq = sequence_logps(lp, tgt != -100)  # (2B,)
        loss, _ = spin_loss(seq[:n], seq[n:], ref_real, ref_gen, beta=args.beta)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, args.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item(), gnorm.item(), seq.detach().double()

    return step, model, opt, []


def make_trl(folder, ref_folder, batch, args, device, dtype):
    from transformers import MistralForCausalLM
    load = lambda f: MistralForCausalLM.from_pretrained(f, dtype=dtype, attn_implementation="sdpa").to(device)
    policy = load(folder).train()
    if args.checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    reference = load(ref_folder).eval().requires_grad_(False)  # resident for the whole run
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.RMSprop(params, lr=args.lr, alpha=0.99, eps=1e-8)
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    # HF labels: the input ids, -100 off the response (our targets shifted right by one).
    labels = torch.full_like(ids, -100)
    labels[:, 1:] = batch["targets"][:, :-1].to(device)
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)  # what HF derives for left padding
    n = args.batch

    def logps(logits):  # (2B, T, V) -> (2B,): full log_softmax, gather, mask, sum (TRL)
        target = labels[:, 1:]
        valid = target != -100
        lp = logits[:, :-1].float().log_softmax(-1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
        return torch.where(valid, lp, 0.0).sum(-1)

    def step():
        seq = logps(policy(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits)
        with torch.no_grad():
            ref = logps(reference(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits)
        u = args.beta * ((seq[:n] - ref[:n]) - (seq[n:] - ref[n:]))
        loss = -F.logsigmoid(u).mean()  # DPO / SPIN sigmoid loss, inline as the brief asks
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, args.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item(), gnorm.item(), seq.detach().double()

    return step, policy, opt, [reference]


# ----------------------------------------------------------------------------------------------
# Measurement

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def resident_bytes(model, opt, extra_models):
    """Bytes alive before a step: weights, optimiser state, any other resident model."""
    tensors = list(model.parameters()) + [t for s in opt.state.values() for t in s.values()
                                          if torch.is_tensor(t)]
    tensors += [p for m in extra_models for p in m.parameters()]
    return sum(t.numel() * t.element_size() for t in tensors)


def peak_step_bytes(step, device):
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        sync(device)
        return torch.cuda.max_memory_allocated() - before
    # bench/logprob.py's harness calls fn(hidden, weight, targets), clearing hidden.grad and
    # weight.grad first, and then backpropagates (fn(...) * grad).sum(); a whole training step
    # does its own backward, so it gets placeholder slots and returns a 0-d leaf.
    slot, leaf = types.SimpleNamespace(grad=None), torch.zeros((), requires_grad=True)

    def fn(*_):
        step()
        return leaf

    return peak_extra_bytes(fn, (slot, slot, None, torch.zeros(())), device)


def ratio_of(res, a, b):
    """Arm a against arm b: pairs/s, peak step memory, and resident + peak step memory."""
    o, r = res[a], res[b]
    return dict(pairs_per_s=o["pairs_per_s"] / r["pairs_per_s"], peak_step=o["peak_step_MiB"] / r["peak_step_MiB"],
                total=o["total_MiB"] / r["total_MiB"])


# The goals, each a ratio against a baseline measured in the same run: (arm, baseline, pairs/s at
# least, which memory figure, at most).
GOALS = (("ours", "trl-style", 2.0, "peak_step", 0.6), ("lora", "ours", 1.4, "total", 0.5))


def compare_arms(res):
    ratios = {}
    for a, b, speed, mem, most in GOALS:
        if a in res and b in res:
            q = ratios[f"{a}/{b}"] = ratio_of(res, a, b)
            print(f"{a} / {b}: pairs/s {q['pairs_per_s']:.2f}x (target >= {speed:g}x: "
                  f"{'met' if q['pairs_per_s'] >= speed else 'NOT met'}); {mem} memory {q[mem]:.2f}x (target <= "
                  f"{most:g}x: {'met' if q[mem] <= most else 'NOT met'}); peak step {q['peak_step']:.2f}x, "
                  f"resident + peak step {q['total']:.2f}x")
    return ratios


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    import transformers
    transformers.utils.logging.disable_progress_bar()
    settings = dict(vars(args), torch=torch.__version__, transformers=transformers.__version__,
                    threads=torch.get_num_threads(), load_average=os.getloadavg())
    print("settings:", json.dumps(settings))
    if device.type == "cuda":
        print("device:", torch.cuda.get_device_name())

    gen = torch.Generator().manual_seed(args.seed)
    batch = make_batch(args, gen)
    T, tokens = batch["input_ids"].shape[1], int(batch["attention_mask"].sum())
    print(f"batch: {args.batch} pairs -> ({2 * args.batch}, {T}) rows, {tokens} real tokens, "
          f"{int((batch['targets'] != -100).sum())} scored")

    with tempfile.TemporaryDirectory() as tmp:
        policy_dir, opponent_dir = os.path.join(tmp, "policy"), os.path.join(tmp, "opponent")
        save_random_init(args, policy_dir, args.seed)
        save_random_init(args, opponent_dir, args.seed + 1)
        settings_lora = lora.LoraSettings.from_flags(args.lora_rank, args.lora_alpha, args.lora_targets, 0.0)
        make = {"ours": lambda: make_ours(policy_dir, opponent_dir, batch, args, device, dtype),
                "lora": lambda: make_ours(policy_dir, opponent_dir, batch, args, device, dtype, settings_lora),
                "trl-style": lambda: make_trl(policy_dir, opponent_dir, batch, args, device, dtype)}
        sides = {name: make[name]() for name in args.arms}
    model = next(iter(sides.values()))[1]
    n_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    print(f"model: {n_params / 1e6:.2f}M parameters per copy, {args.dtype} on {device}"
          + (f"; lora arm trains {sum(p.numel() for p in sides['lora'][1].parameters() if p.requires_grad) / 1e6:.2f}M "
             f"(rank {args.lora_rank}, alpha {args.lora_alpha:g}, {args.lora_targets})" if "lora" in sides else ""))

    # First step from identical weights: every arm must compute the same loss (the lora arm exactly,
    # since B = 0 adds nothing; trl-style to float rounding).
    first = {name: s[0]() for name, s in sides.items()}
    ref_name = args.arms[0]
    l0, g0, s0 = first[ref_name]
    first_step = {}
    for name, (l1, g1, s1) in first.items():
        if name == ref_name:
            continue
        dloss, dseq = abs(l0 - l1), (s0 - s1).abs().max().item()
        tol = 0.0 if {name, ref_name} == {"ours", "lora"} else 1e-4
        first_step[name] = dict(loss=l1, loss_ref=l0, grad_norm=g1, grad_norm_ref=g0, seq_logp_max_abs_diff=dseq)
        print(f"first step: loss {ref_name} {l0:.6f}  {name} {l1:.6f}  |diff| {dloss:.2e} "
              f"({'within' if dloss <= tol else 'NOT within'} {tol:g}; log 2 = 0.693147)")
        print(f"            grad norm {ref_name} {g0:.6f}  {name} {g1:.6f}; "
              f"sequence log-probs max |diff| {dseq:.2e} (of ~{s1.abs().mean().item():.0f})")

    for _ in range(args.warmup):
        for s in sides.values():
            s[0]()

    resident = {name: resident_bytes(s[1], s[2], s[3]) for name, s in sides.items()}
    peak = {name: peak_step_bytes(s[0], device) for name, s in sides.items()}

    times = {name: [] for name in sides}
    for _ in range(args.steps):  # interleaved: load from other jobs falls on both sides alike
        for name, s in sides.items():
            sync(device)
            t0 = time.perf_counter()
            s[0]()
            sync(device)
            times[name].append(time.perf_counter() - t0)

    MiB = 2**20
    res = {}
    for name in sides:
        med = statistics.median(times[name])
        res[name] = dict(step_s_median=med, step_s_all=times[name], pairs_per_s=args.batch / med,
                         tokens_per_s=tokens / med, peak_step_MiB=peak[name] / MiB,
                         resident_MiB=resident[name] / MiB, total_MiB=(peak[name] + resident[name]) / MiB)
        r = res[name]
        print(f"{name:10s} step median {med * 1e3:8.1f} ms  [{', '.join(f'{t * 1e3:.0f}' for t in times[name])}]  "
              f"{r['pairs_per_s']:7.2f} pairs/s  {r['tokens_per_s']:8.0f} tok/s  "
              f"peak step {r['peak_step_MiB']:7.1f} MiB  "
              f"resident {r['resident_MiB']:6.1f} MiB  total {r['total_MiB']:7.1f} MiB")
    ratios = compare_arms(res)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"settings": settings, "first_step": first_step, "results": res, "ratios": ratios}, f, indent=2)


if __name__ == "__main__":
    main()
