"""One-run privacy audit with canaries (Steinke, Nasr and Jagielski, NeurIPS 2023).

``m`` canaries are drawn before training; each is included in the audited client's private
data independently with probability 1/2. After the run the auditor scores every canary with the
client's final student (the negative loss on the canary's label: memorised canaries score
high), guesses "included" for the ``k+`` highest scores and "excluded" for the ``k-`` lowest,
abstains on the rest, and counts the correct guesses ``v`` among the ``r = k+ + k-`` guesses.

If the training run is (epsilon, delta)-DP for every example, their Theorem 3 bounds the chance
of ``v`` or more correct guesses by

    P[W >= v] <= P[B >= v] + 2 m delta max_{1 <= i <= v} P[v > B >= v - i] / i,
    B ~ Binomial(r, q),

with ``q = e^eps / (1 + e^eps)`` (the accuracy of eps-DP randomised response). The empirical
lower bound at confidence ``1 - beta`` is the largest epsilon this p-value rejects at level
``beta`` (their Algorithm 2: bisection over epsilon).

The canaries themselves (drawn and inserted before training) are data: see
`fedkd.data.canaries`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "CanaryAudit",
    "audit_canaries",
    "one_run_epsilon_lower_bound",
    "one_run_p_value",
]

# Guesses tried, as fractions of m (k+ = k- = r / 2); the confidence is split over them
# (Bonferroni), so picking the best one afterwards keeps the bound valid.
GUESS_FRACTIONS: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.4, 1.0)


def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Probability of ``v`` or more correct guesses out of ``r`` under (epsilon, delta)-DP.

    Theorem 3 of Steinke, Nasr and Jagielski (2023).

    Parameters
    ----------
    m : int
        Number of canaries, each included independently with probability 1/2.
    r : int
        Number of guesses (canaries the auditor did not abstain on), ``r <= m``.
    v : int
        Number of correct guesses, ``v <= r``.
    epsilon : float
        Epsilon of the null hypothesis, ``>= 0``.
    delta : float
        Delta of the null hypothesis, in ``[0, 1]``.

    Returns
    -------
    float
        The p-value, capped at 1.
    """
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1], got {epsilon}, {delta}")
    # Imported here: scipy costs a second, and every run's driver imports this module
    # (through the end-of-run audit hook) while only an audit computes p-values.
    from scipy import stats
    from scipy.special import expit

    q = float(expit(epsilon))
    tail = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    alpha = 0.0
    if v > 0 and delta > 0:
        # P[v > B >= v - i] for i = 1..v, divided by i; the worst i is what delta can buy.
        window = np.cumsum(stats.binom.pmf(v - np.arange(1, v + 1), r, q))
        alpha = float(np.max(window / np.arange(1, v + 1)))
    return min(tail + 2 * m * delta * alpha, 1.0)


def one_run_epsilon_lower_bound(
    m: int, r: int, v: int, delta: float, confidence: float = 0.95, tol: float = 1e-7
) -> float:
    """The largest epsilon that ``v`` correct guesses out of ``r`` reject at ``confidence``.

    Their Algorithm 2: a bisection for the epsilon at which :func:`one_run_p_value` reaches
    ``beta = 1 - confidence``; the returned end keeps ``p < beta``, so the bound is never
    optimistic by more than ``tol``.

    Parameters
    ----------
    m, r, v : int
        Canaries, guesses and correct guesses, as in :func:`one_run_p_value`.
    delta : float
        The delta the audit is run at (the run's delta).
    confidence : float, default 0.95
        Confidence of the lower bound.
    tol : float, default 1e-7
        Bisection tolerance on epsilon.

    Returns
    -------
    float
        Empirical epsilon lower bound; 0 when the guesses reject nothing.
    """
    beta = 1.0 - confidence
    if not 0 < beta < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if one_run_p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while one_run_p_value(m, r, v, hi, delta) < beta:
        lo, hi = hi, 2 * hi
        if hi > 1e4:  # p never reaches beta: only possible with delta = 0 and v = r = m
            return math.inf
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if one_run_p_value(m, r, v, mid, delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class CanaryAudit:
    """Outcome of the one-run audit (JSON-ready through :func:`dataclasses.asdict`)."""

    m: int
    included: int
    guesses: int
    correct: int
    k_plus: int
    k_minus: int
    delta: float
    confidence: float
    epsilon_lower_bound: float
    candidates: list[dict[str, float]]


def audit_canaries(
    scores: np.ndarray,
    included: np.ndarray,
    delta: float,
    confidence: float = 0.95,
    fractions: tuple[float, ...] = GUESS_FRACTIONS,
) -> CanaryAudit:
    """Guess inclusion from scores and turn the correct guesses into an epsilon lower bound.

    For each fraction ``f`` the auditor guesses ``k = round(f m / 2)`` canaries "included"
    (highest scores) and ``k`` "excluded" (lowest scores). The confidence is split evenly over
    the fractions (Bonferroni), so reporting the best of them stays a valid ``confidence``
    lower bound.

    Parameters
    ----------
    scores : np.ndarray
        ``(m,)`` scores, higher = more likely included (e.g. minus the loss).
    included : np.ndarray
        ``(m,)`` bool, the truth.
    delta : float
        The delta the bound is computed at.
    confidence : float, default 0.95
        Overall confidence of the reported bound.
    fractions : tuple of float
        Fractions of ``m`` to guess on.

    Returns
    -------
    CanaryAudit
        The best bound over the fractions and every candidate's guesses.
    """
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    m = len(scores)
    if m < 2 or len(included) != m:
        raise ValueError(
            f"need one score per canary and at least 2, got {m} scores, {len(included)} labels"
        )
    order = np.argsort(-scores, kind="stable")  # best-scored first
    per_test = 1.0 - (1.0 - confidence) / len(fractions)
    best: CanaryAudit | None = None
    candidates = []
    for f in fractions:
        k = max(1, min(m // 2, round(f * m / 2)))
        top, bottom = order[:k], order[m - k :]
        v = int(included[top].sum() + (~included[bottom]).sum())
        eps = one_run_epsilon_lower_bound(m, 2 * k, v, delta, per_test)
        candidates.append({"k": k, "guesses": 2 * k, "correct": v, "epsilon_lower_bound": eps})
        # Ties (e.g. all 0) go to the larger guess set: its accuracy says more.
        if best is None or eps >= best.epsilon_lower_bound:
            best = CanaryAudit(
                m=m,
                included=int(included.sum()),
                guesses=2 * k,
                correct=v,
                k_plus=k,
                k_minus=k,
                delta=delta,
                confidence=confidence,
                epsilon_lower_bound=eps,
                candidates=[],
            )
    assert best is not None
    return dataclasses.replace(best, candidates=candidates)
