"""The privacy ledger's round hook: budget admission, charges, epsilon fields, ledgers.json."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from fedkd.assembly import dpsgd_settings, step_config, unprotected_outputs
from fedkd.learner.cohort import STUDENT_OUTPUTS, ClientResult
from fedkd.privacy.book import LedgerBook
from fedkd.privacy.ledger import DpSgdEvent, PrivacyEvent, UnprotectedReleaseEvent
from fedkd.results import RunRecorder
from fedkd.rounds.hooks import Replies, RoundHook, RoundState
from fedkd.spec import Spec
from strategies import Strategy
from strategies.params import Capabilities

log = logging.getLogger("fedkd")

LEDGERS_FILE = "ledgers.json"


class LedgerHook(RoundHook):
    """Charges every client's ledger and reports epsilon in each row (runs with a ledger book).

    Parameters
    ----------
    book : LedgerBook
        The run's per-client privacy ledgers.
    spec : Spec
        The run's spec (its privacy and training settings price a round before it runs).
    strategy : Strategy
        The algorithm's server side: its releases' events, and its bound on them.
    recorder : RunRecorder
        The results folder ``ledgers.json`` is written to.
    sizes : dict of int to int
        Each client's number of private examples (public by assumption, see
        docs/what-leaves-a-client.md).
    """

    def __init__(
        self,
        book: LedgerBook,
        spec: Spec,
        strategy: Strategy,
        recorder: RunRecorder,
        sizes: dict[int, int],
    ) -> None:
        self.book = book
        self.spec = spec
        self.strategy = strategy
        self.recorder = recorder
        self.sizes = sizes

    def admit(self, rnd: int, sampled: list[int]) -> list[int]:
        return admit_within_budget(
            self.book,
            self.spec,
            sampled,
            rnd,
            self.sizes,
            self.strategy.planned_release_events(rnd),
            self.strategy.planned_once_events(rnd),
        )

    def after_exchange(self, rnd: int, replies: Replies) -> None:
        record_dpsgd(self.book, replies.get("train", {}), rnd)
        record_unprotected(self.book, self.spec, self.strategy.capabilities, replies, rnd)

    def after_round(self, rnd: int, row: dict[str, Any], state: RoundState) -> None:
        if state.aggregated:
            for cid, events in self.strategy.release_events(rnd).items():
                for event in events:
                    self.book.record(cid, event)
            for cid, events in self.strategy.one_time_events(rnd).items():
                for event in events:
                    self.book.record(cid, event, recurs=False)
        row.update(epsilon_fields(self.book))
        self.recorder.write_extra(LEDGERS_FILE, self.book.to_dict())

    def on_run_end(self) -> None:
        self.recorder.write_extra(LEDGERS_FILE, self.book.to_dict())

    def state_dict(self) -> dict[str, Any]:
        return {"book": self.book}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.book = state["book"]


def epsilon_fields(book: LedgerBook) -> dict[str, Any]:
    """A row's privacy fields: each client's cumulative epsilon, their largest, and (PATE) the
    data-independent guarantee beside the unreleased data-dependent figure."""
    reports = book.reports()
    fields: dict[str, Any] = {"epsilon": {str(c): r.epsilon for c, r in reports.items()}}
    fields["epsilon_max"] = max(fields["epsilon"].values()) if reports else 0.0
    independent = [
        r.epsilon_rdp_data_independent
        for r in reports.values()
        if r.epsilon_rdp_data_independent is not None
    ]
    if independent:  # PATE: the guarantee is data-independent (= epsilon_max)
        fields["epsilon_data_independent_max"] = max(independent)
        # The data-dependent figure, computed from private votes and not released through a
        # mechanism: not a guarantee, reported under a name that says so.
        dependent = {
            str(c): r.epsilon_data_dependent_unreleased
            for c, r in reports.items()
            if r.epsilon_data_dependent_unreleased is not None
        }
        fields["epsilon_data_dependent_unreleased"] = dependent
        fields["epsilon_data_dependent_unreleased_max"] = max(dependent.values())
    fields["clients_stopped"] = len(book.stopped)
    return fields


def admit_within_budget(
    book: LedgerBook,
    spec: Spec,
    sampled: list[int],
    rnd: int,
    sizes: dict[int, int],
    worst_case: list[PrivacyEvent] | None = None,
    first_time: list[PrivacyEvent] | None = None,
) -> list[int]:
    """Drop sampled clients whose next round would exceed their privacy budget.

    The check is on the round's worst case, from round 1 on: an unprotected release where the
    run has one, DP-SGD, `worst_case`, the strategy's bound on what this round's release
    charges (`Strategy.planned_release_events`: its mechanisms' planned events), and before a
    client's first round `first_time`, what it is charged once (`Strategy.planned_once_events`:
    its label histogram). A client's DP-SGD
    cost is its last round's, scaled to this round's epochs; before it has taken part, the cost
    of this round for `sizes` (the client's number of private examples, public by assumption:
    see docs/what-leaves-a-client.md).
    """
    if book.budget_epsilon is None:
        return sampled
    extra: list[PrivacyEvent] = []
    unprotected = unprotected_outputs(spec)
    if unprotected:
        extra.append(UnprotectedReleaseEvent(", ".join(unprotected), rnd))
    train = step_config(spec.train)
    dp = dpsgd_settings(spec)
    # A run calibrated to target_epsilon fits its whole run in it: no round alone exceeds a
    # budget at least as large, and the (costly) calibration need not run on the server.
    calibrated_within = dp is not None and 0 < dp.target_epsilon <= book.budget_epsilon
    admitted = []
    for cid in sampled:
        first = [*extra, *(first_time or [])]
        if dp is not None and not calibrated_within:
            first.append(dp.round_event(sizes[cid], train.batch_size, train.epochs_in(rnd), rnd))
        was_stopped = cid in book.stopped
        planned = book.planned_events(cid, rnd, first, train.epochs_in, worst_case)
        if book.can_contribute(cid, planned):
            admitted.append(cid)
        elif not was_stopped:
            log.warning(
                "round %d: client %d stops contributing: one more round would exceed its "
                "budget of epsilon %.3g",
                rnd,
                cid,
                book.budget_epsilon,
            )
    return admitted


def record_unprotected(
    book: LedgerBook, spec: Spec, caps: Capabilities, replies: Replies, rnd: int
) -> None:
    """Charge an unprotected release to every client that sent its (non-DP) student's outputs.

    In a run that claims privacy (a ledger book) but trains students without DP-SGD, what a
    student computes (uploads, test logits and accuracy, distillation loss, exported weights)
    leaves the client with no mechanism behind it: its epsilon is infinite from then on. The
    event is recorded once per client, in the round of its first such release.
    """
    if spec.privacy.dpsgd:
        return
    # The algorithm's uploads that its clients' students compute count as their outputs.
    student_outputs = {*STUDENT_OUTPUTS, *caps.uploads}
    for part, results in replies.items():
        for cid, res in sorted(results.items()):
            ledger = book.ledgers.get(cid)
            if ledger is not None and ledger.has_unprotected:
                continue
            values = [
                f"{part}.{k}" for k in sorted({**res.arrays, **res.metrics}) if k in student_outputs
            ]
            if part == "export" or (part == "train" and caps.uploads_weights):
                values.append(f"{part}.<student weights>")
            if values:
                book.record(cid, UnprotectedReleaseEvent(", ".join(values), rnd), recurs=False)


def record_dpsgd(book: LedgerBook, results: dict[int, ClientResult], rnd: int) -> None:
    """Charge each client the DP-SGD steps it reports, and any steps it took unheard.

    `results` holds every reply that reports DP-SGD steps, used or not (a non-finite upload
    still came from private training). A client whose reply arrived too late (the node timed
    out) kept that round's training in its state, and what it releases from now on depends on
    it: its count of steps over the run runs ahead of its ledger, and the missing steps are
    charged now (sample rate and noise are the client's for the whole run), so that epsilon
    never leaves out a step that ran.
    """
    for cid, res in sorted(results.items()):
        if "dp_steps" not in res.metrics:
            continue
        event = DpSgdEvent(
            sample_rate=res.metrics["dp_sample_rate"],
            noise_multiplier=res.metrics["dp_noise_multiplier"],
            steps=int(res.metrics["dp_steps"]),
            round=rnd,
        )
        ledger = book.ledgers.get(cid)
        events = [] if ledger is None else ledger.events
        charged = sum(e.steps for e in events if isinstance(e, DpSgdEvent))
        unheard = int(res.metrics["dp_steps_total"]) - event.steps - charged
        if unheard > 0:
            log.warning(
                "round %d: client %d took %d DP-SGD steps in earlier round(s) whose reply the "
                "server never used (a timeout); its ledger charges them now",
                rnd,
                cid,
                unheard,
            )
            # A one-off catch-up, not part of next round's cost.
            book.record(cid, replace(event, steps=unheard), recurs=False)
        book.record(cid, event)
