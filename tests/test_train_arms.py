"""The study's entry point, experiments/arms.py (issue 15): SFT chosen on validation prompts, and the
arms spin, sft, spin_mix, spin_drop from that one start, each with per-example held-out outcomes."""
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--num-prompts", "128", "--eval-prompts", "32", "--val-prompts", "32", "--sft-steps", "40", "--sft-lr", "3e-3",
         "--sft-eval-every", "10", "--sft-patience", "2", "--iterations", "2", "--batch-size", "16",
         "--micro-batch-size", "8", "--demo-dim", "32", "--demo-layers", "1", "--max-new-tokens", "12",
         "--ckpt-every", "3", "--lr", "1e-4", "--beta", "0.5", "--gen-batch-size", "64", "--task", "addition_anyorder",
         "--task-digits", "2", "--arms", "spin,sft,spin_mix,spin_drop"]


def run(out, *extra, faults=(), check=True):
    """experiments.arms, or through tests/faults.py with its fault flags."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    env.pop("WORLD_SIZE", None)
    entry = ["-m", "tests.faults", *faults, "--entry", "experiments.arms", "--"] if faults else ["-m", "experiments.arms"]
    p = subprocess.run([sys.executable, *entry, "--out", str(out), *FLAGS, *extra], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    if check and p.returncode != 0:
        raise AssertionError(f"experiments.arms failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def records(out, kind):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["type"] == kind]


@pytest.fixture(scope="module")
def arms_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("arms") / "run"
    run(out)
    return out


def test_sft_is_chosen_on_validation_prompts(arms_run):
    """Every --sft-eval-every steps the model is scored on the validation prompts; the kept model
    is the best by exact match (ties: likelihood), and training stops --sft-patience scores after it."""
    scores = records(arms_run, "sft_select")
    history = json.load(open(arms_run / "sft" / "selection.json"))
    assert [h["step"] for h in history] == [r["step"] for r in scores] and scores[0]["step"] == 10
    best = max(history, key=lambda h: (h["exact_match"], h["gt_logp_per_token"], -h["step"]))
    assert history[-1]["step"] == 40 or history[-1]["step"] - best["step"] == 2 * 10
    chosen = records(arms_run, "sft_chosen")
    assert [c["step"] for c in chosen] == [best["step"]]
    assert all(r["eval_examples"] == 32 for r in scores)  # the validation prompts, not the held-out ones
    steps = [r for r in records(arms_run, "step") if r["stage"] == "sft"]
    assert max(r["step"] for r in steps) == history[-1]["step"]
    assert sorted(os.listdir(arms_run / "sft")) == ["model", "selection.json"]  # candidates and checkpoints gone


def test_every_arm_runs_from_one_start_with_equal_steps(arms_run):
    evals = {(r["arm"], r["iteration"]): r for r in records(arms_run, "eval")}
    assert set(evals) == {("start", 0)} | {(a, t) for a in ("spin", "sft", "spin_mix", "spin_drop") for t in (1, 2)}
    for t in (1, 2):  # the same number of optimiser steps in every arm at an iteration
        assert len({evals[(a, t)]["steps"] for a in ("spin", "sft", "spin_mix", "spin_drop")}) == 1
    steps = {}
    for r in records(arms_run, "step"):
        steps.setdefault(r["stage"], {})[r["step"]] = r
    for arm, t in [("spin", 0), ("spin", 1), ("spin_drop", 0), ("spin_drop", 1), ("spin_mix", 0)]:
        first = steps[f"{arm}{t}"][1]  # theta = theta_t = the reference at the first step: log 2
        assert abs(first["loss"] - math.log(2)) < 1e-4, (arm, t)
    # From iteration 1 the mixture reference is not p_t, so its first loss is not log 2.
    assert abs(steps["spin_mix1"][1]["loss"] - math.log(2)) > 1e-3
    # At iteration 0 the mixture of the SFT start with p_0 = the SFT start is p_0 itself: spin_mix
    # trains as spin does there (up to the float rounding of rescoring the base log-probs).
    for s in steps["spin0"]:
        assert abs(steps["spin0"][s]["loss"] - steps["spin_mix0"][s]["loss"]) < 1e-4
    # spin_drop trains on exactly the pairs whose sample the verifier rejects.
    for t in (1, 2):
        kept, spin = evals[("spin_drop", t)], evals[("spin", t)]
        assert kept["train_pairs"] < spin["train_pairs"] or spin["train_samples_correct"] == 0
    assert evals[("spin_drop", 1)]["train_pairs"] == round(
        evals[("spin", 1)]["train_pairs"] * (1 - evals[("spin", 1)]["train_samples_correct"]))


def test_per_example_outcomes_agree_with_the_table(arms_run):
    """eval/<arm>-<iteration>.jsonl: one line per held-out prompt, whose mean is the table's figure
    (what the paired statistics of experiments/stats.py are computed from)."""
    evals = {(r["arm"], r["iteration"]): r for r in records(arms_run, "eval")}
    for (arm, t), row in evals.items():
        lines = [json.loads(x) for x in open(arms_run / "eval" / f"{arm}-{t}.jsonl")]
        assert [x["index"] for x in lines] == list(range(len(lines))) and len(lines) == row["eval_examples"] == 32
        assert sum(x["exact"] for x in lines) / len(lines) == pytest.approx(row["exact_match"])
        gt = sum(x["gt_logp"] for x in lines) / sum(x["gt_tokens"] for x in lines)
        assert gt == pytest.approx(row["gt_logp_per_token"], rel=1e-9)


def test_selection_resumes_where_it_was_killed(arms_run, tmp_path):
    """Killed in the middle of the SFT selection, a --resume ends with the same choice and the same
    SPIN losses as the uninterrupted run."""
    out = tmp_path / "killed"
    # One arm, one iteration after the selection: what the kill interrupts is the SFT selection, and
    # the SPIN stage that follows it shows that the resumed start is the same model.
    fewer = ["--arms", "spin", "--iterations", "1"]
    p = run(out, *fewer, faults=["--kill-at", "sft:25"], check=False)
    assert p.returncode != 0 and not (out / "sft" / "model").exists()
    run(out, *fewer, "--resume")
    assert json.load(open(out / "sft" / "selection.json")) == json.load(open(arms_run / "sft" / "selection.json"))
    want = {(r["stage"], r["step"]): r["loss"] for r in records(arms_run, "step")}
    got = {(r["stage"], r["step"]): r["loss"] for r in records(out, "step")}
    assert {s for s, _ in got} == {"sft", "spin0"}, sorted({s for s, _ in got})
    assert got == {k: want[k] for k in got}


@pytest.mark.parametrize("flags, message", [
    (["--arms", "spin,foo"], "--arms"),
    (["--arms", "spin", "--baseline", "1"], "--arms and --baseline"),
    (["--sft-eval-every", "10", "--val-prompts", "0"], "--val-data"),
])
def test_comparison_flags_are_checked(flags, message, tmp_path):
    p = subprocess.run([sys.executable, "-m", "experiments.arms", "--out", str(tmp_path / "x"), *flags], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and message in p.stderr


def test_selection_rules():
    from experiments.arms import best_candidate, patience_out
    h = [{"step": 10, "exact_match": 0.2, "gt_logp_per_token": -1.0},
         {"step": 20, "exact_match": 0.5, "gt_logp_per_token": -0.9},
         {"step": 30, "exact_match": 0.5, "gt_logp_per_token": -0.8},  # tie in exact match: likelier wins
         {"step": 40, "exact_match": 0.4, "gt_logp_per_token": -0.7},
         {"step": 50, "exact_match": 0.5, "gt_logp_per_token": -0.8}]  # a full tie: the earlier wins
    assert best_candidate(h, "exact_match")["step"] == 30
    assert best_candidate(h, "gt_logp_per_token")["step"] == 40
    assert patience_out(h[:4], "exact_match", 1) and not patience_out(h[:4], "exact_match", 2)
    assert patience_out(h, "exact_match", 2) and not patience_out(h, "exact_match", 3)
    assert not patience_out(h[:2], "exact_match", 5)


def test_spin_drop_keeps_exactly_the_rejected_samples():
    from data.readers import Example
    from data.task import make_task, score
    from experiments.arms import judged_wrong
    train, _ = make_task(seed=3, n_train=40, n_heldout=0, digits=3, kind="factor")
    # half the samples are the ground truth (correct), half a wrong product
    exs = [Example(e.prompt, e.response, e.response if i % 2 else "2*2") for i, e in enumerate(train)]
    kept = judged_wrong(exs)
    assert kept == [e for i, e in enumerate(exs) if i % 2 == 0]
    assert all(not score(e.prompt, e.generated) for e in kept)


def test_spin_drop_fills_a_batch_with_few_pairs():
    from experiments.arms import fill_one_batch
    few = list(range(14))
    filled = fill_one_batch(few, 64)
    assert len(filled) == 70 and all(filled.count(i) == 5 for i in few)
    assert fill_one_batch(list(range(64)), 64) == list(range(64))
    assert fill_one_batch([], 64) == []


def test_random_drop_keeps_as_many_pairs_as_spin_drop_at_random():
    from data.readers import Example
    from data.task import make_task
    from experiments.arms import judged_wrong, random_drop
    train, _ = make_task(seed=4, n_train=60, n_heldout=0, digits=3, kind="factor")
    exs = [Example(e.prompt, e.response, e.response if i % 3 else "2*2") for i, e in enumerate(train)]
    kept = random_drop(7)(exs)
    assert len(kept) == len(judged_wrong(exs)) == 20
    assert kept == [e for e in exs if e in kept]  # a subset, in the data's order
    assert kept == random_drop(7)(exs) and kept != random_drop(8)(exs)  # the seed decides, nothing else
    assert kept != judged_wrong(exs)  # chosen without the verifier (1 in C(60, 20) to coincide)


def test_swept_arm_names():
    from experiments.arms import arm_list, swept_name, swept_setting
    assert swept_name(0.5, 1e-5) == "spin_b0.5_lr1e-05" and swept_setting("spin_b0.5_lr1e-05") == (0.5, 1e-5)
    assert swept_setting("spin_b5_lr0.0001") == (5.0, 1e-4)
    for bad in ("spin_b0_lr1e-5", "spin_b1_lr", "spin_bx_lr1", "spin_b1_lr1e-5x", "spin_b-1_lr1e-5"):
        assert swept_setting(bad) is None, bad
    assert arm_list("sft,spin_b2_lr0.0001,random_drop") == ["sft", "spin_b2_lr0.0001", "random_drop"]
    with pytest.raises(Exception, match="spin_b<beta>_lr<lr>"):
        arm_list("spin,spin_b1_lrfoo")


def test_confirmation_arm_names():
    from experiments.arms import arm_list, eqdrop_setting, sft_lr_setting
    assert sft_lr_setting("sft_lr1e-05") == 1e-5 and sft_lr_setting("sft_lr3e-05") == 3e-5
    assert eqdrop_setting("spin_eqdrop_b5_lr1e-05") == (5.0, 1e-5)
    for bad in ("sft_lr0", "sft_lr", "sft_lrx", "sft_lr-1e-5", "sft", "spin_b5_lr1e-05"):
        assert sft_lr_setting(bad) is None, bad
    for bad in ("spin_eqdrop_b0_lr1e-5", "spin_eqdrop_b5", "spin_eqdrop_b5_lrx", "spin_drop"):
        assert eqdrop_setting(bad) is None, bad
    assert arm_list("sft_lr1e-05,spin_eqdrop_b5_lr1e-05,spin_b10_lr1e-05") == [
        "sft_lr1e-05", "spin_eqdrop_b5_lr1e-05", "spin_b10_lr1e-05"]
    with pytest.raises(Exception, match="sft_lr<lr>"):
        arm_list("sft_lrfoo")


def test_eqdrop_keeps_exactly_the_pairs_that_carry_gradient():
    """unequal_to_truth drops a pair iff its sample is the ground truth's string (equal strings, equal
    tokens: the pairs whose SPIN loss has no gradient; the run's train_samples_equal_gt of the arm
    reads 0), with no verifier: a correct answer written another way stays."""
    from data.readers import Example
    from data.task import make_task, score
    from experiments.arms import unequal_to_truth
    train, _ = make_task(seed=3, n_train=30, n_heldout=0, digits=4, kind="factor")
    exs = []
    for i, e in enumerate(train):
        a, b = e.response.rsplit("*", 1) if "*" in e.response else (e.response, None)
        other = f"{b}*{a}" if b is not None and a != b else "2*2"  # correct written another way, or not
        exs.append(Example(e.prompt, e.response, e.response if i % 3 == 0 else other))
    kept = unequal_to_truth(exs)
    assert kept == [e for i, e in enumerate(exs) if i % 3]
    assert any(score(e.prompt, e.generated) for e in kept)  # the verifier would have dropped these too


def test_confirmation_arms_with_validation_scores(tmp_path):
    """The confirmation's arms (issue 37) from one start, at equal steps, each model scored on the
    validation prompts too (--score-val): per prompt, beside the held-out outcomes."""
    out = tmp_path / "run"
    run(out, "--arms", "sft_lr1e-05,spin_b5_lr1e-05,spin_eqdrop_b5_lr0.0001", "--iterations", "1", "--score-val")
    evals = {(r["arm"], r["iteration"]): r for r in records(out, "eval")}
    vals = {(r["arm"], r["iteration"]): r for r in records(out, "val_eval")}
    assert set(vals) == set(evals) == {("start", 0), ("sft_lr1e-05", 1), ("spin_b5_lr1e-05", 1),
                                       ("spin_eqdrop_b5_lr0.0001", 1)}
    assert len({evals[k]["steps"] for k in evals if k[0] != "start"}) == 1  # equal steps
    assert evals[("spin_eqdrop_b5_lr0.0001", 1)]["train_samples_equal_gt"] == 0
    for (arm, t), row in vals.items():
        lines = [json.loads(x) for x in open(out / "eval" / f"val-{arm}-{t}.jsonl")]
        assert len(lines) == row["eval_examples"] == 32  # the validation prompts
        assert sum(x["exact"] for x in lines) / 32 == pytest.approx(row["exact_match"])
    log = (out / "metrics.jsonl").read_text()
    steps = {r["stage"] for r in records(out, "step")}
    assert {"sft_lr1e-050", "spin_b5_lr1e-050", "spin_eqdrop_b5_lr0.00010"} <= steps and log
    lrs = {r["stage"]: r.get("lr") for r in records(out, "step") if r["step"] == 1}
    assert lrs.get("sft_lr1e-050") is None or lrs["sft_lr1e-050"] <= 1e-5  # its own lr (warmup starts below it)
