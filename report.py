"""The end-of-run report: a table of held-out metrics per iteration, SPIN beside continued SFT,
and a plot of the same curves. Input: the `eval` rows train.py writes to metrics.jsonl."""
import argparse
import json
import os
import sys

from checkpoint import atomic_file

COLUMNS = [  # (key, header, format)
    ("exact_match", "exact match", "{:.1%}"),
    ("gt_logp_per_token", "GT logp/tok", "{:.4f}"),
    ("opponent_equals_gt", "samples=GT", "{:.1%}"),
    ("reward_accuracy", "reward acc", "{:.1%}"),
    ("reward_margin", "margin", "{:+.3f}"),
]


def _cell(row, key, fmt):
    v = None if row is None else row.get(key)
    return "-" if v is None else fmt.format(v)


def table(rows, timings=None):
    """rows: eval dicts with arm in {start, spin, sft} and iteration. Returns printable text."""
    cols = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    arms = [a for a in ("spin", "sft") if any(r["arm"] == a for r in rows)]
    head = ["iter"] + [f"{arm.upper()} {h}" for arm in arms for _, h, _ in cols]
    lines = []
    start = next((r for r in reversed(rows) if r["arm"] == "start"), None)  # a resumed run repeats rows
    if start is not None:
        lines.append(["0 (start)"] + [_cell(start, k, f) for _ in arms for k, _, f in cols])
    iters = sorted({r["iteration"] for r in rows if r["arm"] != "start"})
    for t in iters:
        by_arm = {r["arm"]: r for r in rows if r["iteration"] == t and r["arm"] != "start"}
        lines.append([str(t)] + [_cell(by_arm.get(arm), k, f) for arm in arms for k, _, f in cols])
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))
    out = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(l) for l in lines]
    out.append("samples=GT: fraction of the opponent's held-out samples equal to the ground truth "
               "(SPIN has no signal as it nears 100%). reward acc/margin: the trained model against "
               "its opponent on held-out pairs; '-' where undefined.")
    if timings:
        out.append("wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    return "\n".join(out)


def plot(rows, path):
    """Write the curves as a PNG; returns the path, or None when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no report.png", file=sys.stderr)
        return None
    keys = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
    axes = [axes] if len(keys) == 1 else axes
    start = next((r for r in reversed(rows) if r["arm"] == "start"), None)
    for ax, (key, title, _) in zip(axes, keys):
        for arm, style in (("spin", "o-"), ("sft", "s--")):
            pts = sorted((r["iteration"], r[key]) for r in rows if r["arm"] == arm and r.get(key) is not None)
            if start is not None and start.get(key) is not None:
                pts = [(0, start[key])] + pts
            if pts:
                ax.plot(*zip(*pts), style, label="SPIN" if arm == "spin" else "continued SFT")
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":  # python report.py runs/<run>/metrics.jsonl
    ap = argparse.ArgumentParser(description="Print a run's table from its metrics.jsonl (the last record of "
                                             "each evaluation wins, as after a resume).")
    ap.add_argument("metrics", help="runs/<run>/metrics.jsonl")
    path = ap.parse_args().metrics
    if not os.path.isfile(path):
        ap.error(f"{path}: no such file (expected runs/<run>/metrics.jsonl)")
    rows = [json.loads(line) for line in open(path) if line.strip()]
    evals = [r for r in rows if r.get("type") == "eval"]
    timing = next((r for r in reversed(rows) if r.get("type") == "timing"), None)
    if timing:
        timing = {k: v for k, v in timing.items() if k != "type"}
    print(table(evals, timing))
