"""Spread over seeds: mean, sample standard deviation and a t confidence interval."""

from __future__ import annotations

import math
from dataclasses import dataclass

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Stats:
    """Mean, sample sd and a t confidence interval of the mean over `n` values."""

    n: int
    mean: float | None
    sd: float | None
    ci_low: float | None
    ci_high: float | None


def t_quantile(p: float, dof: int) -> float:
    """The `p` quantile of Student's t distribution with `dof` degrees of freedom (scipy:
    installed with opacus and scikit-learn, both fedkd dependencies)."""
    from scipy.stats import t

    return float(t.ppf(p, dof))


def describe(values: list[float]) -> Stats:
    """`Stats` of `values`: None for what they cannot give (no values; sd and CI of one)."""
    n = len(values)
    if n == 0:
        return Stats(0, None, None, None, None)
    mean = math.fsum(values) / n
    if n == 1:
        return Stats(1, mean, None, None, None)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.5 + CONFIDENCE / 2, n - 1) * sd / math.sqrt(n)
    return Stats(n, mean, sd, mean - half, mean + half)
