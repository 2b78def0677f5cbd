"""Uncertainty for held-out accuracies: bootstrap intervals over seeds and prompts, paired
differences between arms, and the exact McNemar test. Pure numpy; nothing here knows models.

The data of one arm is an outcome matrix `x` (S, P): x[s, p] = 1 if the model trained with
seed s answered held-out prompt p correctly, else 0. Two arms are compared on the same
seeds and the same prompts, so their matrices line up entry by entry.

Two sources of noise move an arm's accuracy: which held-out prompts were drawn, and which
seed (initialisation, data order, SFT start) the run had. The two-level bootstrap
(Davison & Hinkley 1997, section 3.8) resamples both: S seeds with replacement, then, for
each drawn seed, P of its prompts with replacement; the statistic is the mean of the
resampled matrix. With S = 1 it is the ordinary bootstrap over prompts. The interval is
the percentile interval of B such means.

What the two-level scheme does and does not promise (measured in tests/test_stats.py):
- It counts the prompt noise about twice over (once inside each seed's mean, once in the
  second level), so when seeds barely differ its intervals are wider than 95% needs.
- With 3-5 seeds the seed level has few distinct resamples, and an interval cannot reflect
  seed-to-seed spread the seeds drawn did not show: read a 3-seed interval as a lower
  bound on the uncertainty that comes from seeds.

So every table also gives the seed-level t interval (seed_t_interval): each seed's mean over
its prompts is one observation, and the interval is mean +- t_{S-1} * sd / sqrt(S). It treats
the seed as the unit of replication (a new seed is a new run of the whole experiment), which
is what a claim about the method needs; with 5 seeds its t quantile is 2.78, so it is wide.
A claim is called seed-level when this interval excludes 0 as well.

The confirmation (issue 37, experiments/CONFIRMATION.md) adds tests on the per-seed differences:
the paired t test, an exact sign-flip test (no normality), two one-sided tests for equivalence
within a margin (TOST), Holm's correction across a family, the minimum detectable effect of the t
test (through the noncentral t), and the bootstrap over prompts within seeds (the seeds kept: the
prompt noise alone, which the two-level bootstrap mixes with the seed noise).
"""

import math
from dataclasses import dataclass

import numpy as np

from t_interval import Interval, seed_t_interval, t_cdf, t_quantile  # noqa: F401  (the study's names)

# At most this many int64 indices are held at once (32 MiB); resamples are drawn in chunks.
# Chunking does not change the result: the generator's stream is the same whether B rows of
# indices are drawn in one call or in several (checked in tests/test_stats.py).
_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class McNemar:
    # Counts over prompts, arm a against arm b:       b correct  b wrong
    #                                     a correct     both       a_only
    #                                     a wrong      b_only      neither
    both: int
    a_only: int
    b_only: int
    neither: int
    p_value: float  # exact two-sided: only the discordant pairs carry information

    @property
    def table(self):
        return ((self.both, self.a_only), (self.b_only, self.neither))


def as_outcomes(x, name="outcomes"):
    """0/1 outcomes as a (S, P) int8 array; a 1-D array is one seed. Raises ValueError
    naming `name` on anything else (wrong rank, empty, NaN, values other than 0 and 1)."""
    try:
        a = np.asarray(x)
    except ValueError:  # numpy refuses ragged nested lists
        a = np.asarray(x, dtype=object)
    if a.dtype == object:
        raise ValueError(f"{name}: expected a rectangular array of 0/1 values (ragged or mixed input)")
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError(f"{name}: expected (prompts,) or (seeds, prompts), got shape {np.shape(x)}")
    if a.size == 0:
        raise ValueError(f"{name}: empty (shape {np.shape(x)}); need at least one seed and one prompt")
    if a.dtype == bool:
        return a.astype(np.int8)
    if not np.issubdtype(a.dtype, np.number):
        raise ValueError(f"{name}: expected numbers 0/1, got dtype {a.dtype}")
    bad = ~((a == 0) | (a == 1))  # NaN compares unequal to both
    if bad.any():
        s, p = np.argwhere(bad)[0]
        raise ValueError(f"{name}: values must be 0 or 1; entry [seed {s}, prompt {p}] is {a[s, p].item()!r}")
    return a.astype(np.int8)


def _check_settings(n_boot, level):
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")


def resample_means(values, n_boot, seed):
    """values (S, P) -> (n_boot,) means of two-level bootstrap resamples.

    The random stream, from np.random.default_rng(seed), is fixed so a test can replay it:
        seeds   = rng.integers(0, S, size=(n_boot, S))      # resample b draws seeds[b]
        prompts = rng.integers(0, P, size=(n_boot, S, P))   # and, for its j-th seed, prompts[b, j]
        mean_b  = values[seeds[b][:, None], prompts[b]].mean()
    With S = 1 the seed draw is skipped (it could only pick seed 0)."""
    values = np.asarray(values, dtype=np.float64)
    S, P = values.shape
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, S, size=(n_boot, S)) if S > 1 else np.zeros((n_boot, 1), dtype=np.int64)
    out = np.empty(n_boot)
    chunk = max(1, _CHUNK_ELEMENTS // (S * P))
    for b0 in range(0, n_boot, chunk):
        b1 = min(n_boot, b0 + chunk)
        prompts = rng.integers(0, P, size=(b1 - b0, S, P))  # (b, S, P)
        out[b0:b1] = values[seeds[b0:b1, :, None], prompts].mean(axis=(1, 2))
    return out


def _interval(values, n_boot, level, seed):
    means = resample_means(values, n_boot, seed)
    tail = (1 - level) / 2
    lo, hi = np.quantile(means, [tail, 1 - tail])  # numpy's default: linear interpolation
    S, P = values.shape
    return Interval(float(values.mean()), float(lo), float(hi), level, S, P)


def bootstrap_mean(outcomes, *, n_boot=10000, level=0.95, seed=0):
    """An arm's held-out accuracy: its mean over seeds and prompts, with the percentile
    interval of the two-level bootstrap. outcomes: (P,) for one seed or (S, P)."""
    _check_settings(n_boot, level)
    return _interval(as_outcomes(outcomes).astype(np.float64), n_boot, level, seed)


def paired_difference(a, b, *, n_boot=10000, level=0.95, seed=0):
    """Accuracy of arm a minus arm b on the same seeds and prompts, with its paired
    interval: each resample draws the same seeds and prompts for both arms, i.e. resamples
    the per-prompt differences d = a - b in {-1, 0, 1}. Pairing removes the variation the
    arms share (easy and hard prompts, good and bad seeds), so the interval is far narrower
    than the two arms' intervals suggest."""
    _check_settings(n_boot, level)
    a, b = as_outcomes(a, "a"), as_outcomes(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"paired arms need the same seeds and prompts: a is {a.shape}, b is {b.shape} (seeds, prompts)")
    return _interval(a.astype(np.float64) - b, n_boot, level, seed)


def mcnemar(a, b):
    """Exact McNemar test of arms a and b on the same prompts of one seed.

    Under H0 (the arms are equally accurate on these prompts) each discordant prompt (one arm
    right, the other wrong) is a fair coin, so a_only ~ Binomial(n, 1/2) with n = a_only +
    b_only. Two-sided p = min(1, 2 * P(Binomial(n, 1/2) <= min(a_only, b_only))); p = 1 when
    n = 0. Computed with exact integers: no normal approximation, fine for n of any size."""
    a, b = as_outcomes(a, "a"), as_outcomes(b, "b")
    if a.shape[0] != 1 or b.shape[0] != 1:
        raise ValueError(f"mcnemar compares one seed: got a {a.shape}, b {b.shape}; pass one row "
                         "(use paired_difference for several seeds)")
    if a.shape != b.shape:
        raise ValueError(f"mcnemar needs the same prompts for both arms: a has {a.shape[1]}, b has {b.shape[1]}")
    a, b = a[0].astype(bool), b[0].astype(bool)
    both, a_only = int((a & b).sum()), int((a & ~b).sum())
    b_only, neither = int((~a & b).sum()), int((~a & ~b).sum())
    n, k = a_only + b_only, min(a_only, b_only)
    tail = sum(math.comb(n, i) for i in range(k + 1))  # P(X <= k) * 2^n
    p = min(1.0, 2 * tail / 2**n) if n else 1.0  # Python ints are exact; one rounding at the end
    return McNemar(both, a_only, b_only, neither, p)


# ----------------------------------------------------------------------------------------------
# Tests on per-seed paired differences (the confirmation, issue 37: experiments/CONFIRMATION.md)
# d (S,): one paired difference per seed (arm a's mean over its prompts minus arm b's); the seed is
# the unit of replication, so every test below has S observations, whatever the number of prompts.


def _per_seed(d, name="per_seed"):
    x = np.asarray(d, dtype=np.float64)
    if x.ndim != 1 or x.size < 2 or not np.isfinite(x).all():
        raise ValueError(f"{name}: expected a 1-D array of at least 2 finite per-seed values, got {d!r}")
    return x


def _t_sf(t, df):
    """P(T >= t) for Student's t; an infinite t (all seeds equal, nonzero mean) gives 0 or 1."""
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    return 1.0 - t_cdf(t, df) if t >= 0 else t_cdf(-t, df)


def paired_t_test(d):
    """Two-sided one-sample t test of mean(d) = 0 with S - 1 degrees of freedom: (t, p). All
    differences equal: p = 1 if they are 0, else 0 (no spread, a difference every time)."""
    x = _per_seed(d)
    S, m, sd = x.size, float(x.mean()), float(x.std(ddof=1))
    if sd == 0:
        return (0.0, 1.0) if m == 0 else (math.copysign(math.inf, m), 0.0)
    t = m / (sd / math.sqrt(S))
    return t, min(1.0, 2 * _t_sf(abs(t), S - 1))


def sign_flip_test(d):
    """Exact two-sided randomisation test of a symmetric-about-0 null: every one of the 2^S sign
    assignments of the per-seed differences is equally likely; p = the share whose |mean| is at
    least the observed |mean| (the observed assignment counts, so p >= 2 / 2^S unless d is all 0).
    Assumes no normality. S <= 20 (2^20 assignments, enumerated)."""
    x = _per_seed(d)
    S = x.size
    if S > 20:
        raise ValueError(f"per_seed: {S} seeds; the exact sign-flip test enumerates 2^S assignments, at most 2^20")
    signs = 1 - 2 * ((np.arange(2**S)[:, None] >> np.arange(S)) & 1)  # (2^S, S) of +-1
    sums = np.abs(signs @ x)  # |sum| orders assignments as |mean| does
    observed = abs(x.sum())
    return float(np.count_nonzero(sums >= observed - 1e-9 * max(1.0, observed)) / 2**S)


def tost(d, margin):
    """Equivalence by two one-sided t tests (Schuirmann 1987): H0 is |true mean| >= margin.
    Returns (p_lower, p_upper, p): p_lower tests mean <= -margin, p_upper mean >= +margin, p is the
    larger; equivalence at level alpha iff p < alpha, i.e. the (1 - 2 alpha) seed-level t interval
    lies inside (-margin, +margin)."""
    x = _per_seed(d)
    if not margin > 0:
        raise ValueError(f"margin must be > 0, got {margin!r}")
    S, m, sd = x.size, float(x.mean()), float(x.std(ddof=1))
    if sd == 0:
        lower, upper = float(m <= -margin), float(m >= margin)
    else:
        se = sd / math.sqrt(S)
        lower, upper = _t_sf((m + margin) / se, S - 1), 1.0 - _t_sf((m - margin) / se, S - 1)
    return lower, upper, max(lower, upper)


def holm(p_values):
    """Holm's step-down adjusted p-values, in the input's order: the i-th smallest p times
    (m - i + 1), made monotone, capped at 1. Controls the family-wise error at any dependence."""
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1 or ((p < 0) | (p > 1) | ~np.isfinite(p)).any():
        raise ValueError(f"p_values: expected a 1-D list of probabilities, got {p_values!r}")
    m = p.size
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return out.tolist()


def nct_cdf(x, df, nc):
    """P(T <= x) for the noncentral t with df degrees of freedom and noncentrality nc:
    T = (Z + nc) / sqrt(V / df), Z normal, V chi-square(df), so P = E_V[Phi(x sqrt(V / df) - nc)].
    Integrated over u = sqrt(V) (whose density 2 u^(df-1) e^(-u^2/2) / (2^(df/2) Gamma(df/2)) is
    finite at 0 for every df >= 1) by Simpson's rule on [0, sqrt(df) + 12] with 8000 intervals."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df!r}")
    top = math.sqrt(df) + 12.0  # the density of u beyond it is below 1e-25
    u = np.linspace(0.0, top, 8001)
    with np.errstate(divide="ignore"):
        power = (df - 1) * np.log(u) if df > 1 else 0.0  # df = 1: u^0 = 1, also at u = 0
        log_density = math.log(2) + power - u * u / 2 - (df / 2) * math.log(2) - math.lgamma(df / 2)
    density = np.exp(log_density)  # u = 0: exp(-inf) = 0 for df > 1, 2 / (sqrt(2) Gamma(1/2)) for df = 1
    phi = 0.5 * (1 + np.vectorize(math.erf)((x * u / math.sqrt(df) - nc) / math.sqrt(2)))
    f = density * phi
    h = top / 8000
    return float(h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum()))


def paired_t_power(effect_over_sd, S, alpha=0.05):
    """Power of the two-sided level-alpha paired t test with S seeds when the true mean difference
    is effect_over_sd seed standard deviations: P(|T| > t_crit), T noncentral t(S - 1, effect sqrt(S))."""
    df, nc = S - 1, effect_over_sd * math.sqrt(S)
    crit = t_quantile(1 - alpha / 2, df)
    return (1 - nct_cdf(crit, df, nc)) + nct_cdf(-crit, df, nc)


def minimum_detectable_effect(sd, S, alpha=0.05, power=0.8):
    """The smallest true mean difference (in sd's units) that the two-sided level-alpha paired t test
    with S seeds detects with the given power, at a seed standard deviation sd (bisection, 1e-6 sd)."""
    if S < 2 or not sd >= 0:
        raise ValueError(f"need S >= 2 seeds and sd >= 0, got S={S!r}, sd={sd!r}")
    if sd == 0:
        return 0.0
    lo, hi = 0.0, 20.0
    while hi - lo > 1e-6:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if paired_t_power(mid, S, alpha) < power else (lo, mid)
    return hi * sd


def prompt_bootstrap(values, *, n_boot=10000, level=0.95, seed=0):
    """The bootstrap over prompts within seeds: the seeds are kept, each seed's prompts are resampled
    with replacement, the statistic is the mean of the resampled (S, P) matrix (values: 0/1 outcomes
    or paired differences in {-1, 0, 1}). It measures how much the figure depends on which prompts
    were drawn, for these seeds only: not seed-to-seed variation. The stream, replayable:
        prompts = rng.integers(0, P, size=(n_boot, S, P)); mean_b = values[arange(S)[:, None], prompts[b]].mean()"""
    _check_settings(n_boot, level)
    x = np.asarray(values, dtype=np.float64)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.size == 0 or not np.isfinite(x).all():
        raise ValueError(f"values: expected a non-empty (seeds, prompts) array, got shape {np.shape(values)}")
    S, P = x.shape
    rng = np.random.default_rng(seed)
    out = np.empty(n_boot)
    chunk = max(1, _CHUNK_ELEMENTS // (S * P))
    rows = np.arange(S)[None, :, None]
    for b0 in range(0, n_boot, chunk):
        b1 = min(n_boot, b0 + chunk)
        prompts = rng.integers(0, P, size=(b1 - b0, S, P))
        out[b0:b1] = x[rows, prompts].mean(axis=(1, 2))
    tail = (1 - level) / 2
    lo, hi = np.quantile(out, [tail, 1 - tail])
    return Interval(float(x.mean()), float(lo), float(hi), level, S, P)
