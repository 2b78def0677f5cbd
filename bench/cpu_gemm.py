"""Why a CPU decode step packs its weights for oneDNN (spin_kernels.cpu_linear.cpu_decode_weights): one product
of a few rows against a large fp32 weight, the three ways torch can run it, in one run.

    python bench/cpu_gemm.py                       # bench/generate.py's LM head: 8 x 256 @ 256 x 32000
    python bench/cpu_gemm.py --threads 1 --out 768 # a layer's gate projection

Before each call the caches are flushed by reading a 48 MB buffer, as a decode step's other
weights do (the model does not fit in L3), so the weight comes from DRAM. Medians.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--inp", type=int, default=256)
    ap.add_argument("--out", type=int, default=32000)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=40)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    W = torch.randn(args.out, args.inp) * 0.02
    x = torch.randn(args.rows, args.inp)
    flush = torch.randn(12_000_000)
    packed = torch.ops.mkldnn._reorder_linear_weight(W, args.rows)
    ways = {
        "F.linear (MKL)": lambda: F.linear(x, W),
        "oneDNN, weight reordered per call": lambda: torch.ops.mkldnn._linear_pointwise(x, W, None, "none", [], ""),
        "oneDNN, weight packed once": lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""),
    }
    ref = F.linear(x.double(), W.double())
    times = {k: [] for k in ways}
    for r in range(args.repeats + 3):
        for k, f in ways.items():  # interleaved
            flush.sum()
            t = time.perf_counter()
            f()
            if r >= 3:
                times[k].append(time.perf_counter() - t)
    print(f"({args.rows} x {args.inp}) @ ({args.inp} x {args.out}) fp32, {torch.get_num_threads()} threads, "
          f"weight {W.numel() * 4 / 1e6:.1f} MB, medians of {args.repeats}")
    base = statistics.median(times["F.linear (MKL)"])
    for k, f in ways.items():
        med = statistics.median(times[k])
        err = ((f().double() - ref).abs().max() / ref.abs().max()).item()
        print(f"  {k:36s} {med * 1e3:7.3f} ms  {W.numel() * 4 / med / 1e9:5.1f} GB/s  "
              f"{base / med:4.2f}x F.linear  rel err {err:.1e}")


if __name__ == "__main__":
    main()
