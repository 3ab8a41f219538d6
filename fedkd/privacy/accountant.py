"""Compose a client's privacy ledger into (epsilon, delta) with dp-accounting.

Two accountants run on the same events:

* **PLD** (``dp_accounting.pld.PLDAccountant``): privacy loss distributions, numerically
  tight up to a (pessimistic) discretisation. This is the **primary** number whenever the
  ledger has only DP-SGD and Gaussian-release events, because it is the tightest valid bound
  dp-accounting offers for Poisson-subsampled Gaussians (RDP over-reports in the usual
  regimes; tests/test_privacy_accounting.py checks both on a reference composition).
* **RDP** (``dp_accounting.rdp.RdpAccountant``), always computed beside it as a cross-check.
  When the ledger holds PATE events it is the primary number: PATE's curves are RDP curves
  with no PLD counterpart, so they are added to the RDP of the other events at the same orders
  and converted to (epsilon, delta) with dp-accounting's ``compute_epsilon`` (Balle et al. 2020
  conversion). The guarantee uses PATE's data-independent curves. The data-dependent bound of
  Papernot et al. 2018 is itself a function of the private votes; fedkd does not release it
  through the paper's smooth-sensitivity step, so it is reported beside the guarantee as
  ``epsilon_data_dependent_unreleased`` and never drives a budget.

Everything is under the add-or-remove-one neighbouring relation, the one Opacus uses.

An unprotected release (values computed from private data that left the client with no
mechanism behind them) has no finite bound under any relation: a ledger holding one reports
``epsilon = inf`` (method ``"unprotected"``), by both accountants.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fedkd.privacy.ledger import (
    DpSgdEvent,
    GaussianReleaseEvent,
    PateQueryEvent,
    PrivacyEvent,
    PrivacyLedger,
    UnprotectedReleaseEvent,
)

if TYPE_CHECKING:
    from dp_accounting import DpEvent, NeighboringRelation

__all__ = [
    "PLD_VALUE_DISCRETIZATION",
    "RDP_ORDERS",
    "EpsilonReport",
    "compute_epsilon",
    "epsilon_after",
    "neighboring_relation",
    "would_exceed_budget",
]


def neighboring_relation() -> NeighboringRelation:
    """The neighbouring relation every epsilon here is stated under: add or remove one.

    A function, not a constant: dp-accounting (with scipy) takes about a second to import, and
    the driver of a run without privacy imports this module (through the ledger) but never
    accounts, so dp-accounting is imported where it is first used.
    """
    from dp_accounting import NeighboringRelation

    return NeighboringRelation.ADD_OR_REMOVE_ONE


# Dense Rényi orders. Fine steps where the optimum lies for epsilon in ~[0.5, 20]
# (orders ~2-64), coarser above; integer orders above 64 because dp-accounting's integer path
# is exact (its cost grows with the order, hence the coarse tail). The list starts at 1.5:
# lower orders only matter for epsilon >~ 25 at delta = 1e-5, and dp-accounting's fractional
# series fails to converge there for large sampling rates.
RDP_ORDERS: tuple[float, ...] = tuple(
    float(o)
    for o in np.unique(
        np.round(
            np.concatenate(
                [
                    np.arange(1.5, 6.0, 0.05),
                    np.arange(6.0, 20.0, 0.25),
                    np.arange(20.0, 64.0, 0.5),
                    np.arange(64.0, 256.0, 4.0),
                    np.arange(256.0, 1024.0, 64.0),
                    [1024.0, 1536.0, 2048.0],
                ]
            ),
            6,
        )
    )
)

# PLD value discretisation. 1e-3 stays close to a 1e-4 computation for epsilon >= 1 (the
# accounting tests compare them); the discretisation error is roughly additive, so for
# epsilon < 1 the PLD is recomputed with interval epsilon/1000 (floor 1e-5).
PLD_VALUE_DISCRETIZATION = 1e-3
_PLD_MIN_DISCRETIZATION = 1e-5


@dataclass(frozen=True)
class EpsilonReport:
    """Epsilon of a ledger at one delta.

    Attributes
    ----------
    epsilon : float
        The reported epsilon, a guarantee: ``epsilon_pld`` when the ledger has no PATE events,
        else ``epsilon_rdp`` (PATE's curves cannot go through PLD).
    epsilon_pld : float or None
        PLD epsilon of the non-PATE events; ``None`` when PATE events are present.
    epsilon_rdp : float
        RDP epsilon of all events (PATE with its data-independent curve).
    delta : float
        The delta the epsilons are for.
    method : str
        ``"pld"`` or ``"rdp"``: which accountant produced ``epsilon``; ``"unprotected"`` when
        the ledger holds an unprotected release (every epsilon is then ``inf``).
    epsilon_rdp_data_independent : float or None
        With PATE events: RDP epsilon using PATE's data-independent curves (equal to
        ``epsilon``).
    rdp_order : float or None
        The Rényi order at which ``epsilon_rdp`` was attained.
    pld_discretization : float or None
        The PLD value discretisation interval used.
    epsilon_data_dependent_unreleased : float or None
        With PATE events: RDP epsilon using PATE's data-dependent curves (Papernot et al. 2018).
        Not a guarantee: it is computed from the private votes and not released through a
        private mechanism.
    """

    epsilon: float
    epsilon_pld: float | None
    epsilon_rdp: float
    delta: float
    method: str
    epsilon_rdp_data_independent: float | None = None
    rdp_order: float | None = None
    pld_discretization: float | None = None
    epsilon_data_dependent_unreleased: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def compute_epsilon(ledger: PrivacyLedger, delta: float | None = None) -> EpsilonReport:
    """Cumulative epsilon of every event in ``ledger``.

    Parameters
    ----------
    ledger : PrivacyLedger
        The client's ledger.
    delta : float, optional
        Target delta; defaults to ``ledger.delta``.

    Returns
    -------
    EpsilonReport
        PLD is primary without PATE events, RDP with them (see the module docstring). An empty
        ledger gives epsilon 0.
    """
    return _report(ledger.events, ledger.delta if delta is None else delta)


def epsilon_after(
    ledger: PrivacyLedger, extra_events: list[PrivacyEvent], delta: float | None = None
) -> EpsilonReport:
    """Epsilon the ledger would have with ``extra_events`` appended (the ledger is unchanged).

    Parameters
    ----------
    ledger : PrivacyLedger
        The client's ledger.
    extra_events : list of PrivacyEvent
        Events of a planned round.
    delta : float, optional
        Target delta; defaults to ``ledger.delta``.

    Returns
    -------
    EpsilonReport
        As :func:`compute_epsilon`.
    """
    return _report(
        list(ledger.events) + list(extra_events), ledger.delta if delta is None else delta
    )


def would_exceed_budget(ledger: PrivacyLedger, extra_events: list[PrivacyEvent]) -> bool:
    """Whether appending ``extra_events`` would push the reported epsilon above the budget.

    Parameters
    ----------
    ledger : PrivacyLedger
        The client's ledger; ``ledger.budget_epsilon`` ``None`` means no budget.
    extra_events : list of PrivacyEvent
        Events of the planned round.

    Returns
    -------
    bool
        ``True`` iff the post-round epsilon (at ``ledger.delta``) is strictly greater than
        the budget. A client for which this is ``True`` must not take part in the round.
    """
    if ledger.budget_epsilon is None:
        return False
    return epsilon_after(ledger, extra_events).epsilon > ledger.budget_epsilon


# --------------------------------------------------------------------------------------------
# internals


def _report(events: list[PrivacyEvent], delta: float) -> EpsilonReport:
    if not (0.0 < delta < 1.0):
        raise ValueError(f"delta must lie in (0, 1), got {delta!r}")
    if any(isinstance(e, UnprotectedReleaseEvent) for e in events):
        inf = math.inf
        return EpsilonReport(inf, inf, inf, float(delta), "unprotected")
    sgd, releases, pate = _group(events)
    return _report_cached(sgd, releases, pate, float(delta))


def _group(events: list[PrivacyEvent]) -> tuple[tuple, tuple, tuple]:
    """Merge events with identical parameters (composition is commutative), hashable."""
    sgd: dict[tuple[float, float], int] = {}
    releases: dict[float, int] = {}
    pate: list[PateQueryEvent] = []
    for e in events:
        if isinstance(e, DpSgdEvent):
            if e.steps > 0 and e.sample_rate > 0:  # no sampled example, no privacy cost
                key = (float(e.sample_rate), float(e.noise_multiplier))
                sgd[key] = sgd.get(key, 0) + e.steps
        elif isinstance(e, GaussianReleaseEvent):
            if e.count > 0:
                sigma = float(e.noise_multiplier)
                releases[sigma] = releases.get(sigma, 0) + e.count
        elif isinstance(e, PateQueryEvent):
            pate.append(e)
        else:
            raise TypeError(f"not a privacy event: {e!r}")
    pate_key = tuple((e.orders, e.rdp, e.data_independent_rdp) for e in pate)
    return tuple(sorted(sgd.items())), tuple(sorted(releases.items())), pate_key


def _dp_event(sgd: tuple, releases: tuple) -> DpEvent:
    from dp_accounting import (
        ComposedDpEvent,
        GaussianDpEvent,
        PoissonSampledDpEvent,
        SelfComposedDpEvent,
    )

    parts: list[DpEvent] = [
        SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), steps)
        for (q, sigma), steps in sgd
    ]
    parts += [SelfComposedDpEvent(GaussianDpEvent(sigma), count) for sigma, count in releases]
    return ComposedDpEvent(parts)


class _UnconvergedOrderFilter(logging.Filter):
    """Hides dp-accounting's "failed to converge ... Excluding this order" warnings.

    For a fractional order whose series does not converge (large noise with a sampling rate
    near 1/2, as a small DP-SGD client has), dp-accounting returns an infinite RDP at that
    order, which `compute_epsilon` skips: the epsilon is still a valid bound from the other
    orders (and RDP is only the cross-check beside PLD). It warns once per order and curve,
    18 lines per run, about nothing the user can act on.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


@functools.lru_cache(maxsize=4096)
def _unit_rdp(kind: str, q: float, sigma: float, orders: tuple[float, ...]) -> np.ndarray:
    """RDP curve of ONE step/release, from dp-accounting; cached because ledgers repeat them.

    RDP composes additively, so a ledger's curve is sum(count * unit curve): exactly what
    ``RdpAccountant.compose(SelfComposedDpEvent(e, count))`` computes, without recomputing the
    (costly, for high orders) subsampled-Gaussian curve for every round and client.
    """
    from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent
    from dp_accounting.rdp import RdpAccountant

    acc = RdpAccountant(list(orders), neighboring_relation())
    inner = GaussianDpEvent(sigma)
    absl_log, quiet = logging.getLogger("absl"), _UnconvergedOrderFilter()
    absl_log.addFilter(quiet)
    try:
        acc.compose(PoissonSampledDpEvent(q, inner) if kind == "sgd" else inner)
    finally:
        absl_log.removeFilter(quiet)
    curve = acc.rdp
    curve.setflags(write=False)
    return curve


def _rdp_of(sgd: tuple, releases: tuple, orders: tuple[float, ...]) -> np.ndarray:
    total = np.zeros(len(orders), dtype=np.float64)
    for (q, sigma), steps in sgd:
        total += steps * _unit_rdp("sgd", q, sigma, orders)
    for sigma, count in releases:
        total += count * _unit_rdp("gaussian", 1.0, sigma, orders)
    return total


def _common_orders(pate: tuple) -> tuple[float, ...]:
    """Orders shared by every PATE event (RDP holds order by order, so any subset is valid)."""
    common = set(RDP_ORDERS) if not pate else None
    for orders, _, _ in pate:
        s = {round(o, 9) for o in orders}
        common = s if common is None else common & s
    if not common:
        raise ValueError("the PATE events in the ledger share no Rényi order; cannot compose")
    return tuple(sorted(common))


def _pate_sum(pate: tuple, orders: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    dep = np.zeros(len(orders))
    ind = np.zeros(len(orders))
    for ev_orders, rdp, rdp_ind in pate:
        index = {round(o, 9): i for i, o in enumerate(ev_orders)}
        idx = [index[o] for o in orders]
        dep += np.asarray(rdp)[idx]
        ind += np.asarray(rdp_ind)[idx]
    return dep, ind


def _rdp_epsilon(orders: tuple[float, ...], rdp: np.ndarray, delta: float) -> tuple[float, float]:
    if np.all(rdp == 0):
        return 0.0, float(orders[0])
    from dp_accounting.rdp import compute_epsilon as rdp_to_epsilon

    eps, order = rdp_to_epsilon(list(orders), list(rdp), delta)
    return float(eps), float(order)


def _pld_epsilon(event: DpEvent, delta: float) -> tuple[float, float]:
    from dp_accounting.pld import PLDAccountant

    def run(interval: float) -> float:
        acc = PLDAccountant(neighboring_relation(), value_discretization_interval=interval)
        acc.compose(event)
        return float(acc.get_epsilon(delta))

    interval = PLD_VALUE_DISCRETIZATION
    eps = run(interval)
    # The PLD is pessimistic (an upper bound); its error is roughly additive in the interval,
    # so small epsilons need a finer grid to stay well under 1% relative error.
    if math.isfinite(eps) and eps < 1.0:
        interval = max(eps / 1000.0, _PLD_MIN_DISCRETIZATION)
        eps = run(interval)
    return max(eps, 0.0), interval


@functools.lru_cache(maxsize=4096)
def _report_cached(sgd: tuple, releases: tuple, pate: tuple, delta: float) -> EpsilonReport:
    if not sgd and not releases and not pate:
        return EpsilonReport(0.0, 0.0, 0.0, delta, "pld")
    orders = _common_orders(pate)
    rdp_dp = _rdp_of(sgd, releases, orders)
    if pate:
        dep, ind = _pate_sum(pate, orders)
        eps_ind, order = _rdp_epsilon(orders, rdp_dp + ind, delta)
        eps_dep, _ = _rdp_epsilon(orders, rdp_dp + dep, delta)
        return EpsilonReport(
            epsilon=eps_ind,
            epsilon_pld=None,
            epsilon_rdp=eps_ind,
            delta=delta,
            method="rdp",
            epsilon_rdp_data_independent=eps_ind,
            rdp_order=order,
            epsilon_data_dependent_unreleased=eps_dep,
        )
    eps_rdp, order = _rdp_epsilon(orders, rdp_dp, delta)
    eps_pld, interval = _pld_epsilon(_dp_event(sgd, releases), delta)
    return EpsilonReport(
        epsilon=eps_pld,
        epsilon_pld=eps_pld,
        epsilon_rdp=eps_rdp,
        delta=delta,
        method="pld",
        rdp_order=order,
        pld_discretization=interval,
    )
