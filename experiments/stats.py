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
