"""spin_tools/same_run.py: the bitwise comparison of two runs that the refactors are checked with."""
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

from spin_tools.same_run import compare


def _run(folder, loss, tokens_per_s, logp):
    os.makedirs(os.path.join(folder, "iter0"))
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"type": "step", "step": 1, "loss": loss, "tokens_per_s": tokens_per_s}) + "\n")
        f.write(json.dumps({"type": "timing", "train": tokens_per_s}) + "\n")
    pq.write_table(pa.table({"ref_real_logps": [logp]}), os.path.join(folder, "iter0", "synthetic.parquet"))
    return folder


def test_same_run_ignores_the_clock_and_nothing_else(tmp_path):
    a = _run(tmp_path / "a", 0.5, 100.0, -1.25)
    assert compare(a, _run(tmp_path / "b", 0.5, 999.0, -1.25))[0] == []  # timings differ only
    diffs = compare(a, _run(tmp_path / "c", 0.5 + 2**-40, 100.0, -1.25))[0]
    assert len(diffs) == 1 and "loss" in diffs[0]
    diffs = compare(a, _run(tmp_path / "d", 0.5, 100.0, -1.25 + 2**-30))[0]
    assert diffs == ["iter0/synthetic.parquet: tables differ"]


def test_a_broken_record_is_one_named_line(tmp_path):
    import pytest
    a = _run(tmp_path / "a", 0.5, 100.0, -1.25)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text('{"type": "step"}\n{broken\n')
    with pytest.raises(SystemExit, match=r"bad/metrics.jsonl, line 2: not a JSON record"):
        compare(a, str(bad))
