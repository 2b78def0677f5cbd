"""Does SPIN beat the best that SFT can do? One command per regime, K seeds, one results file.

    python -m experiments.compare REGIME [--seeds 0,1,2] [--workers 2]
    python report.py experiments/results/REGIME.json        # the table again, and its plot

For each seed, one run of the study's entry point, experiments/arms.py (train.py's embedded demo
with the regime's task): SFT trained to its optimum on validation prompts (--sft-eval-every; the
best checkpoint kept), then from that same start every arm for --iterations iterations, at equal
optimiser steps per iteration and on the same training prompts:
    spin        the paper's loss against the previous iteration
    sft         continued SFT on the ground truth (the paper's baseline)
    spin_mix    SPIN against the geometric mixture p_start^alpha * p_t^(1-alpha) (spin_loss)
    spin_drop   SPIN without the pairs whose sample the task's verifier judges correct: tests the
                hypothesis that SPIN loses because it pushes down correct answers
(and, per regime, random_drop, spin_drop's control, and the sweep's spin_b<beta>_lr<lr> arms).
Each arm's greedy answers to the same held-out prompts are kept per prompt (eval/*.jsonl), so
arms are compared pair by pair: experiments/stats.py gives each arm's mean with a two-level
bootstrap interval (seeds, then prompts) and a seed-level t interval, the paired difference
SPIN - SFT and SPIN - start with both intervals and its per-seed values, and the exact McNemar
test per seed. Runs resume where they stopped: a
finished seed is read back, not rerun, and rerunning a seed from scratch gives the same figures.

Outputs: experiments/results/REGIME.json (every figure and the flags), REGIME.md (the table),
REGIME.png (the intervals; report.py draws it), REGIME.outcomes.json.gz (every held-out outcome;
`--recompute` rebuilds the rest from it). Runs go to experiments/runs/REGIME/seedS/.
The confirmation (factor5-1k-confirm, protocol experiments/CONFIRMATION.md) also scores every model
on the validation prompts (--score-val): those outcomes go into the outcomes file too, and its
pre-registered endpoints (experiments/confirm.py) into REGIME.json and REGIME.md; a run short of the
protocol's seeds is marked partial.
"""
import argparse
import gzip
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import report
from checkpoint import atomic_file, write_json
from errors import ArgumentParser, positive_int, run_command
from experiments import confirm, stats
from experiments.arms import swept_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARMS = ("spin", "sft", "spin_mix", "spin_drop")

# What every regime shares: the demo's model (0.36M parameters) and SPIN settings (EXPERIMENTS.md),
# SFT to the optimum on 500 validation prompts, 500 held-out prompts for the comparison.
COMMON = ["--eval-prompts", "500", "--val-prompts", "500", "--sft-lr", "1e-3", "--sft-eval-every", "100",
          "--sft-patience", "5", "--sft-select", "exact_match", "--arms", ",".join(ARMS), "--iterations", "2",
          "--beta", "2.0", "--lr", "3e-5", "--epochs", "3", "--max-new-tokens", "32", "--gen-batch-size", "256"]

# The sweep's SPIN settings other than the demo's (beta 2.0, lr 3e-5, the arm "spin").
SWEEP = [swept_name(b, lr) for b in (0.5, 2.0, 5.0) for lr in (1e-5, 3e-5, 1e-4) if (b, lr) != (2.0, 3e-5)]

# The confirmation's arms: continued SFT at two lrs, SPIN at beta 5 and 10 (lr 1e-5), and SPIN at beta 5
# without the pairs whose sample equals the ground truth (no verifier).
CONFIRM_ARMS = ["sft_lr1e-05", "sft_lr3e-05", swept_name(5.0, 1e-5), swept_name(10.0, 1e-5), "spin_eqdrop_b5_lr1e-05"]

# Regimes where SFT stops below perfect held-out accuracy (experiments/EXPLORATION.md): the task,
# its size, how many training examples, the SFT budget.
REGIMES = {
    "factor4": ["--task", "factor", "--task-digits", "4", "--num-prompts", "1000", "--sft-steps", "3000"],
    "factor5": ["--task", "factor", "--task-digits", "5", "--num-prompts", "2000", "--sft-steps", "3000"],
    "anyorder3": ["--task", "addition_anyorder", "--task-digits", "3", "--num-prompts", "600", "--sft-steps", "3000"],
    # A control: SFT memorises 250 examples (held-out 80-87%, training 100%); nearly every sample
    # equals the ground truth, so SPIN should have almost nothing to learn from.
    "addition3-250": ["--task", "addition", "--task-digits", "3", "--num-prompts", "250", "--batch-size", "50", "--micro-batch-size", "25",
                      "--sft-lr", "3e-3", "--sft-steps", "3000"],
    # The sweep (issue 26): SPIN at beta {0.5, 2, 5} x lr {1e-5, 3e-5, 1e-4} from each seed's one SFT start
    # ("spin" is the grid's beta 2, lr 3e-5), continued SFT, and spin_drop beside its random-drop control.
    "factor4-sweep": ["--task", "factor", "--task-digits", "4", "--num-prompts", "1000", "--sft-steps", "3000",
                      "--arms", ",".join(["sft", "spin", *SWEEP, "spin_drop", "random_drop"])],
    # A second regime whose start more SFT does not improve (a plateau; EXPLORATION.md, factor4-2000-lr1e-3).
    "factor4-2k-sweep": ["--task", "factor", "--task-digits", "4", "--num-prompts", "2000", "--sft-steps", "3000",
                         "--arms", ",".join(["sft", "spin", *SWEEP])],
    # Candidates for a regime whose start more SFT does not improve (factor4-2k's does: its continued SFT
    # gained 4 points on seed 0): factor5 with 1000 examples (run: continued SFT - start -1.4, -2.0 points,
    # EXPERIMENTS.md), and any-order addition with 1200 (defined, stopped during its first SFT, not run).
    "factor5-1k-sweep": ["--task", "factor", "--task-digits", "5", "--num-prompts", "1000", "--sft-steps", "3000",
                         "--arms", ",".join(["sft", "spin", *SWEEP])],
    "anyorder3-1200-sweep": ["--task", "addition_anyorder", "--task-digits", "3", "--num-prompts", "1200",
                             "--sft-steps", "3000", "--arms", ",".join(["sft", "spin", *SWEEP])],
    # The confirmation (issue 37; protocol: experiments/CONFIRMATION.md, committed before it ran): factor5-1k
    # on fresh seeds 5-14, 4 iterations, every model also scored on the validation prompts.
    "factor5-1k-confirm": ["--task", "factor", "--task-digits", "5", "--num-prompts", "1000", "--sft-steps", "3000",
                           "--iterations", "4", "--score-val", "--arms", ",".join(CONFIRM_ARMS)],
    # Seconds long, for the test suite: the machinery, not an experiment (its flags override COMMON's).
    "smoke": ["--task", "addition_anyorder", "--task-digits", "2", "--num-prompts", "96", "--eval-prompts", "24",
              "--val-prompts", "24", "--sft-steps", "20", "--sft-lr", "3e-3", "--sft-eval-every", "10",
              "--batch-size", "16", "--micro-batch-size", "8", "--demo-dim", "32", "--demo-layers", "1",
              "--max-new-tokens", "12", "--lr", "1e-4", "--beta", "0.5", "--gen-batch-size", "64",
              "--arms", "spin,sft,spin_mix,spin_drop,random_drop,spin_b1_lr0.0003"],
}


def run_seed(regime, seed, runs, threads):
    """One run of experiments.arms; resumed if a previous attempt stopped; a finished one is left as it is."""
    out = os.path.join(runs, regime, f"seed{seed}")
    if finished(out):
        return out
    flags = COMMON + REGIMES[regime] + ["--seed", str(seed), "--out", out]
    if os.path.exists(os.path.join(out, "config.json")):
        flags.append("--resume")
    env = dict(os.environ, SPIN_THREADS=str(threads), PYTHONPATH=ROOT)
    env.pop("WORLD_SIZE", None)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    t0 = time.time()
    with open(out + ".log", "a") as log:
        p = subprocess.run([sys.executable, "-m", "experiments.arms", *flags], cwd=ROOT, env=env, stdout=log,
                           stderr=log)
    if os.path.isdir(out):  # every attempt's wall time, a failed or resumed one too
        with open(os.path.join(out, "compare_wall_s.txt"), "a") as f:
            f.write(f"{time.time() - t0:.1f}\n")
    if p.returncode != 0:
        raise SystemExit(f"{regime} seed {seed}: experiments.arms failed ({p.returncode}); see {out}.log")
    return out


def finished(out):
    path = os.path.join(out, "metrics.jsonl")
    return os.path.exists(path) and any('"type": "timing"' in line for line in open(path))


def seed_wall_s(out, recs):
    """The seed's wall time, summed over its attempts (a killed or failed one, then its resume),
    read from the run folder, so a seed read back quotes what it took when it ran. Runs made
    before attempts were recorded: the stage timings of the process that finished it."""
    path = os.path.join(out, "compare_wall_s.txt")
    if os.path.exists(path):
        with open(path) as f:
            return sum(float(line) for line in f if line.strip())
    timing = next(r for r in reversed(recs) if r["type"] == "timing")
    return sum(v for k, v in timing.items() if k != "type")


def outcomes(out):
    """{(arm, iteration): (P,) 0/1 held-out exact match per prompt} of one run, and its records."""
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    got = {}
    for r in recs:
        if r["type"] == "eval":
            name = f"{r['arm']}-{r['iteration']}"
            with open(os.path.join(out, "eval", f"{name}.jsonl")) as f:
                got[(r["arm"], r["iteration"])] = np.array([json.loads(line)["exact"] for line in f], dtype=np.int8)
    return got, recs


def validation_outcomes(out, recs):
    """{(arm, iteration): (P,) 0/1 exact match per validation prompt} of one run (--score-val)."""
    got = {}
    for r in recs:
        if r["type"] == "val_eval":
            with open(os.path.join(out, "eval", f"val-{r['arm']}-{r['iteration']}.jsonl")) as f:
                got[(r["arm"], r["iteration"])] = np.array([json.loads(line)["exact"] for line in f], dtype=np.int8)
    return got


def load_validation(regime, seeds, runs, recs_of):
    """{(arm, iteration): (S, P) validation outcomes} over what every seed scored ({} without --score-val)."""
    per_seed = [validation_outcomes(os.path.join(runs, regime, f"seed{s}"), recs) for s, recs in zip(seeds, recs_of)]
    keys = sorted(set.intersection(*(set(o) for o in per_seed)), key=lambda k: (k[1], k[0]))
    return {k: np.stack([o[k] for o in per_seed]) for k in keys}


def load_matrices(regime, seeds, runs):
    """{(arm, iteration): (S, P) outcomes} over the arms every seed ran, and each seed's records."""
    per_seed = [outcomes(os.path.join(runs, regime, f"seed{s}")) for s in seeds]
    keys = sorted(set.intersection(*(set(o) for o, _ in per_seed)), key=lambda k: (k[1], k[0]))
    return {k: np.stack([o[k] for o, _ in per_seed]) for k in keys}, [recs for _, recs in per_seed]


# Paired comparisons beyond "each SPIN arm vs continued SFT and vs the start": (a, b) at every iteration.
EXTRA_PAIRS = [("spin_drop", "random_drop")]


def _difference(x, y, a, b, n_boot):
    d = stats.paired_difference(x, y, n_boot=n_boot, seed=0)
    per_seed = (x.mean(1) - y.mean(1)).tolist()  # paired: the mean of differences is the difference of means
    t = stats.seed_t_interval(per_seed)
    return {"a": a, "b": b, "mean": d.mean, "lo": d.lo, "hi": d.hi, "seed_lo": t.lo, "seed_hi": t.hi,
            "per_seed": per_seed}


# The seeds a pre-registered regime's protocol names: its results are marked partial until all have run.
PLANNED_SEEDS = {"factor5-1k-confirm": list(range(5, 15))}


def summarise_matrix(regime, seeds, matrix, n_boot=10000, validation=None):
    """Every interval, difference and test from the outcome matrices alone (so a results file's
    committed outcomes reproduce it: --recompute). With validation outcomes (--score-val) of the
    confirmation's arms, its pre-registered endpoints too (experiments/confirm.py)."""
    start = matrix[("start", 0)]
    res = {"regime": regime, "flags": COMMON + REGIMES[regime], "seeds": list(seeds), "n_boot": n_boot,
           "level": 0.95, "arms": {}, "differences": [], "mcnemar": [], "per_seed": []}
    planned = PLANNED_SEEDS.get(regime)
    if planned and sorted(seeds) != planned:
        res["partial"] = f"{len(seeds)} of the {len(planned)} seeds the protocol names: no conclusion"
    if validation and all(k in validation for k in confirm.candidates()) and len(seeds) >= 2:
        res["confirmation"] = confirm.analyse(matrix, validation, n_boot)
        if res.get("partial"):  # the decision rule applies to the protocol's seeds only
            for row in res["confirmation"]["primary"]:
                row["verdict"] = "none: partial, the protocol's seeds have not all run"
    for (arm, t), x in matrix.items():
        iv, st = stats.bootstrap_mean(x, n_boot=n_boot, seed=0), stats.seed_t_interval(x.mean(1))
        res["arms"].setdefault(arm, {})[str(t)] = {"mean": iv.mean, "lo": iv.lo, "hi": iv.hi, "seed_lo": st.lo,
                                                   "seed_hi": st.hi, "per_seed": x.mean(1).tolist()}
    # SPIN (each variant) against continued SFT at the same iteration, and against the start.
    # Continued SFT against the start too: whether more SFT still helps (the start should be its optimum).
    pairs = [((arm, t), (other, y)) for (arm, t) in matrix if arm != "start"
             for other, y in ((f"sft-{t}", matrix.get(("sft", t))), ("start", start))
             if y is not None and not (arm == "sft" and other.startswith("sft-"))]
    pairs += [((a, t), (f"{b}-{t}", matrix[(b, t)])) for a, b in EXTRA_PAIRS
              for (arm, t) in list(matrix) if arm == a and (b, t) in matrix]
    for (arm, t), (other, y) in pairs:
        x = matrix[(arm, t)]
        res["differences"].append(_difference(x, y, f"{arm}-{t}", other, n_boot))
        for s, seed in enumerate(seeds):
            m = stats.mcnemar(x[s], y[s])
            res["mcnemar"].append({"a": f"{arm}-{t}", "b": other, "seed": seed, "both": m.both,
                                   "a_only": m.a_only, "b_only": m.b_only, "neither": m.neither,
                                   "p_value": m.p_value})
    return res


def summarise(regime, seeds, runs, n_boot=10000):
    matrix, recs_of = load_matrices(regime, seeds, runs)
    validation = load_validation(regime, seeds, runs, recs_of)
    res = summarise_matrix(regime, seeds, matrix, n_boot, validation)
    for seed, recs in zip(seeds, recs_of):
        chosen = next((r for r in recs if r["type"] == "sft_chosen"), {})
        wall = seed_wall_s(os.path.join(runs, regime, f"seed{seed}"), recs)
        evals = {f"{r['arm']}-{r['iteration']}": r for r in recs if r["type"] == "eval"}
        res["per_seed"].append({
            "seed": seed, "sft_chosen_step": chosen.get("step"), "wall_s": wall,
            "train_samples_correct": {k: v.get("train_samples_correct") for k, v in evals.items() if k.startswith("spin")},
            "train_samples_equal_gt": {k: v.get("train_samples_equal_gt") for k, v in evals.items() if k.startswith("spin")},
            "gt_logp_per_token": {k: v["gt_logp_per_token"] for k, v in evals.items()}})
    return res, matrix, validation


def _rows(matrix):
    return {f"{a}-{t}": ["".join(map(str, row.tolist())) for row in x] for (a, t), x in matrix.items()}


def _matrix(rows_of):
    matrix = {}
    for key, rows in rows_of.items():
        arm, t = key.rsplit("-", 1)
        matrix[(arm, int(t))] = np.array([[int(c) for c in row] for row in rows], dtype=np.int8)
    return matrix


def write_outcomes(path, seeds, matrix, validation=None):
    """Every held-out outcome, one string of 0/1 per arm, iteration and seed (gzip: ~5 KB per arm);
    with --score-val, every validation outcome too ("validation")."""
    doc = {"seeds": list(seeds), "outcomes": _rows(matrix)}
    if validation:
        doc["validation"] = _rows(validation)
    with atomic_file(path, "wb") as f:
        f.write(gzip.compress(json.dumps(doc).encode(), mtime=0))


def read_outcomes(path):
    with gzip.open(path, "rt") as f:
        doc = json.load(f)
    return doc["seeds"], _matrix(doc["outcomes"])


def read_validation(path):
    """The validation outcomes of an outcomes file ({} when its run did not score them)."""
    with gzip.open(path, "rt") as f:
        return _matrix(json.load(f).get("validation", {}))


def seed_list(text):
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0 or len(set(seeds)) < len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of distinct seeds >= 0, e.g. 0,1,2")
    return seeds


def main(argv=None):
    ap = ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("regime", choices=sorted(REGIMES))
    ap.add_argument("--seeds", type=seed_list, default=[0, 1, 2], help="comma list of seeds")
    ap.add_argument("--workers", type=positive_int, default=1, help="seeds run at once, each with --threads threads")
    ap.add_argument("--threads", type=positive_int, default=None, help="threads per run (default: the cores / workers)")
    ap.add_argument("--runs", default=os.path.join(ROOT, "experiments", "runs"))
    ap.add_argument("--results", default=os.path.join(ROOT, "experiments", "results"))
    ap.add_argument("--recompute", action="store_true",
                    help="recompute every interval and test from the committed RESULTS/REGIME.outcomes.json.gz "
                         "(no run needed); the per-seed facts (SFT step, wall time) are kept from REGIME.json")
    a = ap.parse_args(argv)
    base = os.path.join(a.results, a.regime)
    if a.recompute:
        if not os.path.exists(base + ".outcomes.json.gz"):
            raise SystemExit(f"{base}.outcomes.json.gz: not found; --recompute needs a regime's committed outcomes")
        seeds, matrix = read_outcomes(base + ".outcomes.json.gz")
        res = summarise_matrix(a.regime, seeds, matrix, validation=read_validation(base + ".outcomes.json.gz"))
        with open(base + ".json") as f:
            res["per_seed"] = json.load(f)["per_seed"]
    else:
        seeds = a.seeds
        threads = a.threads or max(1, (os.cpu_count() or 1) // a.workers)
        with ThreadPoolExecutor(a.workers) as pool:
            list(pool.map(lambda s: run_seed(a.regime, s, a.runs, threads), seeds))
        res, matrix, validation = summarise(a.regime, seeds, a.runs)
        write_outcomes(base + ".outcomes.json.gz", seeds, matrix, validation)
    write_json(base + ".json", res, indent=1)
    text = report.comparison_table(res)
    if res.get("partial"):
        text = f"**PARTIAL: {res['partial']}.**\n\n" + text
    if res.get("confirmation"):
        text += "\n" + confirm.table(res["confirmation"], res["seeds"])
    with atomic_file(base + ".md") as f:
        f.write(text + "\n")
    print(text)
    png = report.plot_comparison(res, base + ".png")
    print(f"results: {base}.json, {base}.md" + (f", {png}" if png else ""))


if __name__ == "__main__":  # python -m experiments.compare REGIME, from the repository root
    run_command(main)
