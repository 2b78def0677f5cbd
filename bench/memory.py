"""Peak memory per rank of one SPIN training step (stage.py's step): a model written out term by
term, checked against measured peaks at CPU shapes, then used to predict Mistral-7B runs.

    python bench/memory.py                 # predictions for a Mistral-7B-shaped model (a table)
    python bench/memory.py --check         # measure CPU configurations, predicted vs measured
    python -m torch.distributed.run --standalone --nproc_per_node=2 bench/memory.py --check
                                           # the same, sharded over two ranks (FSDP2)

## The model (bytes per rank; P parameters, N ranks, b the compute dtype's bytes)

Resident between steps: the trained parameters in fp32 (4 P_train / N), the frozen ones (a LoRA
run's base) in the compute dtype (b P_base / N), the optimiser state (4 P_train / N per state:
RMSprop 1, AdamW 2). A step adds on top, and the peak is the largest of five moments:

  backward starts  every layer's saved activations + the last norm's + the root's unsharded
                   weights (FSDP keeps the embedding and LM head gathered from forward to backward)
                   + the log-prob backward (spin_kernels/logprob.py: a (rows, V) fp32 chunk and an fp32
                   copy of a bf16 head on the CPU, dW (V, C) fp32 when the head trains)
  a block recomputes  (activation checkpointing) the block inputs or the gradients so far, plus one
                   block's activations and backward temporaries, two gathered blocks, the root
  backward ends    gradients (4 P_train / N) + the root gathered + the head's and the embedding's
                   unsharded fp32 gradients (full training only)
  clip             gradients + 16 bytes per element of the largest gradient shard
                   (parallel.clip_grad_norm squares in float64: a copy and its square)
  optimiser        gradients + sqrt of the state: the largest tensor on the CPU (one tensor at a
                   time), every tensor at once on CUDA (torch's foreach default there)

Saved activations per token per layer (what autograd keeps; tests/test_memory.py counts them):
  each RMSNorm     its fp32 input (4C), and with a trained weight the normalised input (bC)
  linear inputs    bC before q/k/v and before gate/up, HD b before o, I b before down: kept when
                   the layer's weight trains or a LoRA adapter reads them (and r b for each A x);
                   with LoRA dropout each adapter keeps its own dropped copy and mask instead
  attention        q and k after rotary, v, the output (2 HD + 2 Hkv D) b, lse 4H; on the CPU the
                   torch path's SDPA also keeps its (T, T) mask as a float (T b) and a bool per row
  MLP              gate, up, silu(gate), their product: 4 I b
With per-block checkpointing a layer keeps only its input (bC); one block at a time recomputes.

What it leaves out: allocator fragmentation and the CUDA context (a GPU's reserved memory is
larger than this figure, typically by 1-3 GB), collective buffers (measured +1% at two ranks),
and LoRA's first layer, whose input needs no gradient (it predicts 4C per token too much there).
The official recipe's row is the same arithmetic under its own assumptions (stated at
`official`), not a model of DeepSpeed checked against a measurement.
"""
import argparse
import json
import os
import sys
import tempfile
import time
import types
from dataclasses import dataclass, field, replace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import lora  # noqa: E402
from spin_kernels.logprob import TORCH_TILE_ELEMENTS  # noqa: E402

GiB, MiB = 2**30, 2**20
BYTES = {"fp32": 4, "bf16": 2}
ALL = tuple(lora.TARGETS)


@dataclass(frozen=True)
class Shape:
    C: int  # hidden
    L: int  # layers
    H: int  # query heads
    Hkv: int  # key/value heads
    D: int  # head dim
    I: int  # MLP width
    V: int  # vocabulary
    tied: bool = False

    def linears(self):  # {target: (in, out)}
        C, HD, KD, I = self.C, self.H * self.D, self.Hkv * self.D, self.I
        return {"q": (C, HD), "k": (C, KD), "v": (C, KD), "o": (HD, C), "gate": (C, I), "up": (C, I), "down": (I, C)}

    @property
    def block(self):  # parameters of one block
        return sum(i * o for i, o in self.linears().values()) + 2 * self.C

    @property
    def root(self):  # embedding, final norm, LM head (once when tied)
        return self.V * self.C * (1 if self.tied else 2) + self.C

    @property
    def params(self):
        return self.L * self.block + self.root

    def adapters(self, r, targets):
        return self.L * sum(r * (i + o) for t, (i, o) in self.linears().items() if t in targets)


MISTRAL_7B = Shape(C=4096, L=32, H=32, Hkv=8, D=128, I=14336, V=32000)
SMOLLM2_135M = Shape(C=576, L=30, H=9, Hkv=3, D=64, I=1536, V=49152, tied=True)
TINY = Shape(C=256, L=4, H=8, Hkv=4, D=32, I=688, V=32000)  # bench/train.py's CPU model


@dataclass(frozen=True)
class Setup:
    name: str
    ranks: int = 1
    lora_rank: int = 0  # 0: every parameter trains
    lora_targets: tuple = ALL
    checkpointing: bool = False
    pairs: int = 8  # pairs per micro-batch per rank: 2 * pairs rows
    length: int = 96  # padded row length T
    scored: int = 64  # scored (response) tokens per row
    compute: str = "fp32"
    device: str = "cpu"  # cpu: torch attention/log-prob paths, one-tensor optimiser; cuda: Triton, foreach
    optimizer: str = "rmsprop"
    extra: dict = field(default_factory=dict, compare=False)


def activations_per_token(s: Shape, u: Setup):
    """Bytes autograd keeps per token for one block (module docstring)."""
    b, full = BYTES[u.compute], not u.lora_rank
    t = set(u.lora_targets) if u.lora_rank else set(ALL)
    HD, KD = s.H * s.D, s.Hkv * s.D
    norms = 2 * (4 * s.C + 4) + (2 * b * s.C if full else 0)  # fp32 inputs, rstd, normalised inputs
    inputs = b * (s.C * bool(t & {"q", "k", "v"}) + HD * ("o" in t) + s.C * bool(t & {"gate", "up"})
                  + s.I * ("down" in t))
    # q after rotary, the output, k after rotary, v; lse; the torch path's float mask and the bool of
    # its where() (rows that see no key)
    attention = (2 * HD + 2 * KD) * b + 4 * s.H + (u.length * b + 1 if u.device == "cpu" else 0)
    mlp = 3 * s.I * b  # gate, up, silu(gate); their product is `inputs`' I b before down
    adapters = len(t) * u.lora_rank * b
    if u.lora_rank and u.extra.get("lora_dropout"):
        # Each adapter reads its own dropped copy (kept, with its mask, both b bytes an element);
        # the frozen base products need no input, so none of the shared inputs is kept.
        inputs = 0
        adapters += sum(2 * b * i for k, (i, _) in s.linears().items() if k in t)
    return norms + inputs + attention + mlp + adapters


def predict(s: Shape, u: Setup):
    """{term: bytes} for one rank, the five moments of the step, and the peak (module docstring)."""
    b, N = BYTES[u.compute], u.ranks
    full = not u.lora_rank
    trained = s.params if full else s.adapters(u.lora_rank, u.lora_targets)
    frozen = 0 if full else s.params
    states = {"rmsprop": 1, "adamw": 2}[u.optimizer]
    rows = 2 * u.pairs
    tokens, scored = rows * u.length, rows * u.scored
    largest = max(s.V * s.C, s.I * s.C) if full else max(u.lora_rank * max(io) for io in s.linears().values())
    res = {"weights": (4 * trained + b * frozen) / N, "optimizer state": 4 * states * trained / N}

    layer = activations_per_token(s, u)
    if u.checkpointing:
        acts = s.L * tokens * b * s.C  # block inputs
    else:
        acts = s.L * tokens * layer
    # the last norm (its fp32 input, rstd, the normalised input), the ids, rotary's cos and sin, the
    # head's input rows (the scored tokens only)
    last = tokens * (4 * s.C + 4 + (b * s.C if full else 0) + 8 + 2 * s.D * b) + scored * s.C * b
    root = s.root * b
    if u.device == "cpu":  # spin_kernels/logprob.py torch path
        head = min(scored, max(1, TORCH_TILE_ELEMENTS // s.V)) * s.V * 4 + scored * s.C * 4 * (2 if full else 1)
        head += s.V * s.C * 4 if full else 0
        head += s.V * s.C * 4 if b != 4 else 0  # it computes in fp32: a (V, C) fp32 copy of a bf16 head
    else:  # Triton: dh, an fp32 dW and its cast
        head = scored * s.C * b + (s.V * s.C * (4 + b) if full else 0)
    grads = 4 * trained / N
    head_grad = s.V * s.C * 4 if full else 0  # unsharded until the root's reduce-scatter, after the embedding
    block_grads = 4 * s.L * (s.block if full else s.adapters(u.lora_rank, u.lora_targets) // s.L) / N
    moments = {"backward starts": acts + last + root + head}
    if u.checkpointing:
        transient = tokens * (s.I + 2 * s.C) * b  # the block's backward starts: d(product), the residual's
        moments["a block recomputes"] = (max(acts, block_grads) + last + root + head_grad + tokens * layer + transient
                                         + 2 * s.block * b)
    # Block gradients are sharded by now; the root's are not yet (its reduce-scatter runs last).
    moments["backward ends"] = block_grads + root + (2 * s.V * s.C * 4 if full else 0)
    moments["clip"] = grads + 16 * largest / N
    moments["optimiser"] = grads + 4 * (largest if u.device == "cpu" else trained) / N  # sqrt of the state
    phase = max(moments, key=moments.get)
    terms = dict(res, activations=acts + last, **{"gathered root": root, "log-prob path": head, "gradients": grads,
                                                  "head gradient": head_grad})
    return {"terms": terms, "resident": sum(res.values()), "moments": moments, "phase": phase,
            "step": moments[phase], "peak": sum(res.values()) + moments[phase], "trained": trained}


def official(s: Shape, u: Setup):
    """The official SPIN recipe per GPU (uclaml/SPIN: accelerate + DeepSpeed ZeRO-3, bf16, gradient
    checkpointing, a resident ZeRO-3 reference model, TRL's full logits), in the same arithmetic.
    Assumptions: ZeRO-3 holds bf16 params and grads, an fp32 master copy and the RMSprop state
    (12 B/param / N) and the reference (2 B/param / N); gathered parameters as ours (two blocks
    and the root; DeepSpeed's stage3_max_live_parameters allows up to 1e9, 2 GB); a block's
    recompute as ours; logits: the policy's fp32 logits and log_softmax (kept for backward,
    8 B per token per vocabulary entry) while the reference forward makes its own (8 more)."""
    b, N, P = 2, u.ranks, s.params
    tokens = 2 * u.pairs * u.length
    res = {"weights": (2 + 4) * P / N, "optimizer state": 4 * P / N, "reference model": 2 * P / N}
    acts = s.L * tokens * b * s.C + tokens * activations_per_token(s, replace(u, compute="bf16", device="cuda"))
    logits = 16 * tokens * s.V
    step = acts + logits + (2 * s.block + s.root) * b + 2 * P / N  # + bf16 gradient partition
    return {"terms": dict(res, activations=acts, logits=logits), "resident": sum(res.values()),
            "phase": "reference forward", "step": step, "peak": sum(res.values()) + step}


# ----------------------------------------------------------------------------------------------
# Measurement: stage.py's build_model and step on the CPU, peak from the allocator's events

def measure(s: Shape, u: Setup, steps_before=2):
    """(resident bytes, peak extra bytes of one step) on this rank, for stage.py's real step:
    build_model (FSDP2 over the ranks of this process group), spin_micro_batch, clip, RMSprop.
    Resident is counted from the tensors' sizes (local shards, optimiser state); the extra is the
    highest live-bytes level above the start of the step, replayed from torch.profiler's
    allocator events (bench/logprob.py's method)."""
    import torch.distributed as dist

    import parallel
    import stage
    from bench.logprob import peak_extra_bytes
    from settings import TrainSettings
    from data.pairs import Pair
    from hf_folder import save_model
    from model import Mistral, ModelConfig

    folder = [None]
    if parallel.rank() == 0:
        folder[0] = tempfile.mkdtemp(prefix="spin-mem-")
        cfg = ModelConfig(vocab_size=s.V, hidden_size=s.C, intermediate_size=s.I, num_hidden_layers=s.L,
                          num_attention_heads=s.H, num_key_value_heads=s.Hkv, head_dim=s.D,
                          max_position_embeddings=max(4096, u.length), tie_word_embeddings=s.tied)
        torch.manual_seed(0)
        save_model(Mistral(cfg), folder[0])  # values do not matter for memory
    dist.broadcast_object_list(folder, src=0)
    settings = TrainSettings(batch_size=u.pairs, micro_batch_size=u.pairs, warmup_ratio=0.1, clip=1.0, ckpt_every=100,
                             seed=0, activation_checkpointing=u.checkpointing, loss_type="sigmoid",
                             live_reference=False)
    lora_settings = lora.LoraSettings.from_flags(u.lora_rank, 2.0 * u.lora_rank, u.lora_targets,
                                                 u.extra.get("lora_dropout", 0.0))
    compute = torch.bfloat16 if u.compute == "bf16" else torch.float32
    model, _ = stage.build_model(folder[0], settings, compute, torch.device("cpu"), "auto", lora_settings)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt, _ = stage.make_optimizer(params, u.optimizer, 1e-6, 100, 0.1)
    g = torch.Generator().manual_seed(parallel.rank())
    ids = lambda n: torch.randint(3, s.V, (n,), generator=g).tolist()  # noqa: E731
    prompt = u.length - u.scored
    items = [Pair(ids(prompt), ids(u.scored), ids(u.scored), -50.0, -50.0) for _ in range(u.pairs)]
    env = stage.StageEnv(torch.device("cpu"), compute, "auto", pad_id=2, out=None, tok_files={}, export_dtype=compute)
    spin = types.SimpleNamespace(beta=0.1, settings=settings)  # the parts of a stage.Stage the step reads

    def step():  # stage.train_stage's step for one micro-batch, without the bookkeeping
        stage.spin_micro_batch(model, items, env, spin, u.pairs)
        parallel.clip_grad_norm(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(steps_before):  # the optimiser state exists from the first step on
        step()
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    tensors = [local(p) for p in model.parameters()]
    tensors += [local(t) for st in opt.state.values() for t in st.values() if torch.is_tensor(t) and t.dim()]
    resident = sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())
    # bench/logprob.py's harness runs fn(h, w, t) and backpropagates its output; a whole step does
    # its own backward, so it gets placeholder slots and a 0-d leaf (as bench/train.py does).
    slot, leaf = types.SimpleNamespace(grad=None), torch.zeros((), requires_grad=True)
    extra = peak_extra_bytes(lambda *_: (step(), leaf)[1], (slot, slot, None, torch.zeros(())), torch.device("cpu"))
    if parallel.rank() == 0:
        import shutil
        shutil.rmtree(folder[0], ignore_errors=True)
    return resident, extra


# What --check runs: at one rank, or (names ending in -x2) under torchrun with two.
CHECKS = {
    "tiny-full": (TINY, Setup("tiny-full")),
    "tiny-lora": (TINY, Setup("tiny-lora", lora_rank=8)),
    "tiny-full-ckpt": (TINY, Setup("tiny-full-ckpt", checkpointing=True)),
    "tiny-lora-ckpt": (TINY, Setup("tiny-lora-ckpt", lora_rank=8, checkpointing=True)),
    "tiny-lora-qv": (TINY, Setup("tiny-lora-qv", lora_rank=16, lora_targets=("q", "v"), pairs=4, length=160,
                                 scored=96)),
    "tiny-lora-bf16": (TINY, Setup("tiny-lora-bf16", lora_rank=8, compute="bf16")),  # the base stored in bf16
    "tiny-full-bf16": (TINY, Setup("tiny-full-bf16", compute="bf16")),
    "smollm2-full": (SMOLLM2_135M, Setup("smollm2-full", pairs=4)),
    "smollm2-lora": (SMOLLM2_135M, Setup("smollm2-lora", lora_rank=16, pairs=4)),
    "tiny-full-x2": (TINY, Setup("tiny-full-x2", ranks=2)),
    "tiny-lora-x2": (TINY, Setup("tiny-lora-x2", ranks=2, lora_rank=8)),
}
SMALL = Shape(C=128, L=2, H=4, Hkv=2, D=32, I=344, V=8000)  # the test's configuration (tests/test_memory.py)
CHECKS["small-lora"] = (SMALL, Setup("small-lora", lora_rank=8, pairs=4, length=64, scored=40))


def check(names, out=None):
    import parallel
    _, world, _ = parallel.setup()
    torch.set_num_threads(1)
    rows = []
    for name in names:
        s, u = CHECKS[name]
        if u.ranks != world:
            continue
        t0 = time.time()
        resident, extra = measure(s, u)
        p = predict(s, u)
        got = parallel.reduce_sums({"r": resident, "x": extra}, op="max")  # the rank that needs most
        row = dict(config=name, ranks=world, measured_MiB=(got["r"] + got["x"]) / MiB, predicted_MiB=p["peak"] / MiB,
                   measured_step_MiB=got["x"] / MiB, predicted_step_MiB=p["step"] / MiB, phase=p["phase"],
                   resident_MiB=got["r"] / MiB, predicted_resident_MiB=p["resident"] / MiB, seconds=time.time() - t0)
        row["error"] = row["predicted_MiB"] / row["measured_MiB"] - 1
        rows.append(row)
        parallel.log(f"{name:16s} ranks {world}  measured {row['measured_MiB']:8.1f} MiB "
                     f"(resident {row['resident_MiB']:7.1f}"
                     f" + step {row['measured_step_MiB']:7.1f})  predicted {row['predicted_MiB']:8.1f} (resident "
                     f"{row['predicted_resident_MiB']:7.1f} + step {row['predicted_step_MiB']:7.1f}, at '{p['phase']}')"
                     f"  error {row['error']:+.1%}")
    if out and parallel.rank() == 0:
        with open(out, "w") as f:
            json.dump(rows, f, indent=2)
    torch.distributed.destroy_process_group()
    return rows


# ----------------------------------------------------------------------------------------------
# Predictions for a Mistral-7B-shaped model

def gpu(name, **kw):
    return Setup(name, compute="bf16", device="cuda", length=1024, scored=512, **kw)


def predictions():
    s = MISTRAL_7B
    rows = []
    for pairs in (1, 2, 4):
        rows.append(("LoRA r16 all, 1 GPU, ckpt", gpu(f"lora-{pairs}", lora_rank=16, pairs=pairs, checkpointing=True),
                     24))
    rows.append(("LoRA r16 all, 1 GPU, no ckpt", gpu("lora-nockpt", lora_rank=16, pairs=1), 24))
    for pairs in (1, 4):
        rows.append(("full, 1 GPU, ckpt", gpu(f"full-{pairs}", pairs=pairs, checkpointing=True), 141))
    rows.append(("full, 8 GPUs, ckpt (ours)", gpu("full-8", ranks=8, pairs=8, checkpointing=True), 80))
    GB = 1e9
    print(f"Mistral-7B shape: {s.params / 1e9:.3f} B parameters; LoRA r16 on q,k,v,o,gate,up,down: "
          f"{s.adapters(16, ALL) / 1e6:.1f} M. Rows of up to 1024 tokens (512 scored), bf16 compute, RMSprop.")
    head = (f"{'run':32s} {'pairs/GPU':>9s} {'weights':>8s} {'opt':>6s} {'grads':>6s} {'acts':>6s} {'head':>6s} "
            f"{'peak at':>18s} {'peak GB':>8s} {'card':>5s}")
    print(head)
    for label, u, card in rows:
        p = predict(s, u)
        t = p["terms"]
        print(f"{label:32s} {u.pairs:9d} {t['weights'] / GB:8.1f} {t['optimizer state'] / GB:6.1f} "
              f"{t['gradients'] / GB:6.1f} {t['activations'] / GB:6.1f} {t['log-prob path'] / GB:6.2f} "
              f"{p['phase']:>18s} {p['peak'] / GB:8.1f} {card:4d}G {'fits' if p['peak'] / GB < card else 'NO'}")
    u = gpu("official", ranks=8, pairs=8, checkpointing=True)
    p = official(s, u)
    t = p["terms"]
    print(f"{'official recipe, 8 GPUs (ZeRO-3)':32s} {8:9d} {(t['weights'] + t['reference model']) / GB:8.1f} "
          f"{t['optimizer state'] / GB:6.1f} {'':>6s} {t['activations'] / GB:6.1f} {t['logits'] / GB:6.2f} "
          f"{p['phase']:>18s} {p['peak'] / GB:8.1f} {80:4d}G (weights incl. the reference model)")
    print("GB = 1e9 bytes; peak = what torch's allocator holds at the peak; a card also needs the CUDA "
          "context and fragmentation headroom (1-3 GB).")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="measure CPU configurations and compare")
    p.add_argument("--configs", default=None,
                   help=f"comma list (default: all for this world size but small-lora) of {', '.join(CHECKS)}")
    p.add_argument("--out", default=None, help="with --check: write the rows to this JSON file")
    a = p.parse_args()
    if not a.check:
        predictions()
        return
    names = a.configs.split(",") if a.configs else [n for n in CHECKS if n != "small-lora"]
    rows = check(names, a.out)
    if rows and max(abs(r["error"]) for r in rows) > 0.15:
        sys.exit(1)


if __name__ == "__main__":
    main()
