"""The end-of-run report: a table of held-out metrics per iteration, SPIN beside continued SFT,
a plot of the same curves (report.png), and the per-step training curves of every stage
(report_training.png). Input: the records train.py writes to metrics.jsonl."""
import json
import os
import sys

from checkpoint import atomic_file
from errors import ArgumentParser, InputError, MissingInput, run_command

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


# Panel titles of the evaluation plot: what is measured, on what, in which unit.
PANELS = {
    "exact_match": ("Held-out exact match (%)", 100),
    "gt_logp_per_token": ("Held-out ground-truth log-prob\n(nats per token)", 1),
    "opponent_equals_gt": ("Opponent samples equal to\nthe ground truth (%)", 100),
    "reward_accuracy": ("Reward accuracy on held-out\npairs vs the opponent (%)", 100),
    "reward_margin": ("Reward margin on held-out pairs\n(beta x nats)", 1),
}
ARMS = (("spin", "o-", "SPIN"), ("sft", "s--", "continued SFT (baseline)"))


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots", file=sys.stderr)
        return None
    return plt


def _save(fig, path):
    if fig is None:
        return None
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    _pyplot().close(fig)
    return path


def _plain_axes(ax, xlabel):
    ax.set_xlabel(xlabel)
    ax.ticklabel_format(axis="y", style="plain", useOffset=False)  # no "1e-3 + 4.5e-1" corner labels
    ax.grid(alpha=0.3)


def _percent_axis(ax, values):
    """A percentage axis at least 5 points tall and within [0, 100], so that a flat 0% or 100%
    line does not sit in a window of negative or >100% ticks (its markers are drawn unclipped)."""
    lo, hi = min(values), max(values)
    extra = max(0.0, 5.0 - (hi - lo)) / 2 + 0.05 * max(hi - lo, 5.0)
    lo, hi = lo - extra, hi + extra
    shift = max(0.0, -lo) - max(0.0, hi - 100.0)
    ax.set_ylim(max(lo + shift, 0.0), min(hi + shift, 100.0))


def plot(rows, path, title=None):
    """Write eval_figure as a PNG; returns the path, or None when matplotlib is missing."""
    return _save(eval_figure(rows, title), path)


def plot_training(records, path, title=None):
    """Write training_figure as a PNG; returns the path, or None when matplotlib is missing or
    nothing has trained yet."""
    return _save(training_figure(records, title), path)


def eval_figure(rows, title=None):
    """The evaluation rows as one panel per metric over SPIN iterations (0 = the SFT start)."""
    plt = _pyplot()
    if plt is None:
        return None
    keys = [c[0] for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    iters = sorted({0} | {r["iteration"] for r in rows})
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.6), squeeze=False)
    start = next((r for r in reversed(rows) if r["arm"] == "start"), None)
    for ax, key in zip(axes[0], keys):
        name, scale = PANELS[key]
        shown = []
        for arm, style, label in ARMS:
            pts = dict(sorted((r["iteration"], r[key]) for r in rows if r["arm"] == arm and r.get(key) is not None))
            if not pts:  # an arm that did not run has no line and no legend entry
                continue
            if start is not None and start.get(key) is not None:
                pts[0] = start[key]
            xs = sorted(pts)
            ax.plot(xs, [pts[x] * scale for x in xs], style, label=label, clip_on=False)
            shown += [pts[x] * scale for x in xs]
        if scale == 100 and shown:
            _percent_axis(ax, shown)
        ax.set_title(name, fontsize=10)
        ax.set_xticks(iters)  # whole iterations, the same on every panel, even with one point
        ax.set_xlim(iters[0] - 0.3, iters[-1] + 0.3)
        _plain_axes(ax, "SPIN iteration (0 = SFT start)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    fig.suptitle(f"{title}: held-out metrics per iteration" if title else "Held-out metrics per iteration")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def step_records(records):
    """{stage: [step records in step order]}, the last record of a step winning (a resumed run
    repeats the steps since its checkpoint)."""
    last = {}
    for r in records:
        if r.get("type") == "step":
            last[(r["stage"], r["step"])] = r
    stages = {}
    for (stage, _), r in sorted(last.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        stages.setdefault(stage, []).append(r)
    return stages


def _stage_label(stage):
    if stage == "sft":
        return "SFT warm start"
    if stage.startswith("spin"):
        return f"SPIN iteration {int(stage[4:]) + 1}"
    return f"baseline, iteration {int(stage[3:]) + 1}"


def training_figure(records, title=None):
    """Per-step training curves from metrics.jsonl records: the SPIN loss, reward accuracy and
    margin of each SPIN iteration, and the cross-entropy of the SFT stages (warm start,
    baseline). None when nothing has trained yet."""
    stages = step_records(records)
    spin = [s for s in stages if s.startswith("spin")]
    sft = [s for s in stages if not s.startswith("spin")]
    panels = []  # (title, stages, key, scale)
    if spin:
        panels += [("SPIN loss (nats per pair)", spin, "loss", 1),
                   ("SPIN reward accuracy on\ntraining batches (%)", spin, "rewards/accuracies", 100),
                   ("SPIN reward margin on\ntraining batches (beta x nats)", spin, "rewards/margins", 1)]
    if sft:
        panels.append(("SFT loss (nats per token)", sft, "loss", 1))
    plt = _pyplot() if panels else None
    if plt is None:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels), 3.6), squeeze=False)
    for ax, (name, names, key, scale) in zip(axes[0], panels):
        for stage in sorted(names, key=lambda s: (len(s), s)):
            pts = [(r["step"], r[key] * scale) for r in stages[stage] if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), "-", lw=1.2, label=_stage_label(stage))
        ax.set_title(name, fontsize=10)
        _plain_axes(ax, "optimiser step of the stage")
        ax.legend(fontsize=7)
    fig.suptitle(f"{title}: training curves, per step" if title else "Training curves, per step")
    fig.tight_layout()
    return fig


def read_metrics(path):
    """The records of a metrics.jsonl. A line that is not a JSON object (a run killed while
    writing one, then resumed, leaves it in the middle) is skipped with a warning; a file with
    no record at all is refused."""
    with open(path, errors="replace") as f:
        lines = [(i, line) for i, line in enumerate(f, start=1) if line.strip()]
    records, bad = [], []
    for i, line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        if isinstance(rec, dict):
            records.append(rec)
        else:
            bad.append(i)
    if bad and not records:
        raise InputError(f"{path}: line {bad[0]}: not a JSON record, nor any other line; expected the metrics.jsonl "
                         "of a train.py run")
    if bad:
        print(f"{path}: skipped {len(bad)} line(s) that are not JSON records (first: line {bad[0]})", file=sys.stderr)
    return records


def main(argv=None):
    ap = ArgumentParser(description="Print a run's table from its metrics.jsonl (the last record of each "
                                    "evaluation wins, as after a resume); --plot also draws its figures.")
    ap.add_argument("metrics", help="runs/<run>/metrics.jsonl")
    ap.add_argument("--plot", action="store_true",
                    help="also write report.png (evaluations) and report_training.png (per-step curves) beside it")
    args = ap.parse_args(argv)
    path = args.metrics
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "metrics.jsonl")):
        path = os.path.join(path, "metrics.jsonl")  # the run folder itself
    if not os.path.isfile(path):
        raise MissingInput(f"{path}: no such file (expected runs/<run>/metrics.jsonl)")
    rows = read_metrics(path)
    evals = [r for r in rows if r.get("type") == "eval"]
    timing = next((r for r in reversed(rows) if r.get("type") == "timing"), None)
    if timing:
        timing = {k: v for k, v in timing.items() if k != "type"}
    if evals:
        print(table(evals, timing))
    else:
        print(f"{path}: no evaluation yet")
    if args.plot:
        folder = os.path.dirname(os.path.abspath(path))
        name = os.path.basename(folder)
        for png in (plot(evals, os.path.join(folder, "report.png"), name) if evals else None,
                    plot_training(rows, os.path.join(folder, "report_training.png"), name)):
            if png:
                print(f"plot {png}")


if __name__ == "__main__":  # python report.py runs/<run>/metrics.jsonl [--plot]
    run_command(main)
