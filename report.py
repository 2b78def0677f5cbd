"""The end-of-run report: a table of held-out metrics per iteration, SPIN beside continued SFT,
a plot of the same curves (report.png), and the per-step training curves of every stage
(report_training.png). Input: the records train.py writes to metrics.jsonl."""
import json
import os
import re
import sys

import numpy as np

from checkpoint import atomic_file
from errors import ArgumentParser, InputError, MissingInput, run_command
from t_interval import seed_t_interval

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


# The arms a run can hold (train.py's spin and sft; experiments/arms.py's ARMS), in the order
# the table and plots show them: (name, line style, label).
ARMS = (("spin", "o-", "SPIN"), ("sft", "s--", "continued SFT (baseline)"),
        ("spin_mix", "^-.", "SPIN, mixture reference"), ("spin_drop", "v:", "SPIN, correct samples dropped"),
        ("random_drop", "x:", "SPIN, as many random samples dropped"))
LABELS = {"start": "SFT start", **{a: label for a, _, label in ARMS}}
SWEPT = re.compile(r"spin_b([0-9.e+-]+)_lr([0-9.e+-]+)")  # the study's sweep arms (experiments/arms.py)


def label(arm):
    m = SWEPT.fullmatch(arm)
    return f"SPIN beta {m.group(1)}, lr {m.group(2)}" if m else LABELS.get(arm, arm)


def table(rows, timings=None):
    """rows: eval dicts with an arm ("start" or one of ARMS) and an iteration. Returns printable
    text: one line per iteration and arm, the arms of an iteration together."""
    cols = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    latest = {}
    for r in rows:  # a resumed run repeats rows: the last one wins
        latest[(r["iteration"], r["arm"])] = r
    order = {a: i for i, a in enumerate(["start"] + [a for a, _, _ in ARMS])}
    keys = sorted(latest, key=lambda k: (k[0], order.get(k[1], len(order))))
    head = ["iter", "arm"] + [h for _, h, _ in cols]
    lines = [[str(t), LABELS.get(arm, arm)] + [_cell(latest[(t, arm)], k, f) for k, _, f in cols] for t, arm in keys]
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 1 else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    out = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines]
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
    """A stage tag of metrics.jsonl (sft, spin0, sft1, spin_mix0, ...) in words."""
    if stage == "sft":
        return "SFT warm start"
    arm = stage.rstrip("0123456789")
    name = {"sft": "baseline"}.get(arm, LABELS.get(arm, arm))
    return f"{name}, iteration {int(stage[len(arm):]) + 1}"


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


# ----------------------------------------------------------------------------------------------
# A comparison of arms over seeds (experiments/compare.py's results file)

def _pct(x):
    return f"{100 * x['mean']:.1f} [{100 * x['lo']:.1f}, {100 * x['hi']:.1f}]"


def _diff(x):
    return f"{100 * x['mean']:+.1f} [{100 * x['lo']:+.1f}, {100 * x['hi']:+.1f}]"


def _row_name(key):  # "spin-2" -> "SPIN, iteration 2"
    arm, t = key.rsplit("-", 1)
    return "SFT start" if arm == "start" else f"{label(arm)}, iteration {t}"


def _seed_t(per_seed, signed=True):
    """The seed-level t interval (t_interval.seed_t_interval) in percent as text: '{lo, hi}'
    (signed for differences); '' for one seed."""
    iv = seed_t_interval(per_seed)
    if iv.n_seeds < 2:
        return ""
    f = "{:+.1f}" if signed else "{:.1f}"
    return "{" + f.format(100 * iv.lo) + ", " + f.format(100 * iv.hi) + "}"


def _per_seed_diff(res, a, b):
    """Per-seed paired differences a - b (each seed's mean over its prompts), from the arms' per-seed means."""
    arm_a, ta = a.rsplit("-", 1)
    arm_b, tb = ("start", "0") if b == "start" else b.rsplit("-", 1)
    return [x - y for x, y in zip(res["arms"][arm_a][ta]["per_seed"], res["arms"][arm_b][tb]["per_seed"])]


def comparison_table(res):
    """Markdown: each arm's held-out exact match per iteration with two 95% intervals (the two-level
    bootstrap over seeds and prompts, and the seed-level t interval), the paired differences against
    continued SFT and against the start with both intervals and the per-seed differences, McNemar per
    seed, and what SPIN trained on."""
    known = ["start"] + [a for a, _, _ in ARMS]
    arms = [a for a in known if a in res["arms"]] + sorted(a for a in res["arms"] if a not in known)
    iters = sorted({int(t) for a in arms for t in res["arms"][a]})
    S, lvl = len(res["seeds"]), int(100 * res["level"])
    out = [f"### {res['regime']}: held-out exact match (%), mean over {S} seed(s) x the held-out prompts "
           f"[{lvl}% seed-then-prompt bootstrap interval] {{{lvl}% seed-level t interval}}", ""]
    shown = arms if len(arms) <= 6 else ["start"] + [a for a in arms if a in known[1:]]
    out += ["| iteration | " + " | ".join(label(a) for a in shown) + " |", "|---" * (len(shown) + 1) + "|"]
    for t in iters:
        cells = [(_pct(res["arms"][a][str(t)]) + " " + _seed_t(res["arms"][a][str(t)]["per_seed"], signed=False)).strip()
                 if str(t) in res["arms"][a] else "" for a in shown]
        out.append(f"| {t} | " + " | ".join(cells) + " |")
    by = {}
    for d in res["differences"]:
        kind = "start" if d["b"] == "start" else "sft" if d["b"].startswith("sft-") else d["b"]
        by.setdefault(d["a"], {})[kind] = d
    rank = {a: i for i, a in enumerate(arms)}
    order = lambda k: (int(k.rsplit("-", 1)[1]), rank.get(k.rsplit("-", 1)[0], len(rank)))  # noqa: E731

    def cell(d):
        if d is None:
            return "", ""
        per = _per_seed_diff(res, d["a"], d["b"])
        return f"{_diff(d)} {_seed_t(per)}".strip(), ", ".join(f"{100 * v:+.1f}" for v in per)
    out += ["", f"Paired differences (percentage points) on the same seeds and prompts [{lvl}% paired seed-then-prompt "
            f"bootstrap interval: seeds resampled, then prompts within each] {{{lvl}% seed-level t interval over the "
            "per-seed differences}; an interval above 0 means the row's arm is better. Neither is corrected for the "
            "table's many comparisons: `python -m experiments.reanalyse` gives each difference's paired t test with "
            "Holm's correction, its minimum detectable effect, and the prompt-level tests (bootstrap over prompts "
            "within seeds, pooled McNemar).", "",
            "| arm | vs continued SFT (same iteration) | per seed | vs SFT start | per seed |", "|---|---|---|---|---|"]
    for a in sorted(by, key=order):
        if "sft" in by[a] or "start" in by[a]:
            c1, c2 = cell(by[a].get("sft")), cell(by[a].get("start"))
            out.append(f"| {_row_name(a)} | {c1[0]} | {c1[1]} | {c2[0]} | {c2[1]} |")
    extra = [(a, k, d) for a in sorted(by, key=order) for k, d in by[a].items() if k not in ("sft", "start")]
    if extra:
        out += ["", "| comparison | difference | per seed |", "|---|---|---|"]
        for a, k, d in extra:
            c = cell(d)
            out.append(f"| {_row_name(a)} - {_row_name(k)} | {c[0]} | {c[1]} |")
    out += sweep_table(res, by)
    last = max(iters)
    mc = [m for m in res["mcnemar"] if m["a"] == f"spin-{last}" and m["b"] == f"sft-{last}"]
    if mc:
        out += ["", f"McNemar, SPIN vs continued SFT at iteration {last}, per seed (prompts only SPIN got right / "
                "only SFT got right, exact two-sided p): " + "; ".join(
                    f"seed {m['seed']}: {m['a_only']} / {m['b_only']}, p = {m['p_value']:.3g}" for m in mc)]
    seeds = res["per_seed"]
    if seeds:
        out += ["", "Per seed: SFT start chosen at step " + ", ".join(str(s["sft_chosen_step"]) for s in seeds)
                + "; wall time " + ", ".join(f"{s['wall_s'] / 60:.1f} min" for s in seeds) + "."]
        keys = sorted({k for s in seeds for k in s["train_samples_correct"]}, key=order)
        rows = []
        for k in keys:
            c = [s["train_samples_correct"].get(k) for s in seeds]
            e = [s["train_samples_equal_gt"].get(k) for s in seeds]
            if all(v is not None for v in c + e):
                rows.append(f"| {_row_name(k)} | {100 * np.mean(c):.1f} | {100 * np.mean(e):.1f} |")
        if rows:
            out += ["", "What SPIN trained on, mean over seeds: the opponent's samples of the training prompts that the "
                    "task's verifier accepts (all samples, before spin_drop drops those), and the pairs trained on whose "
                    "sample equals the ground truth (their gradient is 0):", "",
                    "| arm | samples judged correct (%) | pairs with sample = ground truth (%) |", "|---|---|---|"] + rows
    return "\n".join(out)


def _flag(flags, name):
    """The value of the last `name` in a flag list (argparse keeps the last one), else None."""
    values = [v for k, v in zip(flags, flags[1:]) if k == name]
    return values[-1] if values else None


def sweep_table(res, by):
    """The study's sweep (spin_b<beta>_lr<lr> arms beside "spin"): per setting and iteration, SPIN -
    continued SFT and SPIN - start, each with both intervals. Every setting run is shown."""
    grid = {}
    beta0, lr0 = _flag(res["flags"], "--beta"), _flag(res["flags"], "--lr")
    for a in by:
        arm, t = a.rsplit("-", 1)
        m = SWEPT.fullmatch(arm)
        if m:
            grid[(float(m.group(1)), float(m.group(2)), int(t))] = a
        elif arm == "spin" and beta0 and lr0:
            grid[(float(beta0), float(lr0), int(t))] = a
    if len(grid) <= 2:
        return []
    out = ["", "The sweep, every setting run (rows: beta, lr; 'spin' is the demo's setting): SPIN - continued SFT and "
           "SPIN - SFT start in points [paired seed-then-prompt bootstrap] {seed-level t}:", "",
           "| beta | lr | iteration | SPIN (%) | SPIN - continued SFT | SPIN - start |", "|---|---|---|---|---|---|"]
    for (beta, lr, t), a in sorted(grid.items()):
        arm = a.rsplit("-", 1)[0]
        row = []
        for kind in ("sft", "start"):
            d = by[a].get(kind)
            row.append("" if d is None else f"{_diff(d)} {_seed_t(_per_seed_diff(res, d['a'], d['b']))}".strip())
        mean = 100 * res["arms"][arm][str(t)]["mean"]
        out.append(f"| {beta:g} | {lr:g} | {t} | {mean:.1f} | {row[0]} | {row[1]} |")
    return out


def comparison_figure(res):
    """Exact match per iteration, one line per arm, with the 95% intervals as error bars; the
    SFT start at iteration 0 with its band."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    start = res["arms"]["start"]["0"]
    ax.axhspan(100 * start["lo"], 100 * start["hi"], color="0.85", label="SFT start (95% interval)")
    arms = [(a, st, lab) for a, st, lab in ARMS if a in res["arms"]]
    for k, (arm, style, label) in enumerate(arms):
        pts = sorted((int(t), v) for t, v in res["arms"][arm].items())
        pts = [(0, start)] + pts
        x = [t + 0.06 * (k - (len(arms) - 1) / 2) for t, _ in pts]  # side by side, so the bars do not overlap
        y = [100 * v["mean"] for _, v in pts]
        err = [[100 * (v["mean"] - v["lo"]) for _, v in pts], [100 * (v["hi"] - v["mean"]) for _, v in pts]]
        ax.errorbar(x, y, yerr=err, fmt=style, capsize=3, label=label)
    iters = sorted({0} | {int(t) for a, _, _ in arms for t in res["arms"][a]})
    ax.set_xticks(iters)
    ax.set_ylabel("held-out exact match (%)")
    _plain_axes(ax, "SPIN iteration (0 = SFT start)")
    ax.legend(fontsize=8)
    ax.set_title(f"{res['regime']}: {len(res['seeds'])} seed(s), 95% bootstrap intervals over seeds and prompts",
                 fontsize=9)
    fig.tight_layout()
    return fig


def plot_comparison(res, path):
    return _save(comparison_figure(res), path)


def read_metrics(path):
    """The records of a metrics.jsonl. A line that is not a JSON object (a run killed while
    writing one, then resumed, leaves it in the middle) is skipped with a warning; a file with
    no record at all is refused."""
    with open(path, errors="replace") as f:
        lines = [(i, line) for i, line in enumerate(f, start=1) if line.strip()]
    if lines and not lines[-1][1].endswith("\n"):  # a run stopped mid-write: its torn last line
        try:
            json.loads(lines[-1][1])
        except json.JSONDecodeError:
            print(f"{path}: dropped a torn last line (line {lines[-1][0]}), left by a run stopped while writing it",
                  file=sys.stderr)
            lines.pop()
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
    ap.add_argument("metrics", help="runs/<run>/metrics.jsonl, or a comparison's experiments/results/REGIME.json")
    ap.add_argument("--plot", action="store_true",
                    help="also write report.png (evaluations) and report_training.png (per-step curves) beside it "
                         "(for a comparison: REGIME.png)")
    args = ap.parse_args(argv)
    path = args.metrics
    if path.endswith(".json") and os.path.isfile(path):  # experiments/compare.py's results
        with open(path) as f:
            res = json.load(f)
        if not isinstance(res, dict) or "arms" not in res:
            raise InputError(f"{path}: not a results file of experiments/compare.py (no 'arms')")
        print(comparison_table(res))
        if args.plot:
            png = plot_comparison(res, path[:-len(".json")] + ".png")
            print(f"plot {png}" if png else "")
        return
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
