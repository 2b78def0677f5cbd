"""TFLOP/s of spin_kernels/attention.py against torch SDPA (best backend) and flash_attn.

Prepared GPU run (H100/H200; the issue's shape: B*T = 16k tokens, H=32, Hkv=8, D=128,
causal, bf16, with and without a 4096 window, T = 1k..16k):

    python bench/attention.py --impl triton --out bench/attention_gpu.json

CPU smoke run (proves the script works; CPU numbers say nothing about the kernels):

    python bench/attention.py --device cpu --impl torch --tokens 512 --seqlens 128 256 \
        --heads 4 --kv-heads 1 --dim 64 --windows none 64 --reps 3

FLOP rule (stated so figures are comparable): only visible (query, key) pairs count.
A row i of a causal sequence with window W sees min(i + 1, W) keys (no padding here).
Forward = 2 matmuls (QK^T, PV) = 4 * D FLOPs per visible pair per head; backward = 5
matmuls (QK^T recomputed, dP = dO V^T, dV, dQ, dK) = 10 * D; forward+backward = 14 * D.
This is FlashAttention-2's counting with its causal factor made exact, so a baseline that
computes masked pairs anyway (SDPA with an explicit mask) is credited only with useful work.
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from spin_kernels.attention import attention  # noqa: E402


def visible_pairs(T, window):
    i = torch.arange(T, dtype=torch.float64)
    return float((i + 1).clamp(max=window).sum()) if window else T * (T + 1) / 2


def timeit(fn, device, reps):
    """Median seconds per call."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=max(reps, 1) * 20, return_mode="median") / 1e3
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def sdpa_fn(q, k, v, window, backend):
    from torch.nn.attention import sdpa_kernel

    T = q.shape[2]
    mask = None
    if window:  # SDPA has no window argument: an explicit (T, T) boolean mask
        i = torch.arange(T, device=q.device)
        mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)

    def run():
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                  enable_gqa=True)
    return run


def flash_attn_fn(q, k, v, window):
    from flash_attn import flash_attn_func

    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # flash_attn wants (B, T, H, D)
    ws = (window - 1, 0) if window else (-1, -1)  # keys i - (W-1) .. i

    def run():
        return flash_attn_func(qt, kt, vt, causal=True, window_size=ws)
    return run


def measure(fn, params, mode, device, reps):
    if mode == "fwd":
        with torch.no_grad():
            return timeit(fn, device, reps)

    def step():
        for p in params:
            p.grad = None
        fn().float().sum().backward()  # the sum's cost is O(B*H*T*D): noise next to attention
    return timeit(step, device, reps)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # --- shapes ---
    ap.add_argument("--tokens", type=int, default=16384, help="B * T, fixed across seq lengths")
    ap.add_argument("--seqlens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--windows", nargs="+", default=["none", "4096"], help="'none' or a window size")
    # --- what to run ---
    ap.add_argument("--impl", default="triton", choices=["triton", "torch"], help="this project's path")
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=10)
    # --- output ---
    ap.add_argument("--out", default=None, help="write settings and rows as JSON here")
    args = ap.parse_args()
    print("settings:", json.dumps(vars(args)))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    dev = args.device
    if dev == "cuda":
        props = torch.cuda.get_device_properties(0)
        print(f"device: {props.name}, torch {torch.__version__}")
    else:
        print(f"device: CPU ({os.cpu_count()} cores), torch {torch.__version__}: NOT a kernel measurement")

    from torch.nn.attention import SDPBackend

    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                SDPBackend.MATH]
    try:
        import flash_attn  # noqa: F401
        have_fa = dev == "cuda"
    except ImportError:
        have_fa = False

    rows = []
    header = f"{'T':>6} {'B':>3} {'window':>6} {'mode':>8}  TFLOP/s: ours (ms) | sdpa best (ms, backend) | flash_attn"
    print(header)
    for T in args.seqlens:
        B = max(1, args.tokens // T)
        for w in args.windows:
            window = None if w == "none" else int(w)
            g = torch.Generator(device="cpu").manual_seed(0)
            mk = lambda h: torch.randn(B, h, T, args.dim, generator=g).to(dev, dtype).requires_grad_()  # noqa: E731
            q, k, v = mk(args.heads), mk(args.kv_heads), mk(args.kv_heads)
            pairs = visible_pairs(T, window) * B * args.heads
            for mode in args.modes:
                flops = pairs * args.dim * (4 if mode == "fwd" else 14)
                ours_fn = lambda: attention(q, k, v, window=window, impl=args.impl)  # noqa: E731
                t_ours = measure(ours_fn, (q, k, v), mode, dev, args.reps)
                best = (math.inf, "none")
                for be in backends:
                    try:
                        t = measure(sdpa_fn(q, k, v, window, be), (q, k, v), mode, dev, args.reps)
                    except RuntimeError:  # backend unavailable for this shape/mask/device
                        continue
                    best = min(best, (t, be.name))
                t_fa = math.nan
                if have_fa:
                    t_fa = measure(flash_attn_fn(q, k, v, window), (q, k, v), mode, dev, args.reps)
                tf = lambda t: flops / t / 1e12  # noqa: E731
                row = dict(T=T, B=B, window=window, mode=mode, ours_ms=t_ours * 1e3, ours_tflops=tf(t_ours),
                           sdpa_backend=best[1], sdpa_ms=best[0] * 1e3, sdpa_tflops=tf(best[0]),
                           flash_attn_tflops=tf(t_fa))
                rows.append(row)
                print(f"{T:>6} {B:>3} {w:>6} {mode:>8} {row['ours_tflops']:>9.4g} ({t_ours * 1e3:.3g} ms) "
                      f"{row['sdpa_tflops']:>9.4g} ({best[0] * 1e3:.3g} ms, {best[1]}) "
                      f"{row['flash_attn_tflops']:>9.4g}", flush=True)
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(dict(settings=vars(args), device=dev, rows=rows), f, indent=1)
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
