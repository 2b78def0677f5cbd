"""The seed-level t interval of a mean (mean +- t_{S-1} * sd / sqrt(S), one value per seed), the
Student t distribution it needs, and the Interval record the study's statistics return. Pure
math: experiments/stats.py (the study's statistics) and report.py (its tables) share it.
"""
import functools
import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    mean: float  # the statistic on the data as observed
    lo: float  # percentile bootstrap interval [lo, hi] at `level`
    hi: float
    level: float
    n_seeds: int
    n_prompts: int  # per seed


def t_cdf(x, df):
    """P(T <= x) for Student's t with df degrees of freedom: Simpson's rule on the density
    from 0 to |x| (4000 intervals, error far below 1e-8 for df >= 1 and |x| <= 100)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df!r}")
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    u = np.linspace(0.0, abs(x), 4001)
    f = c * (1 + u * u / df) ** (-(df + 1) / 2)
    h = abs(x) / 4000
    area = h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())
    return 0.5 + math.copysign(area, x)


@functools.lru_cache(maxsize=None)  # tables ask for the same few (q, df) many times
def t_quantile(q, df):
    """The q-quantile of Student's t (bisection on t_cdf to 1e-10)."""
    if not 0 < q < 1:
        raise ValueError(f"q must be in (0, 1), got {q!r}")
    lo, hi = -100.0, 100.0
    while hi - lo > 1e-10:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < q else (lo, mid)
    return (lo + hi) / 2


def seed_t_interval(per_seed, *, level=0.95):
    """Seed-level interval of a mean: per_seed (S,) holds one value per seed (an arm's accuracy,
    or a paired difference, averaged over that seed's prompts); returns mean +- t * sd / sqrt(S)
    with S - 1 degrees of freedom. S = 1 has no seed spread to measure: lo = hi = nan."""
    x = np.asarray(per_seed, dtype=np.float64)
    if x.ndim != 1 or x.size == 0 or not np.isfinite(x).all():
        raise ValueError(f"per_seed: expected a non-empty 1-D array of finite values, got {x!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    S, m = x.size, float(x.mean())
    if S == 1:
        return Interval(m, math.nan, math.nan, level, 1, 0)
    half = t_quantile(1 - (1 - level) / 2, S - 1) * float(x.std(ddof=1)) / math.sqrt(S)
    return Interval(m, m - half, m + half, level, S, 0)
