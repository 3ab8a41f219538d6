"""Noise calibration for DP-SGD, once for the whole planned run.

The noise multiplier is calibrated for ALL the DP-SGD steps a client will take over the run
(rounds x local steps), never per round: a per-round calibration would spend the whole budget
in every round.
"""

from __future__ import annotations

import logging
import math
import warnings

from fedkd.privacy.accountant import compute_epsilon, neighboring_relation
from fedkd.privacy.ledger import DpSgdEvent, PrivacyEvent, PrivacyLedger

__all__ = ["calibrate_noise_multiplier", "check_room_for_dpsgd"]

_log = logging.getLogger(__name__)

_OPACUS_ACCOUNTANTS = ("prv", "rdp", "gdp")


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "prv",
    other_events: tuple[PrivacyEvent, ...] | list[PrivacyEvent] = (),
) -> float:
    """Smallest noise multiplier whose whole-run DP-SGD epsilon stays within the target.

    Calls Opacus's ``get_noise_multiplier`` with a binary-search tolerance of 0.5% of the
    target, then checks the result with fedkd's own accountant (dp-accounting PLD, the number
    the ledger reports and budgets are enforced against): if that epsilon is above the target
    (the accountants differ by discretisation), the multiplier is raised in 0.5% steps until it
    is not, so that a run calibrated to a budget is never stopped by it in its last round.

    Parameters
    ----------
    target_epsilon : float
        Epsilon for the whole run (> 0).
    delta : float
        Delta, in (0, 1).
    sample_rate : float
        Poisson sampling rate per step, in (0, 1].
    steps : int
        Total DP-SGD steps over the run (all rounds x all local steps), >= 1.
    accountant : {"prv", "rdp", "gdp"}, default "prv"
        Opacus accountant used for the search. ``"prv"`` is the tight one (close to PLD);
        ``"rdp"`` gives ~10% more noise than needed.
    other_events : sequence of PrivacyEvent, default ()
        The client's other charges over the run (e.g. a label-histogram release): DP-SGD
        composed with them must stay within the target. Opacus searches for DP-SGD alone, then
        a bisection on a coarse PLD grid (pessimistic, so the result lands up to about 1%
        below the target) raises the multiplier until the composition fits.

    Returns
    -------
    float
        The noise multiplier.

    Raises
    ------
    ValueError
        On an argument out of range or a budget Opacus cannot reach.
    """
    if not (isinstance(target_epsilon, int | float) and math.isfinite(target_epsilon)):
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    if target_epsilon <= 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon!r}")
    if not (isinstance(delta, int | float) and 0.0 < delta < 1.0):
        raise ValueError(f"delta must lie in (0, 1), got {delta!r}")
    if not (isinstance(sample_rate, int | float) and 0.0 < sample_rate <= 1.0):
        raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if accountant not in _OPACUS_ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {_OPACUS_ACCOUNTANTS}, got {accountant!r}")

    check_room_for_dpsgd(target_epsilon, delta, other_events)

    kwargs = {}
    if accountant == "prv":
        # PRV's own epsilon error defaults to 0.01 absolute: too loose for small targets.
        kwargs["eps_error"] = min(0.01, 0.005 * target_epsilon)
    # Imported here: Opacus takes seconds to import, and most processes never calibrate.
    import dp_accounting
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with warnings.catch_warnings():
            # Opacus's RDP helper (used inside PRV for its domain) nags about its order range.
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            sigma = float(
                get_noise_multiplier(
                    target_epsilon=float(target_epsilon),
                    target_delta=float(delta),
                    sample_rate=float(sample_rate),
                    steps=steps,
                    accountant=accountant,
                    epsilon_tolerance=0.005 * target_epsilon,
                    **kwargs,
                )
            )
    except ValueError as err:
        raise ValueError(
            f"cannot calibrate DP-SGD noise for target_epsilon={target_epsilon}, delta={delta}, "
            f"sample_rate={sample_rate}, steps={steps}: {err}"
        ) from err

    def run_events(noise: float) -> list[PrivacyEvent]:
        return [DpSgdEvent(sample_rate, noise, steps), *other_events]

    def run_epsilon(noise: float) -> float:
        return compute_epsilon(PrivacyLedger(0, run_events(noise), None, delta)).epsilon

    if other_events and run_epsilon(sigma) > target_epsilon:
        # The search runs on a coarse PLD grid (an upper bound: it errs towards more noise);
        # the exact check below confirms the result.
        def coarse_epsilon(noise: float) -> float:
            accountant = dp_accounting.pld.PLDAccountant(
                neighboring_relation(), value_discretization_interval=target_epsilon / 200
            )
            events = [e.dp_event() for e in run_events(noise)]
            accountant.compose(dp_accounting.ComposedDpEvent(events))
            return float(accountant.get_epsilon(delta))

        sigma = _bisect_noise(coarse_epsilon, target_epsilon, sigma)
    # Verify against the accountant that enforces budgets (PLD).
    for _ in range(200):
        eps = run_epsilon(sigma)
        if eps <= target_epsilon:
            return sigma
        _log.info(
            "Opacus sigma %.5f gives PLD epsilon %.5f > %.5f; raising", sigma, eps, target_epsilon
        )
        sigma *= 1.005
    raise ValueError(  # pragma: no cover - would mean the accountants disagree wildly
        f"calibrated noise multiplier does not reach target_epsilon={target_epsilon}"
    )


def check_room_for_dpsgd(
    target_epsilon: float, delta: float, other_events: tuple[PrivacyEvent, ...] | list[PrivacyEvent]
) -> None:
    """Raise unless the client's other releases leave part of `target_epsilon` for DP-SGD.

    Raises
    ------
    ValueError
        If the other releases alone spend the whole target.
    """
    if not other_events:
        return
    alone = compute_epsilon(PrivacyLedger(0, list(other_events), None, delta)).epsilon
    if alone >= target_epsilon:
        raise ValueError(
            f"the client's other releases alone spend epsilon {alone:.4g} of the "
            f"target_epsilon={target_epsilon}: nothing is left for DP-SGD (add noise to "
            "them, e.g. a larger privacy.histogram_noise)"
        )


def _bisect_noise(run_epsilon, target_epsilon: float, too_small: float) -> float:
    """A noise multiplier within 0.5% above the smallest one that fits the target, given one
    that does not (the other releases take part of the budget)."""
    low, high = too_small, too_small * 1.05
    for _ in range(1000):  # DP-SGD's epsilon falls to 0 as its noise grows: this ends
        if run_epsilon(high) <= target_epsilon:
            break
        low, high = high, high * 1.05
    while high / low > 1.005:
        mid = math.sqrt(low * high)
        if run_epsilon(mid) > target_epsilon:
            low = mid
        else:
            high = mid
    return high
