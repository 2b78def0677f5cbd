"""How fast do a decode step's linear layers stream their weights on this CPU? The products of
one SmolLM2-135M decode step (batch 8, fp32: 30 layers of q, k, v, o, gate, up, down, then the
tied 49152 x 576 LM head; 538 MB, far above any cache), four ways, in one run:

    F.linear (MKL) or oneDNN on weights packed once (spin_kernels/cpu_linear.py), each with the
    projections separate (what model.py runs) or fused (q|k|v and gate|up concatenated).

    python bench/cpu_stream.py [--threads 2]

Compare the GB/s with `read bandwidth` from bench/generate.py (a plain sum of 2 GB): the gap is
what the GEMM kernels lose at 8 rows, not something model.py adds. Medians of 10 after 2 warm-ups.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rows", type=int, default=8)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    C, Hq, Hkv, inter, L, V, B = 576, 576, 192, 1536, 30, 49152, args.rows  # SmolLM2-135M
    layers = [dict(q=torch.randn(Hq, C), k=torch.randn(Hkv, C), v=torch.randn(Hkv, C), o=torch.randn(C, Hq),
                   gate=torch.randn(inter, C), up=torch.randn(inter, C), down=torch.randn(C, inter)) for _ in range(L)]
    head = torch.randn(V, C)
    fused = [dict(qkv=torch.cat([w["q"], w["k"], w["v"]]), o=w["o"], gate_up=torch.cat([w["gate"], w["up"]]),
                  down=w["down"]) for w in layers]
    pack = lambda w: torch.ops.mkldnn._reorder_linear_weight(w, B)  # noqa: E731
    onednn = lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")  # noqa: E731
    x, x_inter = torch.randn(B, C), torch.randn(B, inter)

    def step(ls, f, h):  # every product of one decode step; down takes the MLP's wider input
        for ws in ls:
            for name, w in ws.items():
                f(x_inter if name == "down" else x, w)
        f(x, h)

    packed = [{k: pack(w) for k, w in ws.items()} for ws in layers]
    packed_fused = [{k: pack(w) for k, w in ws.items()} for ws in fused]
    head_packed = pack(head)
    ways = {"F.linear, separate": lambda: step(layers, F.linear, head),
            "F.linear, fused": lambda: step(fused, F.linear, head),
            "oneDNN packed, separate": lambda: step(packed, onednn, head_packed),
            "oneDNN packed, fused": lambda: step(packed_fused, onednn, head_packed)}
    times = {k: [] for k in ways}
    for r in range(12):  # interleaved
        for k, f in ways.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    nbytes = sum(w.numel() * 4 for ws in layers for w in ws.values()) + head.numel() * 4
    print(f"{torch.get_num_threads()} threads, {B} rows, {nbytes / 1e6:.0f} MB of weights per step")
    base = statistics.median(times["F.linear, separate"][2:])
    for k, v in times.items():
        m = statistics.median(v[2:])
        print(f"{k:26s} {m * 1e3:6.1f} ms  {nbytes / m / 1e9:5.1f} GB/s  {base / m:.2f}x F.linear, separate")


if __name__ == "__main__":
    main()
