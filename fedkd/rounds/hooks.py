"""Hooks of the round loop, in the spirit of pfl-research's training-process callbacks.

The ServerApp's round loop (`fedkd.apps.server_app`) is the round skeleton of the design: sample,
exchange, aggregate, digest, evaluate. Everything else a round does (charging the privacy ledger,
capturing what the audit replays, writing the metrics row, checkpointing) is a `RoundHook`
called at fixed points of that skeleton, in the order the hooks are listed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from fedkd.learner.cohort import ClientResult
from fedkd.results import RunRecorder

# Every result one exchange brought, per part ("digest", "evaluate", "train", "export") and
# client, used or rejected (a non-finite upload still came from private training).
Replies = dict[str, dict[int, ClientResult]]


@dataclass
class RoundState:
    """What a round left behind once its server side is done (its row is not final yet).

    Attributes
    ----------
    round : int
        The round number (from 1).
    aggregated : bool
        Whether the strategy aggregated uploads this round (enough clients replied).
    ok : dict of int to ClientResult
        The uploads the round used, per client.
    failed : set of int
        The sampled clients whose upload the round could not use.
    digest_ids : list of int
        The clients that digest the round's payload in the next exchange.
    digest_arrays : dict of str to ndarray
        That payload.
    evaluate_ids : list of int
        The clients evaluated in the next exchange.
    evaluate_arrays : dict of str to ndarray
        What they get with their evaluation (the strategy's `evaluate_payload`).
    """

    round: int
    aggregated: bool = False
    ok: dict[int, ClientResult] = field(default_factory=dict)
    failed: set[int] = field(default_factory=set)
    digest_ids: list[int] = field(default_factory=list)
    digest_arrays: dict[str, np.ndarray] = field(default_factory=dict)
    evaluate_ids: list[int] = field(default_factory=list)
    evaluate_arrays: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class LoopState:
    """The round loop's own bookkeeping that later rounds depend on (a checkpoint keeps it).

    Attributes
    ----------
    round : int
        The last round whose server side is done (0 before the first).
    lost : set of int
        Clients failed since their last good reply (each loss is recorded once).
    open_round : object or None
        The round whose row waits for the next exchange (the loop's own type).
    """

    round: int = 0
    lost: set[int] = field(default_factory=set)
    open_round: Any = None


class RoundHook(Protocol):
    """Side work at fixed points of the round loop; every method defaults to doing nothing.

    The loop calls, per run: `on_run_start` once; per round: `admit` (which sampled clients
    may take part), `after_exchange` for every exchange with the nodes, `after_round` once the
    server side of the round is done (its row still open: the next exchange brings its
    digest and evaluation), `on_row` when a round's row is final; and `on_run_end` once.
    A hook whose work depends on earlier rounds returns that state from `state_dict`.
    """

    def on_run_start(self) -> None:
        """The run starts (or resumes)."""

    def admit(self, rnd: int, sampled: list[int]) -> list[int]:
        """The sampled clients that may take part in round `rnd` (all, by default)."""
        return sampled

    def after_exchange(self, rnd: int, replies: Replies) -> None:
        """An exchange of round `rnd` returned `replies`."""

    def after_round(self, rnd: int, row: dict[str, Any], state: RoundState) -> None:
        """Round `rnd`'s server side is done; hooks may add fields to its open `row`."""

    def on_row(self, row: dict[str, Any]) -> None:
        """A round's metrics row is final."""

    def on_run_end(self) -> None:
        """Every round is done."""

    def state_dict(self) -> dict[str, Any]:
        """What the hook carries from round to round (a checkpoint keeps it; none by default)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what `state_dict` returned (on resume)."""


class HookChain:
    """Calls each hook in order (for `admit`: each on what the previous one admitted)."""

    def __init__(self, hooks: Sequence[RoundHook]) -> None:
        self.hooks = list(hooks)

    def on_run_start(self) -> None:
        for hook in self.hooks:
            hook.on_run_start()

    def admit(self, rnd: int, sampled: list[int]) -> list[int]:
        for hook in self.hooks:
            sampled = hook.admit(rnd, sampled)
        return sampled

    def after_exchange(self, rnd: int, replies: Replies) -> None:
        for hook in self.hooks:
            hook.after_exchange(rnd, replies)

    def after_round(self, rnd: int, row: dict[str, Any], state: RoundState) -> None:
        for hook in self.hooks:
            hook.after_round(rnd, row, state)

    def on_row(self, row: dict[str, Any]) -> None:
        for hook in self.hooks:
            hook.on_row(row)

    def on_run_end(self) -> None:
        for hook in self.hooks:
            hook.on_run_end()


class MetricsRowHook(RoundHook):
    """Appends each final row to ``metrics.jsonl`` and passes it to `on_round` (progress).

    Parameters
    ----------
    recorder : RunRecorder
        The run's results folder.
    on_round : callable or None, default None
        Called with the round number and its row once the row is on disk.
    """

    def __init__(
        self,
        recorder: RunRecorder,
        on_round: Callable[[int, dict[str, Any]], None] | None = None,
    ) -> None:
        self.recorder = recorder
        self.on_round = on_round

    def on_row(self, row: dict[str, Any]) -> None:
        self.recorder.record_round(row)
        if self.on_round is not None:
            self.on_round(row["round"], row)
