"""Every client's privacy ledger over a whole run, and the budget rule.

The server keeps the book: clients report the DP-SGD events of their local training, the server
adds the events of its own releases, and epsilon is always the composition of a client's whole
ledger (cumulative over the run, never per round). A client whose next round would take it over
its budget stops contributing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from fedkd.privacy.accountant import EpsilonReport, compute_epsilon, would_exceed_budget
from fedkd.privacy.ledger import DpSgdEvent, PrivacyEvent, PrivacyLedger


class LedgerBook:
    """Per-client ledgers with a shared delta and an optional epsilon budget.

    Parameters
    ----------
    delta : float
        The delta every epsilon is reported at.
    budget_epsilon : float or None
        Per-client budget; None = no enforcement.
    noise_rng : {"seeded", "secure"}, default "seeded"
        Where the mechanisms' noise came from (`fedkd.privacy.noise`); recorded with the
        ledgers: the epsilons of seeded noise hold for the simulation only.
    """

    def __init__(
        self, delta: float, budget_epsilon: float | None = None, noise_rng: str = "seeded"
    ) -> None:
        self.delta = delta
        self.budget_epsilon = budget_epsilon
        self.noise_rng = noise_rng
        self.ledgers: dict[int, PrivacyLedger] = {}
        # Each client's events of the last round it took part in: the cost of one more round.
        self._last_round: dict[int, list[PrivacyEvent]] = {}
        self.stopped: set[int] = set()

    def _ledger(self, client_id: int) -> PrivacyLedger:
        if client_id not in self.ledgers:
            self.ledgers[client_id] = PrivacyLedger(
                client_id, [], budget_epsilon=self.budget_epsilon, delta=self.delta
            )
        return self.ledgers[client_id]

    def record(self, client_id: int, event: PrivacyEvent, recurs: bool = True) -> None:
        """Add `event` to the client's ledger; `recurs=False` for a once-per-run charge (it is
        not projected into the cost of the client's next round)."""
        self._ledger(client_id).add(event)
        if not recurs:
            return
        last = self._last_round.setdefault(client_id, [])
        if last and last[0].round != event.round:
            last.clear()
        last.append(event)

    def planned_events(
        self,
        client_id: int,
        round_num: int,
        first_round: list[PrivacyEvent] | None = None,
        epochs_in: Callable[[int], int] | None = None,
        worst_case: list[PrivacyEvent] | None = None,
    ) -> list[PrivacyEvent]:
        """What one more round would cost: the client's last round's events again, or (before
        its first round) `first_round`, the cost the server can foresee. With `epochs_in` (a
        round's local epochs), DP-SGD steps scale from the last round's epochs to this one's.
        `worst_case`: events whose bound the server knows before the round (PATE's queries);
        they are planned from round 1 on and replace the last round's events of the same kind,
        which need not cost the same again."""
        worst_case = list(worst_case or [])
        bounded = {type(e) for e in worst_case}
        last = self._last_round.get(client_id)
        if not last:
            return list(first_round or []) + worst_case
        planned = [dataclasses.replace(e, round=round_num) for e in worst_case]
        for event in last:
            if type(event) in bounded:
                continue
            if isinstance(event, DpSgdEvent) and epochs_in is not None:
                then, now = epochs_in(event.round), epochs_in(round_num)
                if then > 0:  # steps = batches per epoch x epochs, so this divides exactly
                    event = dataclasses.replace(event, steps=event.steps * now // then)
            planned.append(dataclasses.replace(event, round=round_num))
        return planned

    def can_contribute(self, client_id: int, planned: list[PrivacyEvent]) -> bool:
        """False (and remembered) once the planned events would exceed the budget."""
        if client_id in self.stopped:
            return False
        if self.budget_epsilon is None or not planned:
            return True
        if would_exceed_budget(self._ledger(client_id), planned):
            self.stopped.add(client_id)
            return False
        return True

    def reports(self) -> dict[int, EpsilonReport]:
        """Cumulative epsilon (with the accountant's details) of every client with a ledger."""
        return {
            cid: compute_epsilon(ledger, self.delta) for cid, ledger in sorted(self.ledgers.items())
        }

    def to_dict(self) -> dict:
        return {
            "delta": self.delta,
            "budget_epsilon": self.budget_epsilon,
            "noise_rng": self.noise_rng,
            "stopped": sorted(self.stopped),
            "ledgers": {str(cid): led.to_dict() for cid, led in sorted(self.ledgers.items())},
        }
