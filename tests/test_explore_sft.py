"""experiments/explore_sft.py end to end on a tiny model: the curve file and its summary, and the
same figures when run again (the regimes in experiments/EXPLORATION.md must be reproducible)."""

import json

from experiments.explore_sft import main

TINY = ["--n-train", "64", "--n-heldout", "16", "--eval-train", "16", "--dim", "32", "--layers", "1",
        "--steps", "12", "--eval-every", "6", "--warmup", "2", "--vocab", "300"]


def without_times(rec):
    return {k: v for k, v in rec.items() if not k.endswith("_s") and k != "train_s_per_step"}


def test_curve_file_and_rerun(tmp_path):
    out = tmp_path / "new" / "curve.jsonl"  # a folder that does not exist yet
    summary = main(TINY + ["--kind", "factor", "--digits", "3", "--schedule", "linear", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["type"] for r in rows] == ["settings", "eval", "eval", "summary"]
    assert rows[0]["kind"] == "factor" and rows[0]["n_params"] > 0
    assert [r["step"] for r in rows[1:3]] == [6, 12] and rows[-1] == summary
    for r in rows[1:3]:
        assert all(0 <= r[k] <= 1 for k in ("heldout_em", "train_em", "train_sample_eq_gt", "train_sample_correct"))
        assert r["heldout_logp_tok"] < 0
    again = main(TINY + ["--kind", "factor", "--digits", "3", "--schedule", "linear"])
    assert without_times(again) == without_times(summary)
