"""experiments/stats.py: bootstrap replayed by hand, McNemar against hand sums (and scipy),
degenerate cases, input errors, and coverage of the intervals on simulated data."""

import math

import numpy as np
import pytest

from experiments import stats
from experiments.stats import as_outcomes, bootstrap_mean, mcnemar, paired_difference, resample_means


def quantile_by_hand(values, q):
    # numpy's default rule ("linear", Hyndman & Fan type 7): position q * (n - 1) in the
    # sorted values, interpolated between its two neighbours.
    v = sorted(values)
    pos = q * (len(v) - 1)
    i = math.floor(pos)
    return v[i] if i + 1 == len(v) else v[i] + (pos - i) * (v[i + 1] - v[i])


def replay(x, n_boot, seed):
    # The documented stream, consumed one number at a time with plain loops: first every
    # resample's seed draws, then every resample's prompt draws, seed by seed.
    S, P = len(x), len(x[0])
    rng = np.random.default_rng(seed)
    seed_draws = rng.integers(0, S, size=(n_boot, S)).tolist() if S > 1 else [[0]] * n_boot
    prompt_draws = rng.integers(0, P, size=(n_boot, S, P)).tolist()
    means = []
    for b in range(n_boot):
        total = 0
        for j, s in enumerate(seed_draws[b]):
            for p in prompt_draws[b][j]:
                total += x[s][p]
        means.append(total / (S * P))
    return means


# -- the bootstrap, replayed --------------------------------------------------------------


def test_one_seed_resamples_by_hand():
    # One seed, 3 prompts, 4 resamples. The draws are printed by the generator itself, so
    # the expected means follow from them by hand: x = [1, 0, 1].
    x = [1, 0, 1]
    draws = np.random.default_rng(7).integers(0, 3, size=(4, 1, 3))[:, 0].tolist()
    expected = [sum(x[p] for p in d) / 3 for d in draws]
    assert resample_means(np.array([x]), 4, seed=7).tolist() == expected
    iv = bootstrap_mean(x, n_boot=4, seed=7)
    assert iv.mean == pytest.approx(2 / 3)
    assert iv.lo == pytest.approx(quantile_by_hand(expected, 0.025))
    assert iv.hi == pytest.approx(quantile_by_hand(expected, 0.975))
    assert (iv.n_seeds, iv.n_prompts, iv.level) == (1, 3, 0.95)


def test_two_level_resamples_replayed():
    x = [[1, 0, 1, 1], [0, 0, 1, 0], [1, 1, 1, 0]]  # 3 seeds, 4 prompts
    want = replay(x, 9, seed=11)
    assert resample_means(np.array(x), 9, seed=11) == pytest.approx(want, abs=1e-15)
    iv = bootstrap_mean(x, n_boot=9, seed=11, level=0.8)
    assert iv.mean == pytest.approx(7 / 12)
    assert (iv.lo, iv.hi) == pytest.approx((quantile_by_hand(want, 0.1), quantile_by_hand(want, 0.9)))


def test_paired_difference_replayed():
    a = [[1, 1, 0, 1], [1, 0, 1, 1]]
    b = [[1, 0, 0, 0], [1, 1, 0, 1]]
    d = [[ai - bi for ai, bi in zip(ra, rb)] for ra, rb in zip(a, b)]
    want = replay(d, 12, seed=5)
    iv = paired_difference(a, b, n_boot=12, seed=5)
    assert iv.mean == pytest.approx(2 / 8)
    assert (iv.lo, iv.hi) == pytest.approx((quantile_by_hand(want, 0.025), quantile_by_hand(want, 0.975)))
    # Pairing: the same resample of a and of b, so the difference's interval is the
    # interval of the differences, not of two independent resamples.
    assert paired_difference(b, a, n_boot=12, seed=5).hi == pytest.approx(-iv.lo)


def test_chunks_do_not_change_the_stream(monkeypatch):
    x = np.random.default_rng(0).integers(0, 2, size=(3, 7))
    whole = resample_means(x, 50, seed=2)
    monkeypatch.setattr(stats, "_CHUNK_ELEMENTS", 5)  # one resample per chunk
    assert np.array_equal(resample_means(x, 50, seed=2), whole)
    assert np.array_equal(whole, replay(x.tolist(), 50, seed=2))


def test_reproducible_and_seed_dependent():
    x = np.random.default_rng(1).integers(0, 2, size=(2, 30))
    assert bootstrap_mean(x, n_boot=200, seed=4) == bootstrap_mean(x, n_boot=200, seed=4)
    assert bootstrap_mean(x, n_boot=200, seed=4) != bootstrap_mean(x, n_boot=200, seed=5)


# -- degenerate cases ---------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, 1])
def test_all_equal_gives_zero_width(value):
    iv = bootstrap_mean(np.full((3, 10), value), n_boot=100)
    assert iv.mean == iv.lo == iv.hi == value


def test_identical_arms_give_zero_difference():
    a = np.random.default_rng(3).integers(0, 2, size=(2, 40))
    iv = paired_difference(a, a.copy(), n_boot=100)
    assert iv.mean == iv.lo == iv.hi == 0.0


def test_bool_and_single_prompt_inputs():
    assert bootstrap_mean([True, False], n_boot=10).mean == 0.5
    assert bootstrap_mean([[1]], n_boot=10) == stats.Interval(1.0, 1.0, 1.0, 0.95, 1, 1)


# -- McNemar --------------------------------------------------------------------------------


def arms_from_table(both, a_only, b_only, neither):
    a = [1] * both + [1] * a_only + [0] * b_only + [0] * neither
    b = [1] * both + [0] * a_only + [1] * b_only + [0] * neither
    return a, b


def test_mcnemar_hand_computed():
    # a_only = 1, b_only = 6: n = 7 discordant, P(X <= 1) = (C(7,0) + C(7,1)) / 2^7 = 8/128,
    # two-sided p = 16/128 = 0.125.
    r = mcnemar(*arms_from_table(3, 1, 6, 2))
    assert r.table == ((3, 1), (6, 2)) and (r.both, r.a_only, r.b_only, r.neither) == (3, 1, 6, 2)
    assert r.p_value == 0.125
    # a_only = 8, b_only = 2: P(X <= 2) = (1 + 10 + 45) / 1024, p = 112/1024.
    assert mcnemar(*arms_from_table(0, 8, 2, 5)).p_value == 112 / 1024
    # 0 vs 5: p = 2 / 32.
    assert mcnemar(*arms_from_table(4, 0, 5, 0)).p_value == 2 / 32


def test_mcnemar_no_or_balanced_discordance():
    assert mcnemar(*arms_from_table(5, 0, 0, 5)).p_value == 1.0  # no discordant pair
    assert mcnemar(*arms_from_table(5, 3, 3, 5)).p_value == 1.0  # 2 * P(X <= 3 | n = 6) > 1, capped


def test_mcnemar_large_counts_stay_exact():
    # 2^600 overflows a float; the exact integer sum does not.
    r = mcnemar(*arms_from_table(0, 280, 320, 0))
    want = 2 * sum(math.comb(600, i) for i in range(281)) / 2**600
    assert r.p_value == want and 0.05 < r.p_value < 0.15


def test_mcnemar_against_scipy():
    import scipy.stats as scipy_stats
    for a_only, b_only in [(1, 6), (8, 2), (0, 5), (13, 27), (40, 41), (0, 0), (100, 60)]:
        n = a_only + b_only
        want = scipy_stats.binomtest(a_only, n, 0.5).pvalue if n else 1.0
        assert mcnemar(*arms_from_table(2, a_only, b_only, 3)).p_value == pytest.approx(want, rel=1e-9)


# -- input validation -------------------------------------------------------------------------


@pytest.mark.parametrize("bad, match", [
    ([], "empty"),
    ([[]], "empty"),
    ([0, 1, 2], "0 or 1.*is 2"),
    ([0.5, 1], "0 or 1"),
    ([[1, 0], [float("nan"), 1]], r"seed 1, prompt 0"),
    ([-1, 0], "0 or 1"),
    (np.zeros((2, 2, 2)), "shape"),
    ([[1, 0], [1]], "ragged"),
    (["1", "0"], "dtype"),
])
def test_bad_outcomes_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        bootstrap_mean(bad, n_boot=10)
    with pytest.raises(ValueError, match=match):
        as_outcomes(bad)


def test_bad_pairs_and_settings():
    with pytest.raises(ValueError, match=r"same seeds and prompts.*\(1, 3\).*\(1, 4\)"):
        paired_difference([1, 0, 1], [1, 0, 1, 1])
    with pytest.raises(ValueError, match=r"b: values must be 0 or 1"):
        paired_difference([1, 0], [1, 3])
    with pytest.raises(ValueError, match="one seed"):
        mcnemar([[1, 0], [0, 1]], [[1, 0], [0, 1]])
    with pytest.raises(ValueError, match="same prompts"):
        mcnemar([1, 0], [1, 0, 0])
    for n_boot in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="n_boot"):
            bootstrap_mean([1, 0], n_boot=n_boot)
    for level in (0, 1, 1.5):
        with pytest.raises(ValueError, match="level"):
            paired_difference([1, 0], [0, 1], level=level)


# -- coverage on simulated data -----------------------------------------------------------------
# Simulated held-out sets with a known true accuracy; how often does the interval contain it?
# With N datasets the observed coverage of a true 95% interval has sd sqrt(.95 * .05 / N).


def coverage(S, P, seed_sd, n_datasets, level=0.95, mu=0.6, n_boot=500, rng_seed=0):
    rng = np.random.default_rng(rng_seed)
    hits = 0
    for i in range(n_datasets):
        mus = np.clip(rng.normal(mu, seed_sd, S), 0, 1) if seed_sd else np.full(S, mu)
        x = rng.random((S, P)) < mus[:, None]  # (S, P)
        iv = bootstrap_mean(x, n_boot=n_boot, seed=i, level=level)
        hits += iv.lo <= mu <= iv.hi
    return hits / n_datasets


def test_coverage_one_seed():
    # 400 datasets: sd of the observed coverage 0.011; this draw covers 0.95. A 68% interval
    # (e.g. a standard error mistaken for a 95% half-width) covers 0.705 here and fails.
    assert 0.92 <= coverage(1, 200, 0, 400) <= 0.975
    assert coverage(1, 200, 0, 400, level=0.68) < 0.8


def test_coverage_paired_difference():
    # Per-prompt difficulty q shared by both arms (what pairing removes); arm a is 5 points
    # better on every prompt, so the true difference is 0.05. The arms' outcomes share one
    # uniform on 70% of the prompts (strongly correlated, as two models from one start are).
    rng = np.random.default_rng(1)
    hits, n = 0, 400
    for i in range(n):
        q, u, w = rng.uniform(0.2, 0.8, 200), rng.random(200), rng.random(200)  # (P,) each
        v = np.where(rng.random(200) < 0.3, w, u)
        iv = paired_difference(u < q + 0.05, v < q, n_boot=500, seed=i)
        hits += iv.lo <= 0.05 <= iv.hi
    assert 0.92 <= hits / n <= 0.975


def test_coverage_two_levels_as_documented():
    # Seeds that do not differ: the prompt noise counted twice makes the interval wide. This
    # test's draw covers 0.975; with 200 prompts, 400 datasets and 1000 resamples: 0.98 with
    # 3 seeds, 0.99 with 5.
    assert coverage(3, 100, 0, 200) >= 0.96
    # Seeds that differ a lot (sd 0.1 of the seed's true accuracy) and only 3 of them: the
    # interval under-covers, as the module docstring warns. This draw: 0.855; with 200 prompts
    # and 400 datasets: 0.81 (3 seeds), 0.89 (5), 0.92 (10).
    assert coverage(3, 100, 0.1, 200) <= 0.9


def test_t_quantiles_match_the_tables():
    # Student's t 0.975 quantiles (standard tables, e.g. NIST/SEMATECH e-Handbook 1.3.6.7.2)
    for df, want in ((1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (30, 2.042)):
        assert stats.t_quantile(0.975, df) == pytest.approx(want, abs=1e-3)
    assert stats.t_quantile(0.5, 3) == pytest.approx(0.0, abs=1e-9)
    assert stats.t_cdf(0.0, 7) == pytest.approx(0.5) and stats.t_cdf(-2.0, 5) == pytest.approx(1 - stats.t_cdf(2.0, 5))
    import scipy.stats as scipy_stats
    for df in (1, 2, 3, 4, 5, 8, 20):
        for q in (0.6, 0.9, 0.975, 0.995):
            assert stats.t_quantile(q, df) == pytest.approx(scipy_stats.t.ppf(q, df), rel=1e-7)


def test_seed_t_interval_by_hand_and_coverage():
    x = [0.1, 0.2, 0.3, 0.25, 0.15]  # mean 0.2, sd 0.0790569
    iv = stats.seed_t_interval(x)
    half = 2.7764451 * 0.0790569415 / 5 ** 0.5
    assert iv.mean == pytest.approx(0.2) and iv.lo == pytest.approx(0.2 - half) and iv.hi == pytest.approx(0.2 + half)
    one = stats.seed_t_interval([0.3])
    assert one.mean == 0.3 and np.isnan(one.lo) and np.isnan(one.hi)
    with pytest.raises(ValueError, match="per_seed"):
        stats.seed_t_interval([])
    # With normal seed effects its coverage is the nominal 95% at 5 seeds (the two-level bootstrap's is not).
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(2000):
        iv = stats.seed_t_interval(rng.normal(0.0, 1.0, size=5))
        hits += iv.lo <= 0.0 <= iv.hi
    assert 0.935 <= hits / 2000 <= 0.965


# -- the confirmation's tests (issue 37): each against scipy and small cases by hand ----------------

DIFFS = [[0.01, -0.02, 0.03, 0.04, 0.0, 0.02, 0.01, -0.01, 0.05, 0.02], [-0.05, 0.01, -0.02, 0.0, -0.03],
         [0.3, 0.1], [0.002, 0.004, -0.001, 0.003, 0.0, 0.001, 0.002, -0.002, 0.005, 0.001]]


def test_paired_t_test_against_scipy_and_degenerate_cases():
    scipy_stats = pytest.importorskip("scipy.stats")
    for d in DIFFS:
        t, p = stats.paired_t_test(d)
        want = scipy_stats.ttest_1samp(d, 0.0)
        assert t == pytest.approx(want.statistic, rel=1e-12) and p == pytest.approx(want.pvalue, rel=1e-7)
    assert stats.paired_t_test([0.0, 0.0, 0.0]) == (0.0, 1.0)
    assert stats.paired_t_test([0.02, 0.02, 0.02])[1] == 0.0
    with pytest.raises(ValueError, match="per_seed"):
        stats.paired_t_test([0.1])


def test_sign_flip_test_by_hand_and_against_scipy():
    # d = (1, 2, 3): the 8 sign assignments give |sum| 6, 4, 2, 0, 0, 2, 4, 6; the observed 6 is
    # reached by 2 of them: p = 2/8.
    assert stats.sign_flip_test([1.0, 2.0, 3.0]) == 0.25
    assert stats.sign_flip_test([1.0, -1.0]) == 1.0  # observed |sum| 0: every assignment reaches it
    assert stats.sign_flip_test([0.5] * 10) == 2 / 1024  # all one sign: only it and its mirror
    # ties inside the floating-point sum count as reached: 0.1 + 0.2 vs 0.3
    assert stats.sign_flip_test([0.1, 0.2, -0.3]) == 1.0
    scipy_stats = pytest.importorskip("scipy.stats")
    for d in DIFFS:
        want = scipy_stats.permutation_test((np.array(d),), np.mean, permutation_type="samples",
                                            n_resamples=10**6, alternative="two-sided").pvalue
        assert stats.sign_flip_test(d) == pytest.approx(want, rel=1e-9)
    with pytest.raises(ValueError, match="2\\^20"):
        stats.sign_flip_test([0.1] * 21)


def test_tost_against_scipy_one_sided_tests():
    scipy_stats = pytest.importorskip("scipy.stats")
    for d in DIFFS:
        for margin in (0.02, 0.005, 0.5):
            lower, upper, p = stats.tost(d, margin)
            want_lower = scipy_stats.ttest_1samp(d, -margin, alternative="greater").pvalue
            want_upper = scipy_stats.ttest_1samp(d, margin, alternative="less").pvalue
            assert (lower, upper) == pytest.approx((want_lower, want_upper), rel=1e-7, abs=1e-12)
            assert p == max(lower, upper)
            # equivalent at 5% iff the 90% seed-level t interval lies inside the margin
            iv = stats.seed_t_interval(d, level=0.90)
            assert (p < 0.05) == (-margin < iv.lo and iv.hi < margin)
    assert stats.tost([0.01, 0.01], 0.02)[2] == 0.0 and stats.tost([0.03, 0.03], 0.02)[2] == 1.0
    with pytest.raises(ValueError, match="margin"):
        stats.tost([0.1, 0.2], 0)


def test_holm_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1: 0.02, 0.03, 0.06, 0.04 -> monotone 0.06
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.6]) == [1.0, 1.0]  # 0.5 * 2 caps at 1; monotone, so 0.6 * 1 rises to 1
    assert stats.holm([0.3, 0.01]) == [0.3, 0.02]
    assert stats.holm([0.2]) == [0.2] and stats.holm([]) == []
    assert stats.holm([0.01, 0.01]) == [0.02, 0.02]  # ties
    with pytest.raises(ValueError, match="p_values"):
        stats.holm([0.1, 1.5])


def test_noncentral_t_and_minimum_detectable_effect_against_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    for x, df, nc in ((2.26, 9, 2.0), (0.5, 1, 1.0), (3.0, 1, 0.0), (-1.0, 2, 3.0), (1.3, 4, -1.0), (5.0, 30, 4.0)):
        assert stats.nct_cdf(x, df, nc) == pytest.approx(scipy_stats.nct.cdf(x, df, nc), abs=1e-9)
    for S, sd in ((10, 1.0), (5, 0.03), (3, 2.0)):
        mde = stats.minimum_detectable_effect(sd, S)
        df, crit = S - 1, scipy_stats.t.ppf(0.975, S - 1)
        nc = mde / sd * S ** 0.5
        power = scipy_stats.nct.sf(crit, df, nc) + scipy_stats.nct.cdf(-crit, df, nc)
        assert power == pytest.approx(0.8, abs=1e-5)
    # the textbook figure: 10 pairs, two-sided 5%, 80% power: 0.996 sd (1.682 with 5)
    assert stats.minimum_detectable_effect(1.0, 10) == pytest.approx(0.996, abs=1e-3)
    assert stats.minimum_detectable_effect(1.0, 5) == pytest.approx(1.682, abs=1e-3)


def test_prompt_bootstrap_keeps_the_seeds():
    # Replayed from its documented stream with plain loops.
    x = [[1, 0, 1, 1], [0, 0, 1, 0], [1, 1, 1, 0]]
    rng = np.random.default_rng(3)
    draws = rng.integers(0, 4, size=(7, 3, 4)).tolist()
    want = [sum(x[s][p] for s in range(3) for p in draws[b][s]) / 12 for b in range(7)]
    iv = stats.prompt_bootstrap(x, n_boot=7, seed=3, level=0.8)
    assert iv.mean == pytest.approx(7 / 12)
    assert (iv.lo, iv.hi) == pytest.approx((quantile_by_hand(want, 0.1), quantile_by_hand(want, 0.9)))
    # Seeds that differ but whose prompts do not: no prompt noise, so no width (the two-level
    # bootstrap, which resamples seeds, is wide here).
    y = np.array([[1] * 20, [0] * 20, [1] * 20])
    assert stats.prompt_bootstrap(y, n_boot=200).lo == stats.prompt_bootstrap(y, n_boot=200).hi == pytest.approx(2 / 3)
    assert bootstrap_mean(y, n_boot=200).hi - bootstrap_mean(y, n_boot=200).lo > 0.3
