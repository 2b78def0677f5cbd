"""experiments/compare.py end to end on its seconds-long "smoke" regime: one command runs the
seeds, writes one results file and one table, and reruns give the same figures."""
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def compare(tmp_path, *extra):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("WORLD_SIZE", None)
    p = subprocess.run([sys.executable, "-m", "experiments.compare", "smoke", "--seeds", "0,1", "--threads", "1",
                        "--workers", "2", "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results"), *extra],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return p, json.load(open(tmp_path / "results" / "smoke.json"))


def test_one_command_results_and_reruns(tmp_path):
    p, res = compare(tmp_path)
    assert res["seeds"] == [0, 1] and set(res["arms"]) == {"start", "spin", "sft", "spin_mix", "spin_drop",
                                                           "random_drop", "spin_b1_lr0.0003"}
    for arm, by_t in res["arms"].items():
        for t, v in by_t.items():
            assert v["lo"] <= v["mean"] <= v["hi"] and len(v["per_seed"]) == 2
            assert v["seed_lo"] <= v["mean"] <= v["seed_hi"] or v["seed_lo"] == v["seed_hi"]  # both seeds equal
    pairs = {(d["a"], d["b"]) for d in res["differences"]}
    assert ("spin-2", "sft-2") in pairs and ("spin-2", "start") in pairs and ("spin_drop-1", "sft-1") in pairs
    assert ("sft-2", "start") in pairs and not any(a.startswith("sft-") and b.startswith("sft-") for a, b in pairs)
    assert ("spin_drop-2", "random_drop-2") in pairs and ("spin_b1_lr0.0003-2", "sft-2") in pairs
    for d in res["differences"]:  # the per-seed differences are the arms' per-seed means subtracted
        a, ta = d["a"].rsplit("-", 1)
        b, tb = ("start", "0") if d["b"] == "start" else d["b"].rsplit("-", 1)
        want = [x - y for x, y in zip(res["arms"][a][ta]["per_seed"], res["arms"][b][tb]["per_seed"])]
        assert d["per_seed"] == pytest.approx(want, abs=1e-12)
    # the swept arm trained at its own beta and lr, the others at the run's
    log = (tmp_path / "runs" / "smoke" / "seed0.log").read_text()
    assert "[spin_b1_lr0.00030] beta 1, lr 0.0003" in log and "[spin0] beta 0.5, lr 0.0001" in log
    assert {m["seed"] for m in res["mcnemar"]} == {0, 1}
    table = (tmp_path / "results" / "smoke.md").read_text()
    assert "Paired differences" in table and "SPIN, iteration 2" in table and table.strip() in p.stdout
    assert (tmp_path / "results" / "smoke.png").stat().st_size > 0
    # Finished seeds are read back, not rerun; a seed run again from scratch gives the same figures.
    _, again = compare(tmp_path)
    shutil.rmtree(tmp_path / "runs" / "smoke" / "seed1")
    _, rerun = compare(tmp_path)
    for r in (again, rerun):
        assert r["arms"] == res["arms"] and r["differences"] == res["differences"] and r["mcnemar"] == res["mcnemar"]
    # the committed per-prompt outcomes alone reproduce every interval and test
    os.rename(tmp_path / "results" / "smoke.md", tmp_path / "smoke.md")
    _, again = compare(tmp_path, "--recompute")
    assert again["arms"] == rerun["arms"] and again["differences"] == rerun["differences"]
    assert again["mcnemar"] == rerun["mcnemar"] and again["per_seed"] == rerun["per_seed"]
    assert (tmp_path / "results" / "smoke.md").read_text() == (tmp_path / "smoke.md").read_text()
    # report.py prints the same table from the results file (the last run's: wall times differ)
    table = (tmp_path / "results" / "smoke.md").read_text()
    q = subprocess.run([sys.executable, "report.py", str(tmp_path / "results" / "smoke.json")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert q.returncode == 0 and q.stdout.strip() == table.strip()


def test_bad_flags_are_one_line(tmp_path):
    for flags, named in ((["--seeds", "a,b"], "--seeds"), (["--seeds", "1,1"], "--seeds"), (["--workers", "0"], "--workers"),
                         (["--threads", "-1"], "--threads")):
        p = subprocess.run([sys.executable, "-m", "experiments.compare", "smoke", *flags, "--runs", str(tmp_path)],
                           cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and named in p.stderr and "Traceback" not in p.stderr, p.stderr
        assert not os.listdir(tmp_path)  # refused before any run started


def test_committed_outcomes_match_committed_results():
    """Every committed results file has its per-prompt outcomes beside it, and they are the ones
    its figures came from: per-seed exact match and every McNemar count recount from them (the
    bootstrap intervals follow by `--recompute`, too slow to run for every regime here)."""
    from experiments import stats
    from experiments.compare import read_outcomes, read_validation

    results = os.path.join(ROOT, "experiments", "results")
    names = sorted(f for f in os.listdir(results) if f.endswith(".json"))
    assert len(names) >= 7
    for name in names:
        res = json.load(open(os.path.join(results, name)))
        seeds, matrix = read_outcomes(os.path.join(results, name[:-5] + ".outcomes.json.gz"))
        assert seeds == res["seeds"], name
        for arm, by_t in res["arms"].items():
            for t, v in by_t.items():
                x = matrix[(arm, int(t))]  # (seeds, prompts) of 0/1
                assert list(x.mean(1)) == pytest.approx(v["per_seed"], abs=1e-12), (name, arm, t)
        for m in res["mcnemar"]:
            (a, ta), (b, tb) = (("start", "0") if k == "start" else k.rsplit("-", 1) for k in (m["a"], m["b"]))
            i = seeds.index(m["seed"])
            got = stats.mcnemar(matrix[(a, int(ta))][i], matrix[(b, int(tb))][i])
            assert (got.both, got.a_only, got.b_only, got.neither) == (m["both"], m["a_only"], m["b_only"],
                                                                       m["neither"]), (name, m)
        if "confirmation" in res:  # the pre-registered endpoints: the choices and per-seed differences
            recount_confirmation(res["confirmation"], matrix, read_validation(
                os.path.join(results, name[:-5] + ".outcomes.json.gz")))


def recount_confirmation(conf, held, val):
    """The validation choices and every endpoint's per-seed differences, by loops over the outcomes."""
    from experiments import confirm
    for field, arms in (("chosen_spin", confirm.SPIN), ("chosen_sft", confirm.SFT)):
        for s, chosen in enumerate(conf[field]):
            scores = [(val[(a, t)][s].sum(), -t, -arms.index(a), f"{a}-{t}") for t in confirm.ITERATIONS for a in arms]
            assert max(scores)[3] == chosen, (field, s)
    row = lambda name, s: held[(name.rsplit("-", 1)[0], int(name.rsplit("-", 1)[1]))][s].mean()  # noqa: E731
    S = len(conf["chosen_spin"])
    e1 = [row(conf["chosen_spin"][s], s) - held[("start", 0)][s].mean() for s in range(S)]
    e2 = [row(conf["chosen_spin"][s], s) - row(conf["chosen_sft"][s], s) for s in range(S)]
    assert conf["primary"][0]["per_seed"] == pytest.approx(e1, abs=1e-12)
    assert conf["primary"][1]["per_seed"] == pytest.approx(e2, abs=1e-12)
    for r in conf["secondary"]:
        a, b = r["name"].split(" - ")
        want = [row(a, s) - (held[("start", 0)][s].mean() if b == "start" else row(b, s)) for s in range(S)]
        assert r["per_seed"] == pytest.approx(want, abs=1e-12), r["name"]


def test_confirmation_recount_fails_on_a_wrong_choice():
    """recount_confirmation catches a results file whose choice or difference is not the outcomes'."""
    import numpy as np
    from experiments import confirm
    rng = np.random.default_rng(1)
    keys = [("start", 0)] + [(a, t) for t in confirm.ITERATIONS for a in (*confirm.SPIN, *confirm.SFT, confirm.EQDROP)]
    held = {k: (rng.random((3, 20)) < 0.5).astype(np.int8) for k in keys}
    val = {k: (rng.random((3, 20)) < 0.5).astype(np.int8) for k in keys}
    conf = confirm.analyse(held, val, n_boot=20)
    recount_confirmation(conf, held, val)
    bad = dict(conf, chosen_spin=conf["chosen_spin"][::-1] if len(set(conf["chosen_spin"])) > 1 else ["x-1"] * 3)
    with pytest.raises(AssertionError):
        recount_confirmation(bad, held, val)
    conf["primary"][0]["per_seed"][0] += 0.002
    with pytest.raises(AssertionError):
        recount_confirmation(conf, held, val)


def test_validation_outcomes_round_trip(tmp_path):
    """--score-val's validation outcomes travel in the outcomes file beside the held-out ones, and
    an older file without them reads as none."""
    import numpy as np
    from experiments.compare import read_outcomes, read_validation, write_outcomes
    held = {("start", 0): np.array([[1, 0, 1], [0, 0, 1]], dtype=np.int8)}
    val = {("spin_b5_lr1e-05", 2): np.array([[0, 1, 1, 1], [1, 1, 0, 0]], dtype=np.int8)}
    write_outcomes(tmp_path / "a.gz", [5, 6], held, val)
    seeds, m = read_outcomes(tmp_path / "a.gz")
    assert seeds == [5, 6] and set(m) == set(held) and (m[("start", 0)] == held[("start", 0)]).all()
    v = read_validation(tmp_path / "a.gz")
    assert set(v) == set(val) and (v[("spin_b5_lr1e-05", 2)] == val[("spin_b5_lr1e-05", 2)]).all()
    write_outcomes(tmp_path / "b.gz", [5, 6], held)
    assert read_validation(tmp_path / "b.gz") == {}


def fake_confirm_runs(runs, seeds, P=12, rng_seed=0):
    """Finished run folders of the factor5-1k-confirm regime, as experiments.arms --score-val writes
    them (eval and val_eval records, per-prompt files, a timing record), with random outcomes."""
    import numpy as np
    from experiments.compare import CONFIRM_ARMS
    rng = np.random.default_rng(rng_seed)
    for seed in seeds:
        out = runs / "factor5-1k-confirm" / f"seed{seed}"
        (out / "eval").mkdir(parents=True)
        recs = [{"type": "sft_chosen", "step": 500}]
        for arm, t in [("start", 0)] + [(a, t) for a in CONFIRM_ARMS for t in (1, 2, 3, 4)]:
            for kind, prefix in (("eval", ""), ("val_eval", "val-")):
                exact = (rng.random(P) < 0.6).astype(int).tolist()
                (out / "eval" / f"{prefix}{arm}-{t}.jsonl").write_text("".join(json.dumps({"index": i, "exact": e}) + "\n"
                                                                              for i, e in enumerate(exact)))
                recs.append({"type": kind, "arm": arm, "iteration": t, "exact_match": sum(exact) / P,
                             "gt_logp_per_token": -1.0, "train_samples_correct": 0.4, "train_samples_equal_gt": 0.0})
        recs.append({"type": "timing", "sft": 1.0})
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_confirmation_from_run_folders_to_results(tmp_path):
    """compare.py on finished confirmation runs: validation outcomes into the outcomes file, the
    endpoints into the results and the table, partial seeds marked, --recompute the same."""
    fake_confirm_runs(tmp_path / "runs", [5, 6, 7])
    env = dict(os.environ, PYTHONPATH=ROOT)
    args = [sys.executable, "-m", "experiments.compare", "factor5-1k-confirm", "--seeds", "5,6,7",
            "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results")]
    p = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.load(open(tmp_path / "results" / "factor5-1k-confirm.json"))
    assert res["partial"].startswith("3 of the 10 seeds") and len(res["confirmation"]["secondary"]) == 36
    table = (tmp_path / "results" / "factor5-1k-confirm.md").read_text()
    assert table.startswith("**PARTIAL") and "E2: validation-selected SPIN" in table and "[prompts within seeds]" in table
    from experiments.compare import read_outcomes, read_validation
    gz = tmp_path / "results" / "factor5-1k-confirm.outcomes.json.gz"
    _, held = read_outcomes(gz)
    recount_confirmation(res["confirmation"], held, read_validation(gz))
    q = subprocess.run(args + ["--recompute"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert q.returncode == 0 and json.load(open(tmp_path / "results" / "factor5-1k-confirm.json")) == res
    assert (tmp_path / "results" / "factor5-1k-confirm.md").read_text() == table
