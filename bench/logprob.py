"""Peak extra memory and forward+backward time of per-token log-probs through the LM head:
the fused linear_logprobs (torch path on CPU, Triton on CUDA) vs the naive full-logits
path, and vs Liger's fused linear cross-entropy (reduction='none', negated) when
liger_kernel is importable.

CPU (the issue's CPU target):
    python bench/logprob.py --device cpu --dtype fp32 --N 4096 --C 256 --V 32000
GPU, Mistral-7B head shapes (prepared, not yet run):
    python bench/logprob.py --device cuda --dtype bf16 --C 4096 --V 32000 --N 8192
    python bench/logprob.py --device cuda --dtype bf16 --C 4096 --V 32000 --N 32768

Peak extra memory = the highest live-bytes level reached during one forward+backward
above the level before it (inputs excluded; gradients, logits and workspaces included).
On CUDA it is torch.cuda.max_memory_allocated. On CPU torch has no allocator peak counter
and tracemalloc does not see torch's allocator, while process RSS is blurred by the
allocator keeping freed pages; so the CPU figure replays the allocation and free events
that torch.profiler(profile_memory=True) records from c10's CPU allocator, in time order,
and takes the running maximum. Times come from separate runs without the profiler.
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from spin_kernels.logprob import linear_logprobs  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def naive_full_logits(hidden, weight, targets, ignore_index=-100):
    """The naive path as issue 6 describes it: logits (N, V) from a GEMM in the input dtype
    (bf16 on a GPU, where a bf16 GEMM is far faster than an fp32 one), upcast to fp32, then
    log_softmax and a gather. For fp32 inputs it is linear_logprobs_naive exactly."""
    logits = (hidden @ weight.T).float()  # (N, V)
    valid = targets != ignore_index
    logp = logits.log_softmax(-1).gather(-1, torch.where(valid, targets, 0)[:, None])[:, 0]
    return torch.where(valid, logp, 0.0)


def liger_logprobs():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    loss = LigerFusedLinearCrossEntropyLoss(reduction="none")
    # Liger returns the per-token cross-entropy, i.e. -log p(target).
    return lambda h, w, t: -loss(w, h, t)


def step(fn, hidden, weight, targets, grad):
    hidden.grad = weight.grad = None
    out = fn(hidden, weight, targets)
    (out.float() * grad).sum().backward()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_extra_bytes(fn, args, device):
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(fn, *args)
        sync(device)
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(fn, *args)
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def median_seconds(fns, args, device, reps, warmup):
    # Candidates take turns within each repetition, so that load from other processes on a
    # shared machine falls on all of them alike.
    times = {name: [] for name in fns}
    for rep in range(warmup + reps):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            step(fn, *args)
            sync(device)
            if rep >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # --- shapes ---
    p.add_argument("--N", type=int, default=4096, help="tokens")
    p.add_argument("--C", type=int, default=256, help="model dim")
    p.add_argument("--V", type=int, default=32000, help="vocabulary")
    p.add_argument("--ignored", type=float, default=0.0, help="fraction of targets = -100")
    # --- where ---
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    # --- measurement ---
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--skip-naive", action="store_true", help="if naive does not fit")
    args = p.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    print("settings:", vars(args), f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    if device.type == "cuda":
        print("device:", torch.cuda.get_device_name())

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.N, args.C, generator=gen).to(device, dtype).requires_grad_()
    weight = (torch.randn(args.V, args.C, generator=gen) / args.C**0.5).to(device, dtype)
    weight.requires_grad_()
    targets = torch.randint(0, args.V, (args.N,), generator=gen)
    targets[torch.rand(args.N, generator=gen) < args.ignored] = -100
    targets = targets.to(device)
    grad = torch.randn(args.N, generator=gen).to(device)
    inputs = (hidden, weight, targets, grad)

    fused_name = "fused (triton)" if device.type == "cuda" else "fused (torch chunks)"
    candidates = {fused_name: linear_logprobs}
    if not args.skip_naive:
        candidates["naive (full logits)"] = naive_full_logits
    liger = liger_logprobs()
    if liger is None:
        print("note: liger_kernel is not importable; Liger's fused linear CE is skipped")
    elif device.type != "cuda":
        print("note: Liger's kernels need CUDA; skipped on", device.type)
    else:
        candidates["liger flce (none)"] = liger

    mems = {name: peak_extra_bytes(fn, inputs, device) for name, fn in candidates.items()}
    secs = median_seconds(candidates, inputs, device, args.reps, args.warmup)
    results = {name: (mems[name], secs[name]) for name in candidates}
    for name, (mem, sec) in results.items():
        print(f"{name:22s} peak extra {mem / 2**20:10.1f} MiB   fwd+bwd median {sec * 1e3:9.1f} ms")

    fmem, fsec = results[fused_name]
    for name, (mem, sec) in results.items():
        if name != fused_name:
            print(f"vs {name:19s} memory {mem / fmem:6.1f}x lower   time ratio fused/{name.split()[0]} "
                  f"{fsec / sec:5.2f}")


if __name__ == "__main__":
    main()
