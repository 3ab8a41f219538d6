"""PATE vote aggregation (GNMax, Confident-GNMax) and its Rényi-DP accounting.

Follows Papernot, Song, Mironov, Raghunathan, Talwar, Erlingsson, "Scalable Private Learning
with PATE" (ICLR 2018):

* GNMax: ``argmax_j(n_j + N(0, sigma^2))``. Changing one example changes one teacher's vote,
  which moves the vote histogram by at most sqrt(2) in L2, so the data-independent RDP of one
  query is ``lambda / sigma^2`` (Proposition 8).
* Data-dependent bound: Proposition 7 bounds ``q = Pr[GNMax(n) != argmax n]`` by
  ``sum_{i != i*} 1/2 erfc((n_{i*} - n_i) / (2 sigma))``; Theorem 6 (with Proposition 10's
  choice ``mu2 = sigma sqrt(log 1/q)``, ``mu1 = mu2 + 1``, ``eps_i = mu_i / sigma^2``) turns a
  small q into an RDP bound far below ``lambda / sigma^2``. It applies only for
  ``lambda < mu1`` and when ``q <= e^{(mu2-1) eps2} / (mu1/(mu1-1) * mu2/(mu2-1))^{mu2}``;
  elsewhere (and always as a cap) the data-independent value is used.
* Confident-GNMax: answer only if ``max_j n_j + N(0, sigma1^2) >= T``. The max vote has
  sensitivity 1, so the check costs ``lambda / (2 sigma1^2)`` per query, answered or not.
  The paper charges GNMax (``sigma2``) for the answered queries only; fedkd's guarantee
  charges it for every query asked, because which queries are answered is itself an output of
  the check (see :func:`pate_query_event`).

Caveat: the data-dependent epsilon is itself a function of the private votes. The paper
releases it through smooth sensitivity; fedkd does not, so the guarantee it reports (and
budgets with) is the data-independent one; the data-dependent figure stays beside it as
``epsilon_data_dependent_unreleased``, not a guarantee (both curves are in the
:class:`~fedkd.privacy.ledger.PateQueryEvent`, both epsilons in the accountant's report).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from fedkd.privacy.ledger import PateQueryEvent
from fedkd.privacy.noise import NoiseSource, as_noise_source

__all__ = [
    "confident_gnmax",
    "gnmax_aggregate",
    "log_q_gnmax",
    "pate_query_event",
    "pate_worst_case_event",
    "rdp_gnmax_data_dependent",
    "rdp_gnmax_data_independent",
    "rdp_threshold_data_dependent",
    "rdp_threshold_data_independent",
    "votes_from_predictions",
]


# --------------------------------------------------------------------------------------------
# aggregation


def votes_from_predictions(predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Vote histogram from teacher labels.

    Parameters
    ----------
    predictions : Tensor, shape (T, Q)
        Label predicted by each of T teachers for each of Q queries.
    num_classes : int
        Number of classes C.

    Returns
    -------
    Tensor, shape (Q, C)
        Vote counts (float), summing to T per query.
    """
    if predictions.ndim != 2:
        raise ValueError(f"predictions must have shape (T, Q), got {tuple(predictions.shape)}")
    t, q = predictions.shape
    votes = torch.zeros(q, num_classes, dtype=torch.float32, device=predictions.device)
    ones = torch.ones(t, q, dtype=torch.float32, device=predictions.device)
    votes.scatter_add_(1, predictions.long().T, ones.T)
    return votes


def _check_votes(votes: torch.Tensor) -> None:
    if votes.ndim != 2 or votes.shape[1] < 2:
        raise ValueError(f"votes must have shape (Q, C) with C >= 2, got {tuple(votes.shape)}")
    if not torch.isfinite(votes).all() or (votes < 0).any():
        raise ValueError("votes must be finite, non-negative counts")


def _check_sigma(name: str, sigma: float) -> None:
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {sigma!r}")


def _noise(
    shape: torch.Size, generator: torch.Generator | NoiseSource, like: torch.Tensor
) -> torch.Tensor:
    return as_noise_source(generator).normal(shape, dtype=torch.float64, device=like.device)


def gnmax_aggregate(
    votes: torch.Tensor, sigma: float, generator: torch.Generator | NoiseSource
) -> torch.Tensor:
    """GNMax: the noisy arg-max of each query's vote histogram.

    Parameters
    ----------
    votes : Tensor, shape (Q, C)
        Vote counts.
    sigma : float
        Noise std.
    generator : torch.Generator or NoiseSource
        Noise source (a generator: seeded noise, see :mod:`fedkd.privacy.noise`).

    Returns
    -------
    Tensor, shape (Q,), long
        ``argmax(votes + N(0, sigma^2))`` per query.
    """
    _check_votes(votes)
    _check_sigma("sigma", sigma)
    noisy = votes.double() + sigma * _noise(votes.shape, generator, votes)
    return noisy.argmax(dim=1)


def confident_gnmax(
    votes: torch.Tensor,
    threshold: float,
    sigma1: float,
    sigma2: float,
    generator: torch.Generator | NoiseSource,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Confident-GNMax: answer a query only if its noisy max vote clears the threshold.

    Parameters
    ----------
    votes : Tensor, shape (Q, C)
        Vote counts.
    threshold : float
        T: a query is answered iff ``max(votes) + N(0, sigma1^2) >= T``.
    sigma1 : float
        Noise std of the threshold check.
    sigma2 : float
        Noise std of GNMax on answered queries.
    generator : torch.Generator or NoiseSource
        Noise source (threshold noise drawn first, then GNMax noise for all queries).

    Returns
    -------
    labels : Tensor, shape (Q,), long
        GNMax label of answered queries, -1 elsewhere.
    answered : Tensor, shape (Q,), bool
        Which queries were answered.
    """
    _check_votes(votes)
    _check_sigma("sigma1", sigma1)
    _check_sigma("sigma2", sigma2)
    max_votes = votes.double().max(dim=1).values
    answered = max_votes + sigma1 * _noise(max_votes.shape, generator, votes) >= threshold
    labels = gnmax_aggregate(votes, sigma2, generator)
    # The GNMax draw of unanswered queries is never released.
    labels = torch.where(answered, labels, torch.full_like(labels, -1))
    return labels, answered


# --------------------------------------------------------------------------------------------
# Rényi-DP bounds


def _orders_array(orders: Sequence[float] | np.ndarray | None) -> np.ndarray:
    # The accountant (dp-accounting, seconds to import) only when its orders are the default:
    # the PATE strategy is imported by every ClientApp process.
    from fedkd.privacy.accountant import RDP_ORDERS

    arr = np.asarray(RDP_ORDERS if orders is None else orders, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0 or not np.all(np.isfinite(arr)) or np.any(arr <= 1):
        raise ValueError("orders must be a non-empty 1-D list of finite Rényi orders > 1")
    return arr


def _log1mexp(x: np.ndarray) -> np.ndarray:
    """log(1 - exp(x)) for x <= 0, stable at both ends."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x < -math.log(2.0), np.log1p(-np.exp(x)), np.log(-np.expm1(x)))


def rdp_gnmax_data_independent(sigma: float, orders: Sequence[float] | None = None) -> np.ndarray:
    """Data-independent RDP of one GNMax query: ``lambda / sigma^2`` (Proposition 8).

    Parameters
    ----------
    sigma : float
        GNMax noise std.
    orders : sequence of float, optional
        Rényi orders (> 1); defaults to the accountant's ``RDP_ORDERS``.

    Returns
    -------
    ndarray, shape (L,)
    """
    _check_sigma("sigma", sigma)
    return _orders_array(orders) / sigma**2


def log_q_gnmax(votes: np.ndarray | torch.Tensor, sigma: float) -> np.ndarray:
    """Proposition 7: upper bound on ``log Pr[GNMax != argmax]`` per query.

    ``q <= sum_{i != i*} 1/2 erfc((n_{i*} - n_i) / (2 sigma))``, capped at ``1 - 1/C`` (the
    uniform distribution's value), as in the paper's code.

    Parameters
    ----------
    votes : array, shape (C,) or (Q, C)
        Vote counts.
    sigma : float
        GNMax noise std.

    Returns
    -------
    ndarray, shape () or (Q,)
        log of the bound on q.
    """
    _check_sigma("sigma", sigma)
    # scipy.special costs a fresh process (every Ray worker) a fraction of a second: only PATE
    # accounting needs it.
    from scipy.special import log_ndtr, logsumexp

    v = _as_votes(votes)
    n_classes = v.shape[-1]
    top = v.argmax(axis=-1)
    gaps = np.take_along_axis(v, top[..., None], axis=-1) - v  # n_{i*} - n_i >= 0
    # 1/2 erfc(d / (2 sigma)) = Phi(-d / (sqrt(2) sigma)), evaluated in log space.
    log_terms = log_ndtr(-gaps / (math.sqrt(2.0) * sigma))
    np.put_along_axis(log_terms, top[..., None], -np.inf, axis=-1)  # exclude i* itself
    logq = logsumexp(log_terms, axis=-1)
    return np.minimum(logq, math.log1p(-1.0 / n_classes))


def _as_votes(votes: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(votes, torch.Tensor):
        votes = votes.detach().cpu().numpy()
    v = np.asarray(votes, dtype=np.float64)
    if v.ndim not in (1, 2) or v.shape[-1] < 2:
        raise ValueError(f"votes must have shape (C,) or (Q, C) with C >= 2, got {v.shape}")
    if not np.all(np.isfinite(v)) or np.any(v < 0):
        raise ValueError("votes must be finite, non-negative counts")
    return v


def _rdp_from_logq(logq: np.ndarray, sigma: float, orders: np.ndarray) -> np.ndarray:
    """Theorem 6 (Prop. 10 orders) given log q per query; min'ed with lambda / sigma^2.

    Returns shape (Q, L) for logq of shape (Q,).
    """
    logq = np.atleast_1d(np.asarray(logq, dtype=np.float64))
    var = sigma**2
    lam = orders[None, :]
    ret = np.broadcast_to(lam / var, (logq.size, orders.size)).copy()

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        mu2 = sigma * np.sqrt(-logq)
        mu1 = mu2 + 1.0
        eps1 = mu1 / var
        eps2 = mu2 / var
        # Condition of Theorem 6 in log form: log q <= (mu2-1) eps2 - mu2 log(mu1/(mu1-1) *
        # mu2/(mu2-1)); plus q e^{eps2} < 1 so that A > 0, and mu2 > 1 for the orders to exist.
        cond_rhs = (mu2 - 1.0) * eps2 - mu2 * (
            np.log1p(1.0 / (mu1 - 1.0)) + np.log1p(1.0 / (mu2 - 1.0))
        )
        ok = np.isfinite(logq) & (mu2 > 1.0) & (logq <= cond_rhs) & (-logq > eps2)
        if np.any(ok):
            lq = logq[ok][:, None]
            m1, m2 = mu1[ok][:, None], mu2[ok][:, None]
            e1, e2 = eps1[ok][:, None], eps2[ok][:, None]
            log1q = _log1mexp(lq)  # log(1 - q)
            # A = (1-q) / (1 - (q e^{eps2})^{(mu2-1)/mu2}),  B = e^{eps1} / q^{1/(mu1-1)}
            log_a = log1q - _log1mexp((lq + e2) * (1.0 - 1.0 / m2))
            log_b = e1 - lq / (m1 - 1.0)
            # D_lambda <= 1/(lambda-1) log((1-q) A^{lambda-1} + q B^{lambda-1})
            log_s = np.logaddexp(log1q + (lam - 1.0) * log_a, lq + (lam - 1.0) * log_b)
            dep = log_s / (lam - 1.0)
            sub = ret[ok]
            applies = lam < m1  # Theorem 6 needs lambda <= mu1 (strict, as the paper's code)
            ret[ok] = np.where(applies, np.minimum(sub, dep), sub)
    # A mechanism whose output is certain (q = 0) reveals nothing.
    ret[np.isneginf(logq)] = 0.0
    return ret


def rdp_gnmax_data_dependent(
    votes: np.ndarray | torch.Tensor, sigma: float, orders: Sequence[float] | None = None
) -> np.ndarray:
    """Data-dependent RDP of GNMax at the given votes (Theorem 6 with Proposition 7).

    Parameters
    ----------
    votes : array, shape (C,) or (Q, C)
        Vote counts of one query or of Q queries.
    sigma : float
        GNMax noise std.
    orders : sequence of float, optional
        Rényi orders (> 1); defaults to the accountant's ``RDP_ORDERS``.

    Returns
    -------
    ndarray, shape (L,) or (Q, L)
        Per-query RDP, never above ``lambda / sigma^2``.
    """
    lam = _orders_array(orders)
    v = _as_votes(votes)
    out = _rdp_from_logq(log_q_gnmax(v, sigma), sigma, lam)
    return out[0] if v.ndim == 1 else out


def rdp_threshold_data_independent(
    sigma1: float, orders: Sequence[float] | None = None
) -> np.ndarray:
    """Data-independent RDP of one Confident-GNMax threshold check: ``lambda / (2 sigma1^2)``.

    The max vote has sensitivity 1 (GNMax's histogram has sqrt(2)), hence the factor 2.
    """
    _check_sigma("sigma1", sigma1)
    return _orders_array(orders) / (2.0 * sigma1**2)


def rdp_threshold_data_dependent(
    votes: np.ndarray | torch.Tensor,
    threshold: float,
    sigma1: float,
    orders: Sequence[float] | None = None,
) -> np.ndarray:
    """Data-dependent RDP of the threshold check (the paper's analysis code).

    With ``p = Pr[answered] = Phi((max n - T) / sigma1)``, the check is a two-outcome
    mechanism whose less likely outcome has probability ``q = min(p, 1 - p)``; Theorem 6 applies
    with noise ``sqrt(2) sigma1`` (sensitivity 1 instead of GNMax's sqrt(2)).

    Returns
    -------
    ndarray, shape (L,) or (Q, L)
    """
    from scipy.special import log_ndtr

    _check_sigma("sigma1", sigma1)
    lam = _orders_array(orders)
    v = _as_votes(votes)
    log_p = log_ndtr((v.max(axis=-1) - threshold) / sigma1)
    logq = np.minimum(log_p, _log1mexp(np.minimum(log_p, 0.0)))
    out = _rdp_from_logq(np.atleast_1d(logq), math.sqrt(2.0) * sigma1, lam)
    return out[0] if v.ndim == 1 else out


def pate_query_event(
    votes: np.ndarray | torch.Tensor,
    answered_mask: np.ndarray | torch.Tensor | None,
    sigma1: float | None,
    sigma2: float,
    orders: Sequence[float] | None = None,
    round: int = 0,
    *,
    threshold: float | None = None,
    threshold_bound: Literal["data_independent", "data_dependent"] = "data_independent",
) -> PateQueryEvent:
    """Ledger event for a batch of (Confident-)GNMax queries.

    Data-independent curve (the guarantee): every query asked pays for the threshold check (if
    ``sigma1`` is given) and for GNMax with ``sigma2``, answered or not. Which queries are
    answered is an output of the threshold check, and composition needs each step's cost fixed
    before its input is seen; a cost that depends on outputs (GNMax charged only where
    answered) is a pay-as-you-go reading that needs a privacy filter or odometer to be a
    guarantee (Rogers et al. 2016). Data-dependent curve (Papernot et al. 2018, not a
    guarantee): the threshold check per query and GNMax's Theorem 6 bound for the answered
    queries. RDP adds up over queries.

    Parameters
    ----------
    votes : array, shape (Q, C)
        Vote counts of every query asked.
    answered_mask : array of bool, shape (Q,), or None
        Which queries were answered; ``None`` means all (plain GNMax).
    sigma1 : float or None
        Threshold noise std; ``None`` for plain GNMax (no threshold step).
    sigma2 : float
        GNMax noise std.
    orders : sequence of float, optional
        Rényi orders (> 1); defaults to the accountant's ``RDP_ORDERS``. Use the same orders
        for all events of a ledger (the accountant composes at their common orders).
    round : int, default 0
        Federated round.
    threshold : float, optional
        T; needed only for ``threshold_bound="data_dependent"``.
    threshold_bound : {"data_independent", "data_dependent"}, default "data_independent"
        How the threshold check is charged in the data-dependent curve: ``lambda/(2 sigma1^2)``
        per query, or the paper's data-dependent bound (which it uses for its headline
        numbers). The data-independent curve of the event always uses ``lambda/(2 sigma1^2)``.

    Returns
    -------
    PateQueryEvent
        Summed data-dependent and data-independent curves, answered and asked counts.
    """
    lam = _orders_array(orders)
    v = _as_votes(votes)
    if v.ndim != 2:
        raise ValueError(f"votes must have shape (Q, C), got {v.shape}")
    n_queries = v.shape[0]
    if answered_mask is None:
        if sigma1 is not None:
            raise ValueError("answered_mask is required for Confident-GNMax (sigma1 given)")
        answered = np.ones(n_queries, dtype=bool)
    else:
        if isinstance(answered_mask, torch.Tensor):
            answered_mask = answered_mask.detach().cpu().numpy()
        answered = np.asarray(answered_mask, dtype=bool)
        if answered.shape != (n_queries,):
            raise ValueError(f"answered_mask must have shape ({n_queries},), got {answered.shape}")
    n_answered = int(answered.sum())

    dep = np.zeros_like(lam)
    if sigma1 is not None:
        if threshold_bound == "data_independent":
            dep += n_queries * rdp_threshold_data_independent(sigma1, lam)
        elif threshold_bound == "data_dependent":
            if threshold is None:
                raise ValueError("threshold is required for threshold_bound='data_dependent'")
            if n_queries:
                dep += rdp_threshold_data_dependent(v, threshold, sigma1, lam).sum(axis=0)
        else:
            raise ValueError(
                "threshold_bound must be 'data_independent' or 'data_dependent', "
                f"got {threshold_bound!r}"
            )
    if n_answered:
        dep += rdp_gnmax_data_dependent(v[answered], sigma2, lam).sum(axis=0)
    return PateQueryEvent(
        orders=lam.tolist(),
        rdp=dep.tolist(),
        data_independent_rdp=_data_independent_rdp(n_queries, sigma1, sigma2, lam).tolist(),
        answered=n_answered,
        queries=n_queries,
        round=round,
    )


def _data_independent_rdp(
    queries: int, sigma1: float | None, sigma2: float, orders: np.ndarray
) -> np.ndarray:
    """Every query pays the threshold check (if any) and GNMax: fixed before any vote."""
    rdp = queries * rdp_gnmax_data_independent(sigma2, orders)
    if sigma1 is not None:
        rdp = rdp + queries * rdp_threshold_data_independent(sigma1, orders)
    return rdp


def pate_worst_case_event(
    queries: int,
    sigma1: float | None,
    sigma2: float,
    orders: Sequence[float] | None = None,
    round: int = 0,
) -> PateQueryEvent:
    """The most a batch of `queries` (Confident-)GNMax queries can be charged, before any vote.

    Both curves are the batch's data-independent curve (every query pays the threshold check,
    if ``sigma1`` is given, and GNMax): the event of the real batch
    (:func:`pate_query_event`) has the same data-independent curve and a data-dependent one
    never above it. The budget check plans a round with it.

    Parameters
    ----------
    queries : int
        Queries the batch will ask.
    sigma1 : float or None
        Threshold noise std; ``None`` for plain GNMax.
    sigma2 : float
        GNMax noise std.
    orders : sequence of float, optional
        Rényi orders (> 1); defaults to the accountant's ``RDP_ORDERS``.
    round : int, default 0
        Federated round.

    Returns
    -------
    PateQueryEvent
        With ``answered == queries``.
    """
    lam = _orders_array(orders)
    curve = _data_independent_rdp(queries, sigma1, sigma2, lam).tolist()
    return PateQueryEvent(
        orders=lam.tolist(),
        rdp=curve,
        data_independent_rdp=curve,
        answered=queries,
        queries=queries,
        round=round,
    )
