"""SPIN: Self-Play Fine-Tuning (Chen, Deng, Yuan, Ji, Gu; ICML 2024; arXiv 2401.01335), end to end.

    for t in 0..K-1:
        1. generate   the frozen p_t samples y' for every training prompt x; one scoring pass
                      stores log p_t(y|x) and log p_t(y'|x) next to the samples (generate.py)
        2. train      p_theta <- p_t, minimise the SPIN loss (spin_loss.py) against the stored
                      opponent log-probs; FSDP2, RMSprop, linear warmup/decay
        3. export     iter{t}/model, a Hugging Face folder: the next p_t
        4. evaluate   held-out ground-truth log-likelihood, reward accuracy/margin, task metric
                      (evaluate.py), on the export

Launch:
    python train.py                                   # embedded demo, one process
    torchrun --nproc_per_node=2 train.py              # the same run over two processes
    torchrun --nproc_per_node=8 train.py --model zephyr-7b-sft-full --data train.parquet \
        --eval-data test.parquet                      # the paper's recipe (see README)

How this departs from the paper and the official code (uclaml/SPIN):
    1. The opponent's log-probs are computed once, at generation time, not by a second model
       resident during training (same numbers; --live-reference checks it).
    2. Generation prompts with the same Zephyr template training uses (the official generation
       script prompts with "### Instruction:" while training on Zephyr).
    3. Multi-turn prompts keep every turn before the last assistant message (data/).
    4. One command runs every iteration; each stage is skipped when its output exists, and a
       killed stage resumes from its last checkpoint.
"""
import argparse
import json
import math
import os
import resource
import shutil
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_state_dict, set_model_state_dict,
                                                     set_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import generate
import report
from evaluate import evaluate, rescore
from data import pairs, readers, task
from data.tokenizer import Tokenizer, train_tokenizer
from model import Mistral, ModelConfig, resolve_dtype, save_checkpoint
from spin_loss import beta_for_iteration, sequence_logps, spin_loss

# Two presets. Flags left unset take the preset's value: the paper's recipe when --model is
# given, the embedded CPU demo otherwise. The demo's values come from EXPERIMENTS.md's sweep.
RECIPE = dict(iterations=4, beta="0.1,0.1,0.1,5.0", lr="5e-7,5e-7,1e-7,1e-7", epochs=2.0,
              batch_size=64, micro_batch_size=1, optimizer="rmsprop", max_new_tokens=256,
              temperature=1.0, max_length=1024, max_prompt_length=512, mix_previous=True,
              eval_prompts=500, baseline=False, ckpt_every=200, gen_batch_size=32)
DEMO = dict(iterations=3, beta="2.0", lr="3e-5", epochs=3.0, batch_size=64, micro_batch_size=32,
            optimizer="rmsprop", max_new_tokens=32, temperature=1.0, max_length=128,
            max_prompt_length=64, mix_previous=True, eval_prompts=500, baseline=True,
            ckpt_every=20, gen_batch_size=256, num_prompts=2000, sft_steps=400, sft_lr=3e-3,
            demo_dim=96, demo_layers=3, vocab=384)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # run
    p.add_argument("--out", default=None, help="run folder (default runs/spin-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--seed", type=int, default=0)
    # model
    p.add_argument("--model", default=None, help="HF folder with tokenizer.model; none = embedded demo")
    p.add_argument("--dtype", default=None, help="parameter dtype for compute (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--kernels", default=None, choices=["auto", "torch", "triton"],
                   help="auto: Triton kernels on GPUs, torch paths on CPUs; torch: the torch paths "
                        "everywhere (sets SPIN_KERNELS; a run may be resumed with another value)")
    # data
    p.add_argument("--data", default=None, help="training prompts with ground truth (parquet/jsonl)")
    p.add_argument("--eval-data", default=None, help="held-out file (default: a split of --data, at most a tenth)")
    p.add_argument("--num-prompts", type=int, default=None, help="sample this many training prompts")
    p.add_argument("--eval-prompts", type=int, default=None)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--max-prompt-length", type=int, default=None)
    p.add_argument("--on-bad-row", choices=["raise", "skip"], default="raise")
    p.add_argument("--mix-previous", type=int, default=None, choices=[0, 1],
                   help="iteration t also trains on iteration t-1's synthetic data (official recipe)")
    # SPIN optimisation
    p.add_argument("--iterations", type=int, default=None)
    p.add_argument("--beta", default=None, help="one value or a comma list per iteration")
    p.add_argument("--lr", default=None, help="one value or a comma list per iteration")
    p.add_argument("--loss-type", default="sigmoid", choices=["sigmoid", "hinge"])
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="global batch, in pairs")
    p.add_argument("--micro-batch-size", type=int, default=None, help="pairs per rank per forward")
    p.add_argument("--optimizer", default=None, choices=["rmsprop", "adamw"])
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--live-reference", action="store_true", help="score with a resident opponent model too, as a check")
    # generation
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--gen-batch-size", type=int, default=None)
    # SFT: warm start of the demo, and the continued-SFT baseline
    p.add_argument("--sft", action="store_true", help="only run SFT on --data (cross-entropy on the ground truth)")
    p.add_argument("--sft-steps", type=int, default=None)
    p.add_argument("--sft-lr", type=float, default=None)
    p.add_argument("--sft-optimizer", default="adamw", choices=["rmsprop", "adamw"],
                   help="optimiser of the demo's warm start (--sft runs too); the baseline uses --optimizer")
    p.add_argument("--baseline", type=int, default=None, choices=[0, 1],
                   help="also run continued SFT with the same number of steps, as the baseline")
    # checkpoints
    p.add_argument("--ckpt-every", type=int, default=None, help="optimiser steps between checkpoints")
    # embedded demo
    p.add_argument("--demo-dim", type=int, default=None)
    p.add_argument("--demo-layers", type=int, default=None)
    p.add_argument("--vocab", type=int, default=None, help="demo tokenizer vocabulary size")
    # fault injection for the resume test: SIGKILL this process after STAGE:STEP
    p.add_argument("--kill-at", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.demo = args.model is None
    preset = DEMO if args.demo else RECIPE
    for k, v in preset.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    for k in ("mix_previous", "baseline"):
        setattr(args, k, bool(getattr(args, k)))
    if not args.demo and not args.data:
        p.error("--model needs --data (training prompts with ground truth)")
    if args.demo and (args.data or args.eval_data):
        p.error("--data needs --model: without --model train.py runs the embedded demo")
    if args.sft and (args.sft_steps is None or args.sft_lr is None):
        p.error("--sft needs --sft-steps and --sft-lr")
    if args.resume and args.out is None:
        p.error("--resume needs --out (the run folder to continue)")
    if args.out is None:
        args.out = os.path.join("runs", "spin-" + time.strftime("%Y%m%d-%H%M%S"))
    return args


# ----------------------------------------------------------------------------------------------
# Distributed set-up: python train.py is a world of one, on the same code path.

def setup_distributed():
    cuda = torch.cuda.is_available()
    if "WORLD_SIZE" not in os.environ:
        import socket
        with socket.socket() as s:  # a free port for the one-process group
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    # Metrics are reduced as small CPU tensors, so a GPU run needs gloo beside nccl.
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", device_id=device if cuda else None)
    if not cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    return rank, world, device


def inference_dtype(args, device):
    """The dtype of every frozen copy (generation, scoring, evaluation, the live reference), so
    stored and recomputed log-probs always come from the same precision."""
    if args.dtype:
        return resolve_dtype(args.dtype)
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def log(*a):
    if dist.get_rank() == 0:
        print(*a, flush=True)


def on_rank0(fn):
    """Run fn on rank 0 only. Every rank learns whether it failed, so none waits forever at the
    next collective (a full disk during an export, say)."""
    err, exc = [None], None
    if dist.get_rank() == 0:
        try:
            fn()
        except Exception as e:
            exc, err[0] = e, f"{type(e).__name__}: {e}"
    dist.broadcast_object_list(err, src=0)
    if exc is not None:
        raise exc
    if err[0]:
        raise RuntimeError(f"rank 0 failed: {err[0]}")


def per_iteration(values, t, name):
    vals = [float(x) for x in str(values).split(",")]
    return beta_for_iteration(vals, t) if name == "beta" else vals[min(t, len(vals) - 1)]


# ----------------------------------------------------------------------------------------------
# Model set-up, in a fixed order (as torchtitan): build on meta -> activation checkpointing ->
# fully_shard each block -> fully_shard the root -> allocate the shards -> load the weights.

def build_model(folder, args, device):
    config = ModelConfig.from_hf(folder)
    with torch.device("meta"):
        model = Mistral(config)
    if args.activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
        for i, block in enumerate(model.model.layers):
            model.model.layers[i] = checkpoint_wrapper(block)
    # Parameters stay fp32 (the optimiser's master copy); on GPUs compute runs in bf16 and
    # gradients are reduced in fp32.
    compute = resolve_dtype(args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    mp = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    for block in model.model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    model.to_empty(device=device)
    # Only rank 0 reads the files; the shards arrive by broadcast, so no rank holds two copies.
    full = {}
    if dist.get_rank() == 0:
        full = Mistral.from_pretrained(folder, dtype=torch.float32, device="cpu").state_dict()
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model, config


def export(model, config, folder, tokenizer_path, dtype_name):
    """Gather the full weights on rank 0 and write a HF folder (plus the tokenizer) atomically."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    on_rank0(lambda: save_checkpoint(
        {k.replace("._checkpoint_wrapped_module", ""): v.to(resolve_dtype(dtype_name)) for k, v in state.items()},
        config, folder, extra_files={"tokenizer.model": tokenizer_path}))


# ----------------------------------------------------------------------------------------------
# Checkpoints: torch.distributed.checkpoint into a temporary folder that rank 0 renames once
# every rank has written, so a folder named step-N is always complete.

def save_ckpt(stage_dir, step, model, opt, sched):
    ckpt = os.path.join(stage_dir, "ckpt")
    tmp, final = os.path.join(ckpt, f".tmp-step-{step}"), os.path.join(ckpt, f"step-{step}")
    model_sd, opt_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": opt_sd}, checkpoint_id=tmp)
    dist.barrier()
    if dist.get_rank() == 0:
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"step": step, "scheduler": sched.state_dict(),
                       "rng_cpu": torch.get_rng_state().tolist()}, f)
        os.replace(tmp, final)
        done = sorted(int(d[5:]) for d in os.listdir(ckpt) if d.startswith("step-"))
        for old in done[:-2]:  # keep the newest two
            shutil.rmtree(os.path.join(ckpt, f"step-{old}"), ignore_errors=True)
    dist.barrier()


def load_ckpt(stage_dir, model, opt, sched):
    ckpt = os.path.join(stage_dir, "ckpt")
    steps = sorted(int(d[5:]) for d in os.listdir(ckpt) if d.startswith("step-")) if os.path.isdir(ckpt) else []
    if not steps:
        return 0
    path = os.path.join(ckpt, f"step-{steps[-1]}")
    model_sd, opt_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": opt_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    sched.load_state_dict(meta["scheduler"])
    torch.set_rng_state(torch.tensor(meta["rng_cpu"], dtype=torch.uint8))
    log(f"  resumed from {path}")
    return meta["step"]


# ----------------------------------------------------------------------------------------------
# One training stage: SPIN (pairs) or SFT (ground truth only), from an HF folder to an HF folder.

def train_stage(kind, init_dir, items, steps, lr, beta, stage_dir, tok, args, device, metrics, tag, optimizer):
    """items: tokenised pairs (SPIN) or sequences (SFT). The global batch at step s is a fixed
    function of (seed, s), so 1 and N processes see the same data and give the same losses."""
    rank, world = dist.get_rank(), dist.get_world_size()
    G, mb = args.batch_size, args.micro_batch_size
    if G % world or (G // world) % min(mb, G // world):
        raise ValueError(f"--batch-size {G} must split evenly over {world} ranks x micro-batches of {mb}")
    local = G // world
    mb = min(mb, local)
    model, config = build_model(init_dir, args, device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "rmsprop":  # the paper's choice; no weight decay
        opt = torch.optim.RMSprop(params, lr=lr, alpha=0.99, eps=1e-8)
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, int(args.warmup_ratio * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm)))
    start = load_ckpt(stage_dir, model, opt, sched)
    live = None
    if args.live_reference and kind == "spin":
        live = Mistral.from_pretrained(init_dir, device=device, dtype=inference_dtype(args, device))
    per_epoch = len(items) // G
    if per_epoch == 0:
        raise ValueError(f"{tag}: {len(items)} examples is fewer than one global batch of {G}")
    for step in range(start, steps):
        t0 = time.time()
        epoch, pos = divmod(step, per_epoch)
        g = torch.Generator().manual_seed(args.seed * 1000003 + epoch)
        order = torch.randperm(len(items), generator=g)[pos * G:(pos + 1) * G].tolist()
        batch_items = [items[i] for i in order]
        mine = batch_items[rank * local:(rank + 1) * local]
        sums, ntok = torch.zeros(7, dtype=torch.float64), 0
        live_diff = torch.zeros(1, dtype=torch.float64)
        # SFT normalises by the response tokens of the whole global batch, known to every rank.
        gt_tokens = sum(len(it.real_ids) for it in batch_items) if kind == "sft" else 0
        for m0 in range(0, local, mb):
            micro = mine[m0:m0 + mb]
            last = m0 + mb >= local
            model.set_requires_gradient_sync(last)
            if kind == "spin":
                b = pairs.collate_pairs(micro, pad_id=tok.eos_id)
                ids, mask, tgt = (b[k].to(device) for k in ("input_ids", "attention_mask", "targets"))
                lp = model(ids, attention_mask=mask, targets=tgt)  # (2B, T)
                seq = sequence_logps(lp, tgt != -100)  # (2B,)
                n = len(micro)
                ref_real, ref_gen = b["ref_real_logps"].to(device), b["ref_generated_logps"].to(device)
                if live is not None:
                    with torch.no_grad():
                        ref = sequence_logps(live(ids, attention_mask=mask, targets=tgt), tgt != -100)
                    diff = torch.cat([ref[:n] - ref_real, ref[n:] - ref_gen]).abs().max().item()
                    live_diff[0] = max(live_diff[0].item(), diff)
                    ref_real, ref_gen = ref[:n], ref[n:]
                loss, met = spin_loss(seq[:n], seq[n:], ref_real, ref_gen, beta=beta, loss_type=args.loss_type)
                # spin_loss averages over this micro-batch; FSDP averages over ranks.
                (loss * n / local).backward()
                sums[:6] += torch.tensor([loss.item() * n, met["rewards/real"] * n, met["rewards/generated"] * n,
                                          met["rewards/accuracies"] * n, met["logps/real"] * n,
                                          met["logps/generated"] * n], dtype=torch.float64)
                sums[6] += n
            else:
                b = pairs.collate_sft(micro, pad_id=tok.eos_id)
                ids, mask, tgt = (b[k].to(device) for k in ("input_ids", "attention_mask", "targets"))
                lp = model(ids, attention_mask=mask, targets=tgt)
                nll = -lp.sum()
                (nll * world / gt_tokens).backward()
                sums[0] += nll.item()
                sums[6] += (tgt != -100).sum().item()
            ntok += int(mask.sum())
        gnorm = clip_grad_norm(params, args.clip)
        dist.all_reduce(sums)
        dist.all_reduce(live_diff, op=dist.ReduceOp.MAX)
        loss_value = (sums[0] / sums[6]).item()
        if not math.isfinite(loss_value) or not math.isfinite(gnorm.item()):
            raise FloatingPointError(f"{tag} step {step}: loss {loss_value}, grad norm {gnorm.item()}; "
                                     f"stopping. The last good checkpoint in {stage_dir}/ckpt is intact.")
        lr_used = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        dt = time.time() - t0
        rec = {"type": "step", "stage": tag, "step": step + 1, "steps": steps, "loss": loss_value,
               "lr": lr_used, "grad_norm": gnorm.item(), "tokens_per_s": ntok * world / dt,
               "peak_mem_mb": peak_memory_mb(device)}
        if kind == "spin":
            n = sums[6]
            rec.update({"rewards/real": (sums[1] / n).item(), "rewards/generated": (sums[2] / n).item(),
                        "rewards/margins": ((sums[1] - sums[2]) / n).item(),
                        "rewards/accuracies": (sums[3] / n).item(), "logps/real": (sums[4] / n).item(),
                        "logps/generated": (sums[5] / n).item(), "beta": beta})
            if live is not None:
                rec["live_reference_max_abs_diff"] = live_diff.item()
        metrics(rec)
        if (step + 1) % args.ckpt_every == 0 and step + 1 < steps:
            save_ckpt(stage_dir, step + 1, model, opt, sched)
        if args.kill_at == f"{tag}:{step + 1}":
            os.kill(os.getpid(), 9)
    return model, config


def clip_grad_norm(params, max_norm):
    """Scale the gradients so their global L2 norm is at most max_norm; returns the norm before.
    Why not torch.nn.utils.clip_grad_norm_: its norm of sharded gradients sums in an order that
    depends on the number of ranks, and one ulp of difference in the scale factor, amplified by
    hundreds of steps, made 1 and 2 processes end in different models. Squares summed in float64
    and rounded once to float32 give the same factor for any sharding."""
    grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in params if p.grad is not None]
    sq = torch.zeros(1, dtype=torch.float64, device=grads[0].device if grads else "cpu")
    for g in grads:
        sq += g.double().pow(2).sum()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sq)
    norm = sq.sqrt().float()  # (1,)
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.to(g.dtype))
    return norm[0]


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ----------------------------------------------------------------------------------------------
# Generation, sharded over ranks, on a plain (unsharded) copy of a HF folder.

def run_generation(model_dir, examples, out_path, tok, args, device, iteration, seed):
    if os.path.exists(out_path):
        return
    model = Mistral.from_pretrained(model_dir, device=device, dtype=inference_dtype(args, device))
    generate.generate_dataset(model, tok, examples, out_path, iteration=iteration, seed=seed,
                              rank=dist.get_rank(), world_size=dist.get_world_size(),
                              max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_p=args.top_p, top_k=args.top_k, batch_size=args.gen_batch_size,
                              max_prompt_length=args.max_prompt_length, max_length=args.max_length,
                              model_id=model_dir)
    del model
    dist.barrier()


# ----------------------------------------------------------------------------------------------
# The embedded demo: task data, a tokenizer trained on it, a randomly initialised tiny Mistral.

def prepare_demo(out, args):
    data_dir, tok_dir, init_dir = (os.path.join(out, d) for d in ("data", "tokenizer", "init"))

    def build():  # on rank 0; skipped when a previous attempt finished it
        if os.path.exists(init_dir):
            return
        train_path, held_path = task.write_task(data_dir, seed=args.seed, n_train=args.num_prompts,
                                                n_heldout=args.eval_prompts)
        examples, _ = readers.read_examples(train_path)
        from data.template import render_prompt
        texts = [render_prompt(ex.prompt) + ex.response for ex in examples]
        tok_path = train_tokenizer(texts, tok_dir, vocab_size=args.vocab)
        tok = Tokenizer(tok_path)
        d, L = args.demo_dim, args.demo_layers
        config = ModelConfig(vocab_size=tok.vocab_size, hidden_size=d, intermediate_size=int(8 * d / 3) // 8 * 8,
                             num_hidden_layers=L, num_attention_heads=max(1, d // 32),
                             num_key_value_heads=max(1, d // 64), head_dim=32,
                             max_position_embeddings=args.max_length, bos_token_id=tok.bos_id,
                             eos_token_id=tok.eos_id)
        torch.manual_seed(args.seed)
        model = Mistral(config)
        with torch.no_grad():  # GPT-2 style init; residual projections scaled by depth
            for name, p in model.named_parameters():
                if p.dim() == 2:
                    std = 0.02 / math.sqrt(2 * L) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                    p.normal_(0.0, std)
        save_checkpoint(model.state_dict(), config, init_dir, extra_files={"tokenizer.model": tok_path})

    on_rank0(build)
    return (os.path.join(data_dir, "train.jsonl"), os.path.join(data_dir, "heldout.jsonl"),
            os.path.join(init_dir))


def load_data(args, tok, train_path, eval_path):
    """(train examples, held-out examples), read, validated, sampled and split by seed."""
    train, rep = readers.read_examples(train_path, on_error=args.on_bad_row)
    log(f"data: {rep.summary()}")
    train = readers.sample_examples(train, args.num_prompts, args.seed)
    if eval_path:
        held, rep = readers.read_examples(eval_path, on_error=args.on_bad_row)
        log(f"eval data: {rep.summary()}")
        held = readers.sample_examples(held, args.eval_prompts, args.seed + 1)
        log(f"using {len(train)} training prompts (--num-prompts {args.num_prompts}) and {len(held)} held-out "
            f"prompts from {eval_path} (--eval-prompts {args.eval_prompts})")
    else:
        # Without --eval-data the held-out prompts come out of the training sample, at most a tenth.
        n_held = min(args.eval_prompts, len(train) // 10)
        train, held = readers.split_heldout(train, n_held, args.seed + 1)
        log(f"using {len(train)} training prompts and {len(held)} held-out prompts split from them "
            f"(--eval-prompts {args.eval_prompts}, capped at a tenth of the {len(train) + len(held)} prompts "
            f"sampled; pass --eval-data for a separate held-out file)")
    # SPIN-layout files carry an old `generated` column: it is regenerated by p_t, never reused.
    strip = lambda exs: [readers.Example(e.prompt, e.response) for e in exs]
    return strip(train), strip(held)


# ----------------------------------------------------------------------------------------------
# The driver

def prepare_out_dir(args, world):
    """Write config.json (the resolved settings) into the run folder; returns an error message
    when the folder holds another run, or when --resume would change its settings."""
    out = args.out
    settings = {k: v for k, v in vars(args).items() if k not in ("resume", "kill_at")}
    saved = os.path.join(out, "config.json")
    if args.resume and not os.path.exists(saved):
        return f"--resume: {saved} does not exist, so there is no run to continue"
    if os.path.exists(saved):
        if not args.resume:
            return f"{out} already holds a run; pass --resume to continue it, or another --out"
        with open(saved) as f:
            old = json.load(f)
        # The world size may change on resume: the data order does not depend on it. So may the
        # kernels: a run whose Triton kernel fails on some GPU continues with --kernels torch.
        diff = sorted(k for k in settings if old.get(k) != settings[k] and k != "kernels")
        if diff:
            return f"{saved}: --resume with different settings: " + ", ".join(
                f"{k} {old.get(k)!r} -> {settings[k]!r}" for k in diff)
    os.makedirs(out, exist_ok=True)
    print(json.dumps({**settings, "world_size": world}), flush=True)
    tmp = saved + ".tmp"
    with open(tmp, "w") as f:
        json.dump({**settings, "world_size": world}, f, indent=2)
    os.replace(tmp, saved)
    return None


def main(argv=None):
    args = parse_args(argv)
    # The flag, else what the environment already says, is what runs and what is recorded.
    args.kernels = args.kernels or os.environ.get("SPIN_KERNELS") or "auto"
    os.environ["SPIN_KERNELS"] = args.kernels  # read by kernels.resolve_impl
    rank, world, device = setup_distributed()
    out = args.out
    # Rank 0 checks the run folder; every rank learns the verdict, so none waits forever.
    verdict = [prepare_out_dir(args, world) if rank == 0 else None]
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0]:
        dist.destroy_process_group()
        raise SystemExit(verdict[0])
    dist.barrier()
    metrics_path = os.path.join(out, "metrics.jsonl")

    def metrics(rec):
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if rec["type"] == "step" and (rec["step"] % 10 == 0 or rec["step"] == rec["steps"]):
                extra = f" acc {rec['rewards/accuracies']:.2f} margin {rec['rewards/margins']:.3f}" if "rewards/margins" in rec else ""
                log(f"  {rec['stage']} step {rec['step']}/{rec['steps']} loss {rec['loss']:.4f}{extra} "
                    f"lr {rec['lr']:.2e} {rec['tokens_per_s']:.0f} tok/s")

    timings = {}

    def stage(name, fn):
        t0 = time.time()
        result = fn()
        timings[name] = timings.get(name, 0.0) + time.time() - t0
        return result

    if args.demo:
        train_path, eval_path, init_dir = stage("prepare", lambda: prepare_demo(out, args))
    else:
        train_path, eval_path, init_dir = args.data, args.eval_data, args.model
    tok_path = os.path.join(init_dir, "tokenizer.model")
    tok = Tokenizer(tok_path)
    train_ex, held_ex = load_data(args, tok, train_path, eval_path)
    tokenize = lambda exs: pairs.tokenize_examples(tok, exs, max_length=args.max_length,
                                                   max_prompt_length=args.max_prompt_length, on_empty="skip")
    init_config = ModelConfig.from_hf(init_dir)
    generate.check_vocab(tok, init_config.vocab_size, init_dir)  # fail now, not mid-SFT
    dtype_name = init_config.dtype
    need = max(args.max_length, args.max_prompt_length + args.max_new_tokens)
    if need > init_config.max_position_embeddings:  # fail now, not after an hour of SFT
        raise SystemExit(f"{init_dir}: the model has {init_config.max_position_embeddings} positions, but "
                         f"--max-length {args.max_length} / --max-prompt-length {args.max_prompt_length} + "
                         f"--max-new-tokens {args.max_new_tokens} need {need}")
    has_task = args.demo
    infer = inference_dtype(args, device)

    def run_stage(kind, init, items, steps, lr, beta, folder, tag, optimizer=args.optimizer):
        model_dir = os.path.join(folder, "model")
        if not os.path.exists(model_dir):
            os.makedirs(folder, exist_ok=True)
            log(f"[{tag}] {kind}: {steps} steps from {init}")
            model, config = train_stage(kind, init, items, steps, lr, beta, folder, tok, args, device, metrics,
                                        tag, optimizer)
            export(model, config, model_dir, tok_path, dtype_name)
            del model
            # The export is the stage's result; its checkpoints (weights plus optimiser state,
            # ~16 bytes a parameter) only served a resume.
            on_rank0(lambda: shutil.rmtree(os.path.join(folder, "ckpt"), ignore_errors=True))
        return model_dir

    # 0. SFT: the demo's warm start, or the whole job with --sft.
    base = init_dir
    if args.demo or args.sft:
        sft_items, rep = tokenize(train_ex)
        log(f"sft data: {rep.summary()}")
        base = stage("sft", lambda: run_stage("sft", init_dir, sft_items, args.sft_steps, args.sft_lr, None,
                                              os.path.join(out, "sft"), "sft", args.sft_optimizer))
        if args.sft:
            log(f"SFT model: {base}")
            dist.destroy_process_group()
            return
    table = []  # one row per iteration and arm, for the final report

    # The SFT starting point, evaluated against its own samples (rewards are 0 by definition).
    synth0 = os.path.join(out, "iter0", "eval_synthetic.parquet")
    stage("generate", lambda: run_generation(base, held_ex, synth0, tok, args, device, 0, args.seed + 7))
    row = stage("evaluate", lambda: evaluate(base, synth0, tok, args, device, infer, 1.0, has_task))
    row.update(arm="start", iteration=0, reward_accuracy=None, reward_margin=None)
    table.append(row)
    metrics({"type": "eval", **row})

    # 1. SPIN iterations
    opponent = base
    for t in range(args.iterations):
        folder = os.path.join(out, f"iter{t}")
        beta, lr = per_iteration(args.beta, t, "beta"), per_iteration(args.lr, t, "lr")
        lists = [len(str(v).split(",")) for v in (args.beta, args.lr)]
        repeat = any(1 < n <= t for n in lists)  # a list shorter than --iterations repeats its last value
        log(f"[iter{t}] beta {beta:g}, lr {lr:g}" + (" (the last value of a shorter --beta/--lr list)" if repeat else ""))
        synth = os.path.join(folder, "synthetic.parquet")
        eval_synth = os.path.join(folder, "eval_synthetic.parquet")
        stage("generate", lambda: run_generation(opponent, train_ex, synth, tok, args, device, t, args.seed + t))
        stage("generate", lambda: run_generation(opponent, held_ex, eval_synth, tok, args, device, t, args.seed + 7 + t))
        files = [synth]
        if args.mix_previous and t > 0:  # the official recipe: iteration t-1's data, rescored by p_t
            prev = os.path.join(out, f"iter{t - 1}", "synthetic.parquet")
            mixed = os.path.join(folder, "previous_rescored.parquet")
            stage("generate", lambda: rescore(opponent, prev, mixed, tok, args, device, infer, "ref_"))
            files.append(mixed)
        examples = [ex for f in files for ex in readers.read_examples(f, layout="spin")[0]]
        items, rep = tokenize(examples)
        same = sum(it.real_ids == it.generated_ids for it in items) / max(len(items), 1)
        log(f"[iter{t}] {rep.summary()}; samples equal to the ground truth: {same:.1%}")
        n_steps = max(1, int(args.epochs * (len(items) // args.batch_size)))
        model_dir = stage("train", lambda: run_stage("spin", opponent, items, n_steps, lr, beta, folder, f"spin{t}"))
        row = stage("evaluate", lambda: evaluate(model_dir, eval_synth, tok, args, device, infer, beta, has_task))
        row.update(arm="spin", iteration=t + 1, train_samples_equal_gt=same, steps=n_steps)
        if t > 0 and row["gt_logp_per_token"] < table[-1]["gt_logp_per_token"] - 1e-3 or \
                t == 0 and row["gt_logp_per_token"] < table[0]["gt_logp_per_token"] - 1e-3:
            log(f"WARNING: held-out ground-truth log-likelihood fell during SPIN iteration {t} "
                f"({row['gt_logp_per_token']:.4f} nats/token). Reward accuracy can rise while the model "
                "gets worse (shared/SPIN_AT_SMALL_SCALE.md): consider a larger beta or a smaller lr.")
            row["gt_logp_fell"] = True
        table.append(row)
        metrics({"type": "eval", **row})
        opponent = model_dir

    # 2. The baseline the paper compares against: continued SFT, same steps, same lr, same start.
    if args.baseline:
        sft_items, _ = tokenize(train_ex)
        prev = base
        spin_rows = [r for r in table if r["arm"] == "spin"]
        for t in range(args.iterations):
            folder = os.path.join(out, "baseline", f"iter{t}")
            lr = per_iteration(args.lr, t, "lr")
            model_dir = stage("baseline", lambda: run_stage("sft", prev, sft_items, spin_rows[t]["steps"], lr, None,
                                                            folder, f"sft{t}"))
            eval_synth = os.path.join(folder, "eval_synthetic.parquet")
            stage("generate", lambda: run_generation(prev, held_ex, eval_synth, tok, args, device, t, args.seed + 7 + t))
            beta = per_iteration(args.beta, t, "beta")
            row = stage("evaluate", lambda: evaluate(model_dir, eval_synth, tok, args, device, infer, beta, has_task))
            row.update(arm="sft", iteration=t + 1, steps=spin_rows[t]["steps"])
            table.append(row)
            metrics({"type": "eval", **row})
            prev = model_dir

    if rank == 0:
        metrics({"type": "timing", **timings})
        print(report.table(table, timings))
        png = report.plot(table, os.path.join(out, "report.png"))
        print(f"outputs in {out}" + (f"; plot {png}" if png else ""))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
