"""The audit's round hook: keep what the audited client distilled from, and its final student."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from fedkd.learner.cohort import ClientResult
from fedkd.results import RunRecorder, save_student, save_teachers
from fedkd.rounds.hooks import RoundHook, RoundState
from fedkd.spec import Spec

log = logging.getLogger("fedkd")


class AuditCaptureHook(RoundHook):
    """Captures the digests the audited client gets; at the end, keeps its final student.

    `fedkd audit` replays the kept digests on shadow models (docs/audits.md).

    Parameters
    ----------
    spec : Spec
        The run's spec (``audit.client`` is the audited client).
    recorder : RunRecorder
        The results folder the audit's files go to.
    export : callable
        Asks the audited client's node for its final student (``export(client) -> result``,
        None if it did not reply); the caller charges what that exchange released.
    """

    def __init__(
        self,
        spec: Spec,
        recorder: RunRecorder,
        export: Callable[[int], ClientResult | None],
    ) -> None:
        self.spec = spec
        self.recorder = recorder
        self.export = export
        self.teachers: dict[int, dict[str, np.ndarray]] = {}

    def after_round(self, rnd: int, row: dict[str, Any], state: RoundState) -> None:
        if state.digest_arrays and self.spec.audit.client in state.digest_ids:
            self.teachers[rnd] = state.digest_arrays  # the audit's shadows replay this digest

    def state_dict(self) -> dict[str, Any]:
        return {"teachers": self.teachers}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.teachers = state["teachers"]

    def on_run_end(self) -> None:
        save_teachers(self.recorder.dir, self.teachers)
        cid = self.spec.audit.client
        res = self.export(cid)
        if res is None:
            log.warning("audit: client %d did not send its final student; nothing to audit", cid)
            return
        save_student(
            self.recorder.dir,
            cid,
            self.spec.student_for(cid),
            res.arrays,
            int(res.metrics.get("rounds_trained", self.spec.rounds)),
        )
