"""The fedkd ServerApp: drives a strategy from `strategies/` through the rounds.

Each round: sample clients, send one ``train.round`` message to each node hosting them (it also
carries the previous round's teacher to digest and, on evaluation rounds, the evaluation; see
`fedkd.apps.wire`), hand the valid uploads to the strategy, and write the previous round's
metrics row. After the last round, one more exchange carries its digest and evaluation. A node
that fails or times out, or a client whose upload is not finite or whose private training
diverged (its learner undoes that round), counts in ``clients_failed`` (and once, with its
cause, in ``clients_lost``) and the round goes on with the others; a round in which every
sampled client fails stops the run, as does a dead simulation worker.
"""

from __future__ import annotations

import logging
import math
import shutil
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from fedkd.apps import wire
from fedkd.apps.faults import ServerFaults
from fedkd.apps.run_config import spec_from_run_config
from fedkd.assembly import (
    build_strategy,
    eval_test_indices,
    federated_data,
    learner_choice,
    ledger_book,
    unprotected_outputs,
)
from fedkd.learner.cohort import DIGEST_DIVERGED, TRAIN_DIVERGED, ClientResult
from fedkd.learner.device import set_up_torch
from fedkd.learner.loop import PHASE_SAMPLE, accuracy, derive_seed
from fedkd.results import RunRecorder, default_run_dir
from fedkd.rounds.audit_capture import AuditCaptureHook
from fedkd.rounds.checkpoint import CHECKPOINTS, CheckpointHook
from fedkd.rounds.hooks import (
    HookChain,
    LoopState,
    MetricsRowHook,
    Replies,
    RoundHook,
    RoundState,
)
from fedkd.rounds.ledger import LedgerHook
from fedkd.spec import Spec
from strategies import Strategy

log = logging.getLogger("fedkd")

RoundCallback = Callable[[int, dict[str, Any]], None]
# Called with the spec and the results folder once a run has completed: the run layer passes the
# end-of-run audit here, which this layer does not import (it sits above the apps).
AfterRun = Callable[[Spec, Path], None]


class FederationError(RuntimeError):
    """The federation cannot run the spec (e.g. clients no node hosts)."""


class RunStopped(RuntimeError):
    """The run was asked to stop (Ctrl-C, SIGTERM) while it ran."""


# How Ray names a simulation worker that died (killed, out of memory): Flower's engine keeps
# handing it messages, so the nodes it served would fail every later round.
DEAD_WORKER_MARK = "ActorDiedError"


class StoppableGrid:
    """A grid whose waits end as soon as `stop` is set (raising `RunStopped`).

    Flower's ``send_and_receive`` waits up to the timeout for replies that an engine being
    shut down never sends; this one pushes, then pulls in short steps and checks `stop`
    between them. A grid without push/pull (the tests' in-process grid) is asked whole, with
    `stop` checked before and after.
    """

    def __init__(self, grid: Grid, stop: threading.Event) -> None:
        self.grid = grid
        self.stop = stop

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def check(self) -> None:
        if self.stop.is_set():
            raise RunStopped("stopped by a signal")

    def send_and_receive(
        self, messages: list[Message], *, timeout: float | None = None
    ) -> list[Message]:
        self.check()
        if not hasattr(self.grid, "pull_messages"):
            replies = list(self.grid.send_and_receive(messages, timeout=timeout))
            self.check()
            return replies
        waiting = set(self.grid.push_messages(messages))
        end = time.monotonic() + (math.inf if timeout is None else timeout)
        interval = getattr(self.grid, "pull_interval", SIMULATION_PULL_INTERVAL)
        replies: list[Message] = []
        while waiting and time.monotonic() < end:
            got = list(self.grid.pull_messages(waiting))
            replies.extend(got)
            waiting -= {m.metadata.reply_to_message_id for m in got}
            if waiting and self.stop.wait(interval):
                break
        self.check()
        return replies


def sample_clients(spec: Spec, round_num: int) -> list[int]:
    """This round's clients: a seeded draw of max(min_clients, fraction * N), sorted."""
    n = spec.clients.num_clients
    k = min(n, max(spec.clients.min_clients, math.ceil(spec.clients.fraction * n)))
    if k == n:
        return list(range(n))
    rng = np.random.default_rng(derive_seed(spec.seed, round_num, PHASE_SAMPLE, 0))
    return sorted(int(c) for c in rng.choice(n, k, replace=False))


def discover_clients(grid: Grid, spec: Spec, timeout: float) -> dict[int, int]:
    """Ask every node which clients it hosts; wait until all clients are hosted."""
    node_of: dict[int, int] = {}
    asked: set[int] = set()
    deadline = time.monotonic() + timeout
    while len(node_of) < spec.clients.num_clients:
        new = [n for n in grid.get_node_ids() if n not in asked]
        if new:
            msgs = [
                Message(content=wire.request({}), dst_node_id=n, message_type=wire.MSG_HELLO)
                for n in new
            ]
            for reply in grid.send_and_receive(msgs, timeout=timeout):
                if reply.has_error():
                    # Not marked as asked: a node that went away, or whose ClientApp failed
                    # (e.g. a site file that does not fit), is asked again until the deadline.
                    log.warning(
                        "node %s did not say which clients it hosts: %s",
                        _reply_node(reply, msgs),
                        reply.error.reason,
                    )
                    continue
                asked.add(reply.metadata.src_node_id)
                for cid in reply.content["config"]["client_ids"]:
                    node_of[int(cid)] = reply.metadata.src_node_id
        if time.monotonic() > deadline:
            missing = sorted(set(range(spec.clients.num_clients)) - set(node_of))
            raise FederationError(
                f"no node hosts clients {missing[:10]}{'...' if len(missing) > 10 else ''} "
                f"after {timeout:g} s (resources.round_timeout): the spec needs "
                f"{spec.num_nodes} nodes (clients.num_clients / clients.clients_per_node); "
                "start that many SuperNodes or set num-supernodes, or wait longer"
            )
        if len(node_of) < spec.clients.num_clients:
            time.sleep(0.5)
    return node_of


def _reply_node(reply: Message, sent: list[Message]) -> int:
    """The node a reply answers for.

    A reply's source is not always the node: when a node stops sending heartbeats, the
    SuperLink itself answers its messages with a "node unavailable" error, from the SuperLink's
    id. The message it replies to (its id is set when the grid pushes it) names the node.
    """
    for msg in sent:
        if (
            msg.metadata.message_id
            and msg.metadata.message_id == reply.metadata.reply_to_message_id
        ):
            return msg.metadata.dst_node_id
    return reply.metadata.src_node_id


def _finite(result: ClientResult) -> bool:
    return all(np.isfinite(a).all() for a in result.arrays.values() if a.dtype.kind == "f")


@dataclass
class Exchange:
    """The replies to one message per node: valid results per part and client, and failures."""

    results: dict[str, dict[int, ClientResult]] = field(
        default_factory=lambda: {part: {} for part in wire.PARTS}
    )
    # Clients whose node failed or did not reply: every part they were asked for is lost.
    failed: set[int] = field(default_factory=set)
    # Why each failed or rejected client failed (one line each).
    causes: dict[int, str] = field(default_factory=dict)
    # Results that were not finite, per part: not used, but kept for their metrics (a client
    # whose upload is NaN still ran its DP-SGD steps, and the ledger charges them).
    rejected: dict[str, dict[int, ClientResult]] = field(default_factory=lambda: defaultdict(dict))
    # Learner seconds per replying node.
    node_learner_s: dict[int, float] = field(default_factory=dict)
    # Their phases summed over the replying nodes that timed them, under the nodes' keys
    # ``<clock>.<phase>`` (`wire.PHASE_CLOCKS`, `wire.NODE_PHASES`).
    learner_phases: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    # The largest peak memory (MiB) any replying node reported, per kind (peak_rss_mb, peak_gpu_mb).
    peak_mb: dict[str, float] = field(default_factory=dict)

    def failed_in(self, part: str) -> set[int]:
        return self.failed | set(self.rejected[part])

    def replies(self) -> Replies:
        """Every result per part, used or rejected (what the round hooks charge)."""
        return {part: {**self.rejected[part], **self.results[part]} for part in wire.PARTS}

    def admit(self, part: str, cid: int, result: ClientResult) -> None:
        """Keep a client's reply for `part`, or reject it (with its cause) if it is not finite
        or its private training diverged."""
        if result.metrics.get(TRAIN_DIVERGED):
            # Its learner undid the round's training; what it uploads is from before the round.
            log.warning(
                "client %s's private training diverged (non-finite student); its %s reply is "
                "ignored and it trains again next round from its student before",
                cid,
                part,
            )
            self.rejected[part][cid] = result
            self.causes.setdefault(cid, "private training diverged (non-finite student)")
        elif _finite(result):
            self.results[part][cid] = result
        else:
            log.warning("client %s sent non-finite values (%s); ignored", cid, part)
            self.rejected[part][cid] = result
            self.causes.setdefault(cid, f"non-finite values in its {part} reply")

    def take(self, asked: dict[str, list[int]], parts: dict[str, dict[int, ClientResult]]) -> None:
        """A node's reply to a request that `asked` for these clients per part: admit each
        result; a client asked for and absent from the reply is lost (it crashed)."""
        for part, results in parts.items():
            for cid, res in results.items():
                self.admit(part, cid, res)
        for part, ids in asked.items():
            for cid in ids:
                if cid not in self.results[part] and cid not in self.rejected[part]:
                    log.warning("client %s: no %s result in its node's reply", cid, part)
                    self.lose(cid, wire.NO_RESULT)

    def lose(self, cid: int, cause: str) -> None:
        """A client's whole reply is lost (a crash, a late reply), for `cause`."""
        for part in wire.PARTS:
            self.results[part].pop(cid, None)
            self.rejected[part].pop(cid, None)
        self.failed.add(cid)
        self.causes[cid] = cause

    def fail(self, node_parts: dict[str, list[int]], cause: str) -> None:
        """Every client a node was asked about failed, for `cause`."""
        for ids in node_parts.values():
            self.failed.update(ids)
            for cid in ids:
                self.causes.setdefault(cid, cause)


def _first_line(text: str, limit: int = 300) -> str:
    """One line of an error reason (a node's may hold a whole traceback)."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    line = lines[0] if lines else "no reason given"
    return line if len(line) <= limit else line[: limit - 3] + "..."


def run_exchange(
    grid: Grid,
    node_of: dict[int, int],
    parts: dict[str, list[int]],
    message_type: str,
    config: dict[str, Any],
    arrays: dict[str, np.ndarray],
    timeout: float,
) -> Exchange:
    """One message per node hosting a client named in `parts` ({part: client ids})."""
    by_node: dict[int, dict[str, list[int]]] = defaultdict(lambda: {p: [] for p in parts})
    for part, cids in parts.items():
        for cid in cids:
            by_node[node_of[cid]][part].append(cid)
    # every node gets the same arrays: encode them once, not once per message (Flower's Array
    # also caches its content hash, so the shared record is hashed once when deflated)
    payload = wire.to_array_record(arrays)
    msgs = [
        Message(
            content=wire.request(
                {**config, **{f"{p}_ids": ids for p, ids in node_parts.items()}}, payload
            ),
            dst_node_id=node,
            message_type=message_type,
            group_id=str(config.get("round", 0)),
        )
        for node, node_parts in by_node.items()
    ]
    outcome = Exchange()
    replied: set[int] = set()
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        node = _reply_node(reply, msgs)
        replied.add(node)
        if reply.has_error():
            log.warning("node %s failed in %s: %s", node, message_type, reply.error.reason)
            outcome.fail(by_node.get(node, {}), f"node error: {_first_line(reply.error.reason)}")
            continue
        node_parts, node_metrics = wire.record_to_results(reply.content)
        outcome.node_learner_s[node] = node_metrics.get("learner_s", 0.0)
        for key in _PHASE_KEYS & node_metrics.keys():
            outcome.learner_phases[key] += node_metrics[key]
        for key in ("peak_rss_mb", "peak_gpu_mb"):
            if key in node_metrics:
                outcome.peak_mb[key] = max(outcome.peak_mb.get(key, 0.0), node_metrics[key])
        outcome.take(by_node[node], node_parts)
    for node in set(by_node) - replied:
        log.warning("node %s sent no reply in %s within %.0f s", node, message_type, timeout)
        outcome.fail(by_node[node], f"no reply within resources.round_timeout ({timeout:g} s)")
    # Replies arrive in any order; float sums over clients (teachers, means) must not depend on
    # it, or the same seed gives last-digit differences between node layouts.
    for part in outcome.results:
        outcome.results[part] = dict(sorted(outcome.results[part].items()))
    return outcome


# The node metrics that hold a phase's seconds by one clock.
_PHASE_KEYS = {f"{c}.{p}" for c in wire.PHASE_CLOCKS for p in wire.NODE_PHASES}


def _learner_phases(exchanges: list[Exchange]) -> dict[str, dict[str, float]]:
    """The nodes' phase seconds summed over `exchanges`, by clock and phase in the order the
    nodes run them ({clock: {phase: seconds}}); only the clocks and phases nodes sent."""
    total: dict[str, float] = defaultdict(float)
    for exchange in exchanges:
        for key, seconds in exchange.learner_phases.items():
            total[key] += seconds
    phases: dict[str, dict[str, float]] = {}
    for clock in wire.PHASE_CLOCKS:
        timed = {p: total[f"{clock}.{p}"] for p in wire.NODE_PHASES if f"{clock}.{p}" in total}
        if timed:
            phases[clock] = timed
    return phases


def _peak(exchanges: list[Exchange], key: str) -> float | None:
    values = [x.peak_mb[key] for x in exchanges if key in x.peak_mb]
    return max(values) if values else None


def _statistic(results: dict[int, ClientResult], key: str) -> tuple[list[float], bool]:
    """A private statistic of every client that sent it (a metric, or in the oracle channel),
    and whether any came through the oracle channel (a value a deployment would not have)."""
    values = [r.metrics.get(key, r.oracle.get(key)) for r in results.values()]
    return [v for v in values if v is not None], any(key in r.oracle for r in results.values())


def _oracle_fields(row: dict[str, Any], fields: list[str]) -> None:
    """Name in ``row["oracle_metrics"]`` the fields measured through the oracle channel."""
    if fields:
        row["oracle_metrics"] = sorted({*row.get("oracle_metrics", []), *fields})


# Row fields that average a private statistic of the clients (`PRIVATE_STATISTICS`), by key.
CLIENT_STATISTIC_FIELDS = {"local_acc": "client_local_acc_mean", "val_acc": "client_val_acc_mean"}


def _client_metrics(
    results: dict[int, ClientResult], row: dict[str, Any], extra: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The clients' accuracies for `row`, and the mean of each `extra` metric (the
    algorithm's `evaluation_metrics`) as ``<name>_mean``; fields read from the oracle channel
    are named in ``row["oracle_metrics"]``. A NaN statistic (an empty slice) is left out of
    its mean."""
    test = [r.metrics["test_acc"] for r in results.values() if "test_acc" in r.metrics]
    metrics: dict[str, Any] = {
        "client_test_acc_mean": float(np.mean(test)) if test else None,
        "client_test_acc_min": float(np.min(test)) if test else None,
        "client_test_acc_max": float(np.max(test)) if test else None,
    }
    fields = {**CLIENT_STATISTIC_FIELDS, **{key: f"{key}_mean" for key in extra}}
    for key, name in fields.items():
        values, oracle = _statistic(results, key)
        values = [v for v in values if math.isfinite(v)]
        metrics[name] = float(np.mean(values)) if values else None
        if oracle:
            _oracle_fields(row, [name])
    return metrics


def _teacher_acc(
    strategy: Strategy, results: dict[int, ClientResult], test_y: np.ndarray, num_examples: dict
) -> float | None:
    ids = sorted(c for c in results if "test_logits" in results[c].arrays)
    if not ids:
        return None
    logits = torch.from_numpy(np.stack([results[c].arrays["test_logits"] for c in ids]))
    weights = torch.tensor([num_examples.get(c, 1.0) for c in ids], dtype=torch.float32)
    teacher = strategy.teacher_test_logits(logits, weights, ids)
    return None if teacher is None else accuracy(teacher, test_y)


# Seconds between reply pulls of Flower's in-memory simulation grid (Flower's default 0.1 s).
# `run_simulation` builds the grid without exposing this parameter; replies wait up to one
# interval, and pulling the in-memory state more often costs next to nothing.
SIMULATION_PULL_INTERVAL = 0.01


def _poll_replies_faster(grid: Grid) -> None:
    try:
        from flwr.superlink.grid import InMemoryGrid
    except ImportError:  # another Flower layout: keep its default
        return
    if isinstance(grid, InMemoryGrid):
        grid.pull_interval = SIMULATION_PULL_INTERVAL


def run_rounds(
    grid: Grid,
    spec: Spec,
    recorder: RunRecorder,
    on_round: RoundCallback | None = None,
    stop: threading.Event | None = None,
    after_run: AfterRun | None = None,
    resume: Path | None = None,
) -> dict[str, Any]:
    """The whole run; returns the summary. Finished rounds are on disk whatever happens.

    `resume`: a checkpoint folder (`fedkd.rounds.checkpoint.last_checkpoint`) to continue
    from, into a `recorder` that holds the run's rows up to it (`RunRecorder.resume`).

    Setting `stop` ends the run at its next wait for replies (or between rounds) with
    `RunStopped` and ``"status": "interrupted"``; any other error ends it with ``"failed"``.
    `after_run` runs once the run has completed (e.g. `fedkd.audit.run_audit.audit_finished_run`).
    """
    _poll_replies_faster(grid)
    # The server student and the teachers compute here: the spec's thread count, not the
    # machine's or the environment's (see resources.num_threads), set up as the nodes' torch.
    set_up_torch(spec.resources.torch_threads)
    if stop is not None:
        grid = StoppableGrid(grid, stop)
    try:
        summary = _run_rounds(grid, spec, recorder, on_round, resume)
    except RunStopped as err:
        recorder.finish(status="interrupted", error=str(err))
        raise
    except Exception as err:
        if stop is not None and stop.is_set():  # e.g. Ctrl-C in a terminal also hit the workers
            recorder.finish(status="interrupted", error=f"stopped by a signal ({err})")
            raise RunStopped("stopped by a signal") from err
        recorder.finish(status="failed", error=f"{type(err).__name__}: {err}")
        raise
    finally:  # after the audit's export, the last reader of the clients' states
        shutil.rmtree(state_store_root(recorder), ignore_errors=True)
    if after_run is not None:
        after_run(spec, recorder.dir)
    return summary


@dataclass
class _OpenRound:
    """A round whose clients digest its teacher (and are evaluated) in the next exchange.

    Its metrics row is written once that exchange has returned: wall and learner seconds run
    from the start of its own exchange to the start of the next one (the last round's to the
    end of the final exchange), so that they add up to the run's time.
    """

    row: dict[str, Any]
    started: float
    evaluate: bool
    state: RoundState
    exchanges: list[Exchange]


def _digest_request(open_round: _OpenRound | None) -> tuple[dict[str, list[int]], dict, dict]:
    """The parts, config and arrays of an exchange that carry `open_round`'s digest."""
    if open_round is None:
        return {}, {}, {}
    parts = {"digest": open_round.state.digest_ids, "evaluate": open_round.state.evaluate_ids}
    config = {"digest_round": open_round.row["round"]}
    arrays = {
        **wire.with_prefix(open_round.state.digest_arrays, wire.DIGEST_PREFIX),
        **wire.with_prefix(open_round.state.evaluate_arrays, wire.EVALUATE_PREFIX),
    }
    return parts, config, arrays


def _close_round(
    strategy: Strategy,
    test_y: np.ndarray,
    open_round: _OpenRound,
    exchange: Exchange,
    ended: float,
) -> dict[str, Any]:
    """`open_round`'s metrics row, now that `exchange` brought its digest and evaluation."""
    row = open_round.row
    for cid, res in exchange.results["digest"].items():
        if res.metrics.get(DIGEST_DIVERGED):
            log.warning(
                "round %d: client %d's distillation diverged (non-finite student); it keeps "
                "its student from before the digest",
                row["round"],
                cid,
            )
    # A client whose upload this round used counts as ok (its upload is in bytes_up) even if
    # its digest or evaluation, which travel with the next exchange, is lost; those count
    # apart, and the loss itself is recorded in the round it happened in.
    digest_failed = (set(open_round.state.digest_ids) & exchange.failed_in("digest")) | (
        set(open_round.state.evaluate_ids) & exchange.failed_in("evaluate")
    )
    evaluated = {c: r for c, r in exchange.results["evaluate"].items() if c not in digest_failed}
    if open_round.evaluate:
        num_examples = {
            c: r.metrics.get("num_examples", 1.0) for c, r in open_round.state.ok.items()
        }
        row["teacher_test_acc"] = _teacher_acc(strategy, evaluated, test_y, num_examples)
    row.update(_client_metrics(evaluated, row, strategy.evaluation_metrics))
    exchanges = open_round.exchanges
    row.update(
        {
            "clients_ok": len(open_round.state.ok),
            "clients_failed": len(open_round.state.failed),
            "clients_digest_failed": len(digest_failed),
            "eval_bytes_up": sum(
                r.arrays["test_logits"].nbytes
                for r in evaluated.values()
                if "test_logits" in r.arrays
            ),
            "wall_s": ended - open_round.started,
            # Learner seconds summed over nodes and exchanges, and the slowest node's per
            # exchange (the critical path when nodes run in parallel): wall_s minus it is the
            # engine's overhead.
            "learner_s": sum(sum(x.node_learner_s.values()) for x in exchanges),
            "learner_max_s": sum(max(x.node_learner_s.values(), default=0.0) for x in exchanges),
            # The largest node process's peak memory so far (MiB): resident set, and CUDA
            # memory allocated when a node trains on a GPU (None otherwise).
            "peak_rss_mb": _peak(exchanges, "peak_rss_mb"),
            "peak_gpu_mb": _peak(exchanges, "peak_gpu_mb"),
        }
    )
    # learner_s split into the nodes' phases, summed like it (where nodes timed them).
    row.update(_learner_phases(exchanges))
    return row


def _record_losses(
    lost: set[int], causes: dict[int, str], failed: set[int], ok: set[int], rnd: int
) -> list[dict[str, Any]]:
    """Clients that failed in round `rnd` and had not before, each once with its cause.

    `lost` (the clients failed since their last good reply) is updated: a client that replies
    again leaves it, and is recorded again if it fails again.
    """
    new = [{"client": c, "round": rnd, "cause": causes.get(c, "unknown")} for c in sorted(failed)]
    new = [entry for entry in new if entry["client"] not in lost]
    lost.update(failed)
    lost.difference_update(ok)
    return new


# What a user can do about the most common cause of a round in which every client failed.
_ALL_FAILED_HINTS = {
    "non-finite": "the students diverge: lower train.lr (or distill.lr), or check the data",
    "no reply": "raise resources.round_timeout, or give nodes more resources",
    "node error": "the nodes' error is above; fix its cause",
}


def _check_round_survived(rnd: int, sampled: list[int], exchange: Exchange) -> None:
    """Stop the run when no sampled client came through, or a simulation worker died.

    A round without a single upload teaches nothing, and the next one fails the same way:
    going on would write a "completed" run that never trained.
    """
    causes = exchange.causes
    dead = sorted(c for c, cause in causes.items() if DEAD_WORKER_MARK in cause)
    if dead:
        raise FederationError(
            f"round {rnd}: the simulation worker (Ray actor) serving clients {dead[:10]} died "
            "(killed, or out of memory); the engine does not replace it, so its clients would "
            "fail every round: rerun, with fewer nodes at a time (more resources.num_cpus "
            "per node) if memory ran out"
        )
    if not sampled or exchange.results["train"]:
        return
    counts: dict[str, int] = defaultdict(int)
    for cid in sampled:
        counts[causes.get(cid, "unknown")] += 1
    cause, count = max(counts.items(), key=lambda kv: kv[1])
    hint = next((h for key, h in _ALL_FAILED_HINTS.items() if cause.startswith(key)), "")
    raise FederationError(
        f"round {rnd}: all {len(sampled)} sampled clients failed ({count} with {cause})"
        + (f"; {hint}" if hint else "")
    )


def _build_hooks(
    grid: Grid,
    spec: Spec,
    recorder: RunRecorder,
    on_round: RoundCallback | None,
    strategy: Strategy,
    data: Any,
    node_of: dict[int, int],
    loop: LoopState,
    faults: ServerFaults,
) -> tuple[HookChain, CheckpointHook]:
    """The run's round hooks, in the order they run: faults, audit, ledger, metrics rows,
    checkpoint."""
    hooks: list[RoundHook] = [faults]
    book = ledger_book(spec)
    if book is not None:
        sizes = {cid: client.num_examples for cid, client in enumerate(data.clients)}
        hooks.append(LedgerHook(book, spec, strategy, recorder, sizes))
    if spec.audit.enabled and strategy.capabilities.uses_clients:

        def export(cid: int) -> ClientResult | None:
            outcome = run_exchange(
                grid,
                node_of,
                {"export": [cid]},
                wire.MSG_EXPORT,
                {
                    "round": spec.rounds,
                    "state_dir": str(state_store_root(recorder)),
                    **node_learner(recorder),
                },
                {},
                spec.resources.round_timeout,
            )
            chain.after_exchange(spec.rounds, outcome.replies())
            return outcome.results["export"].get(cid)

        # Before the ledger: its export's charges are in the ledger's last ledgers.json.
        hooks.insert(1, AuditCaptureHook(spec, recorder, export))
    hooks.append(MetricsRowHook(recorder, on_round))
    # Last: it keeps what the others left after the round.
    checkpoint = CheckpointHook(checkpoint_root(recorder), strategy, list(hooks), loop, recorder)
    chain = HookChain([*hooks, checkpoint])
    return chain, checkpoint


def node_learner(recorder: RunRecorder) -> dict[str, str]:
    """The message config that names the run's cohort learner: every node of a run uses the
    one chosen as it started (``resources.learner = "auto"``: `fedkd.assembly.learner_choice`)."""
    return {"learner": str(recorder.learner["chosen"])} if recorder.learner else {}


def checkpoint_root(recorder: RunRecorder) -> Path:
    """Where a run's checkpoints go (absolute: the nodes' processes may run elsewhere)."""
    return (recorder.dir / CHECKPOINTS).resolve()


# The nodes' client states past their memory budget (`resources.state_memory_mb`), a file per
# node: scratch of one engine's run, deleted when it ends however it ends (a resumed run
# restores its clients from their checkpoints; a killed run's files go when it resumes).
NODE_STATES = "node-states"


def state_store_root(recorder: RunRecorder) -> Path:
    """Where the nodes spill their clients' states during a run (absolute, as checkpoints)."""
    return (recorder.dir / NODE_STATES).resolve()


def _aggregate(strategy: Strategy, spec: Spec, state: RoundState) -> None:
    """The strategy's knowledge from the round's uploads (given at least
    ``clients.min_clients``), and the payload that the clients who uploaded digest."""
    rnd, ok = state.round, state.ok
    state.aggregated = len(ok) >= spec.clients.min_clients
    if not state.aggregated:
        log.warning(
            "round %d: %d clients replied, fewer than clients.min_clients=%d; "
            "nothing aggregated this round",
            rnd,
            len(ok),
            spec.clients.min_clients,
        )
        return
    strategy.aggregate(rnd, ok)
    payload = strategy.digest_payload(rnd)
    if payload is not None and ok:
        digest_arrays = payload
        state.digest_ids = sorted(ok) if digest_arrays else []
        state.digest_arrays = digest_arrays


def _server_metrics(
    strategy: Strategy,
    evaluate: bool,
    state: RoundState,
    bytes_up: int,
    bytes_down: int,
    row: dict[str, Any],
) -> dict[str, Any]:
    """A round's fields known at the server once it is done: the global model's accuracy,
    the strategy's own metrics, traffic and the mean training loss (fields measured through
    the oracle channel are named in `row`)."""
    metrics: dict[str, Any] = {
        "server_test_acc": strategy.server_test_acc() if evaluate else None,
        "server_val_acc": strategy.server_val_acc() if evaluate else None,
        **strategy.round_metrics(),
    }
    train_losses, oracle = _statistic(state.ok, "train_loss")
    if oracle:
        _oracle_fields(row, ["train_loss_mean"])
    metrics.update(
        {
            "bytes_up": bytes_up,
            "bytes_down": bytes_down,
            "bytes_up_per_client": bytes_up / len(state.ok) if state.ok else 0.0,
            "train_loss_mean": float(np.mean(train_losses)) if train_losses else None,
        }
    )
    return metrics


def _run_rounds(
    grid: Grid,
    spec: Spec,
    recorder: RunRecorder,
    on_round: RoundCallback | None,
    resume: Path | None = None,
) -> dict[str, Any]:
    data = federated_data(spec)
    strategy = build_strategy(spec, data)
    timeout = spec.resources.round_timeout
    node_of = discover_clients(grid, spec, timeout) if strategy.capabilities.uses_clients else {}
    test_idx = eval_test_indices(spec, len(data.test_y))
    test_y = data.test_y[test_idx]
    unprotected = unprotected_outputs(spec)
    if unprotected:
        log.warning(
            "privacy: students train without DP-SGD, so %s leave clients unprotected: their "
            "epsilon is reported as inf (set privacy.dpsgd = true for a finite guarantee)",
            ", ".join(unprotected),
        )
    if recorder.learner is None:  # not chosen before the engine started (`fedkd run` does)
        recorder.record_learner(learner_choice(spec, data))
    loop = LoopState()
    faults = ServerFaults(spec)
    # Spilled client states of an earlier engine's run in this folder (killed, now resumed)
    # are stale: this run's nodes start from the checkpoints.
    shutil.rmtree(state_store_root(recorder), ignore_errors=True)
    hooks, checkpoint = _build_hooks(
        grid, spec, recorder, on_round, strategy, data, node_of, loop, faults
    )
    if resume is not None:
        loop = checkpoint.restore(resume)
        log.warning("resuming after round %d from %s", loop.round, resume)
    hooks.on_run_start()
    lost = loop.lost
    # Every node keeps its clients' states beside the run (simulation; a deployed site in its
    # own folder), and on resume takes them back as of the checkpoint's round.
    node_checkpoints = {
        "checkpoint_dir": str(checkpoint_root(recorder)),
        "restore_round": loop.round,
        "state_dir": str(state_store_root(recorder)),
        **node_learner(recorder),
    }

    # One exchange per round (wire.MSG_ROUND): round r's digest and evaluation travel with
    # round r+1's local training, so round r's row is final after round r+1's exchange.
    open_round: _OpenRound | None = loop.open_round
    for rnd in range(loop.round + 1, spec.rounds + 1):
        started = time.perf_counter()
        if open_round is not None and not strategy.capabilities.uses_clients:
            # Nothing travels with a next exchange: the previous row is final now.
            hooks.on_row(_close_round(strategy, test_y, open_round, Exchange(), started))
            open_round = None
        evaluate = rnd % spec.eval.every == 0 or rnd == spec.rounds
        row: dict[str, Any] = {"round": rnd, "teacher_test_acc": None, "epsilon_max": None}
        row["epsilon"] = None
        row["clients_lost"] = []
        state = RoundState(rnd)
        exchanges: list[Exchange] = []
        bytes_up = bytes_down = 0
        if not strategy.capabilities.uses_clients:  # centralized: the server trains alone
            strategy.aggregate(rnd, {})
        else:
            # 1. sample the clients (those the hooks admit, e.g. within their privacy budget)
            sampled = hooks.admit(rnd, sample_clients(spec, rnd))
            plan_arrays = strategy.plan_local(rnd)
            # 2. local training and uploads (with the previous round's digest and evaluation)
            parts, config, arrays = _digest_request(open_round)
            exchange = run_exchange(
                grid,
                node_of,
                {**parts, "train": sampled},
                wire.MSG_ROUND,
                {**config, **node_checkpoints, "round": rnd},
                {**arrays, **plan_arrays},
                timeout,
            )
            row.update(faults.act(rnd, exchange, sampled))  # faults the clients simulated; defence
            if open_round is not None:
                hooks.on_row(_close_round(strategy, test_y, open_round, exchange, started))
            exchanges.append(exchange)
            state.ok = exchange.results["train"]
            state.failed = exchange.failed_in("train") & set(sampled)
            row["clients_lost"] = _record_losses(
                lost, exchange.causes, state.failed | exchange.failed, set(state.ok), rnd
            )
            _check_round_survived(rnd, sampled, exchange)
            hooks.after_exchange(rnd, exchange.replies())
            bytes_down += wire.payload_bytes(plan_arrays) * len(sampled)
            bytes_up = sum(wire.payload_bytes(r.arrays) for r in state.ok.values())

            # 3. the strategy's knowledge from the uploads, and what clients digest
            _aggregate(strategy, spec, state)
            bytes_down += wire.payload_bytes(state.digest_arrays) * len(state.digest_ids)
            if evaluate and strategy.capabilities.client_students:
                state.evaluate_ids = sorted(state.ok)
                state.evaluate_arrays = strategy.evaluate_payload(rnd)
                bytes_down += wire.payload_bytes(state.evaluate_arrays) * len(state.evaluate_ids)

        # 4. evaluation of the global model; the hooks' fields (epsilon) join the row
        row.update(_server_metrics(strategy, evaluate, state, bytes_up, bytes_down, row))
        open_round = _OpenRound(row, started, evaluate, state, exchanges)
        loop.round, loop.open_round = rnd, open_round
        hooks.after_round(rnd, row, state)

    if open_round is not None:  # the last round's digest and evaluation
        parts, config, arrays = _digest_request(open_round)
        exchange = Exchange()
        if any(parts.values()):
            exchange = run_exchange(
                grid,
                node_of,
                parts,
                wire.MSG_ROUND,
                {**config, **node_checkpoints, "round": spec.rounds + 1},
                arrays,
                timeout,
            )
            open_round.exchanges.append(exchange)
            hooks.after_exchange(spec.rounds, exchange.replies())
        last = _close_round(strategy, test_y, open_round, exchange, time.perf_counter())
        last["clients_lost"] = last["clients_lost"] + _record_losses(
            lost, exchange.causes, exchange.failed, set(), spec.rounds
        )
        hooks.on_row(last)
    hooks.on_run_end()
    return recorder.finish()


def make_server_app(
    spec: Spec,
    recorder: RunRecorder,
    on_round: RoundCallback | None = None,
    outcome: dict[str, Any] | None = None,
    stop: threading.Event | None = None,
    after_run: AfterRun | None = None,
    resume: Path | None = None,
) -> ServerApp:
    """A ServerApp bound to a spec and a results folder (the `fedkd run` path).

    The simulation engine only logs an exception raised by the ServerApp; `outcome` receives
    ``ok``, ``error`` or ``stopped`` so that the caller can exit with the right status.
    Setting `stop` ends the run, `after_run` follows a completed one, and `resume` continues
    from a checkpoint (see `run_rounds`).
    """
    app = ServerApp()
    outcome = {} if outcome is None else outcome

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            run_rounds(grid, spec, recorder, on_round, stop, after_run, resume)
            outcome["ok"] = True
        except RunStopped as err:
            outcome["stopped"] = str(err)
        except Exception as err:
            outcome["error"] = f"{type(err).__name__}: {err}"
            raise

    return app


def make_flwr_server_app(after_run: AfterRun | None = None) -> ServerApp:
    """The ServerApp that `flwr run .` loads (through `fedkd.run.flwr_app`).

    The spec comes from the run config (`spec`, `overrides`, `out-dir`); `after_run` follows a
    completed run (see `run_rounds`).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        spec = spec_from_run_config(context.run_config)
        recorder = RunRecorder(spec.output.dir or default_run_dir(spec), spec)
        summary = run_rounds(grid, spec, recorder, _log_round, after_run=after_run)
        log.warning("fedkd run finished: results in %s (%s)", recorder.dir, summary["status"])

    return app


def _log_round(rnd: int, row: dict[str, Any]) -> None:
    acc = row["server_test_acc"]
    log.warning(
        "round %d: server_test_acc=%s clients_ok=%d wall_s=%.1f",
        rnd,
        "n/a" if acc is None else f"{acc:.4f}",
        row["clients_ok"],
        row["wall_s"],
    )
