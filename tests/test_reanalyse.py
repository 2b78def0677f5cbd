"""experiments/reanalyse.py: the committed REANALYSIS.md is what the committed outcomes give, and its
columns are the tests they name (recomputed here with scipy)."""
import os

import numpy as np
import pytest

from experiments import reanalyse
from experiments.compare import read_outcomes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def section(text, name):
    start = text.index(f"## {name} (")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)].strip()


def test_committed_reanalysis_is_what_the_outcomes_give():
    """addition3-250 whole (3 seeds: fast), and every other regime's seed-level columns (the
    bootstrap columns at a few resamples, so they are not compared)."""
    text = open(os.path.join(ROOT, "experiments", "results", "REANALYSIS.md")).read()
    assert section(text, "addition3-250") == reanalyse.table(reanalyse.regime("addition3-250")).strip()
    for name in ("factor4-sweep", "factor5-1k-sweep", "factor4", "factor5", "anyorder3"):
        got = reanalyse.table(reanalyse.regime(name, n_boot=5)).strip().splitlines()
        want = section(text, name).splitlines()
        assert len(got) == len(want), name
        for g, w in zip(got[4:], want[4:]):
            g, w = g.split(" | "), w.split(" | ")
            assert g[:7] + g[8:9] == w[:7] + w[8:9], (name, g[0])  # all but the two bootstrap columns


def test_columns_are_the_tests_they_name():
    scipy_stats = pytest.importorskip("scipy.stats")
    seeds, matrix = read_outcomes(os.path.join(ROOT, "experiments", "results", "factor4-sweep.outcomes.json.gz"))
    r = reanalyse.read("spin_b2_lr1e-05-1", "start", matrix, n_boot=20)
    d = matrix[("spin_b2_lr1e-05", 1)].mean(1) - matrix[("start", 0)].mean(1)
    assert r["per_seed"] == pytest.approx(d) and r["p_t"] == pytest.approx(scipy_stats.ttest_1samp(d, 0).pvalue)
    x, y = matrix[("spin_b2_lr1e-05", 1)].ravel(), matrix[("start", 0)].ravel()
    a_only, b_only = int(((x == 1) & (y == 0)).sum()), int(((x == 0) & (y == 1)).sum())
    assert (r["a_only"], r["b_only"]) == (a_only, b_only)
    assert r["p_mcnemar_pooled"] == pytest.approx(scipy_stats.binomtest(a_only, a_only + b_only).pvalue, rel=1e-9)
    assert r["p_sign_flip"] == pytest.approx(np.mean([abs(sum(s * v for s, v in zip(signs, d))) >= abs(d.sum()) - 1e-12
                                                      for signs in np.array(np.meshgrid(*[[1, -1]] * 5)).T.reshape(-1, 5)]))
