"""The fedkd ServerApp: drives a strategy from `strategies/` through the rounds.

Each round: sample clients, send one ``train.round`` message to each node hosting them (it also
carries the previous round's teacher to digest and, on evaluation rounds, the evaluation; see
`fedkd.apps.wire`), hand the valid uploads to the strategy, and write the previous round's
metrics row. After the last round, one more exchange carries its digest and evaluation. A node
that fails or times out, or a client whose upload is not finite, counts in ``clients_failed``
and the round goes on with the others.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from fedkd.apps import wire
from fedkd.apps.build import (
    build_strategy,
    eval_test_indices,
    federated_data,
    ledger_book,
    step_config,
)
from fedkd.apps.run_config import spec_from_run_config
from fedkd.audit.run_audit import audit_run, render_text, save_student, save_teachers
from fedkd.learner.cohort import DIGEST_DIVERGED, ClientResult
from fedkd.learner.loop import PHASE_SAMPLE, accuracy, derive_seed
from fedkd.privacy.book import LedgerBook
from fedkd.privacy.gaussian_release import gaussian_release_event
from fedkd.privacy.ledger import DpSgdEvent, PrivacyEvent
from fedkd.results import RunRecorder, default_run_dir
from fedkd.spec import Spec
from strategies import Strategy

log = logging.getLogger("fedkd")

RoundCallback = Callable[[int, dict[str, Any]], None]


class FederationError(RuntimeError):
    """The federation cannot run the spec (e.g. clients no node hosts)."""


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
                f"no node hosts clients {missing[:10]}{'...' if len(missing) > 10 else ''}: the "
                f"spec needs {spec.num_nodes} nodes (clients.num_clients / "
                "clients.clients_per_node); start that many SuperNodes or set num-supernodes"
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
    # Results that were not finite, per part: not used, but kept for their metrics (a client
    # whose upload is NaN still ran its DP-SGD steps, and the ledger charges them).
    rejected: dict[str, dict[int, ClientResult]] = field(default_factory=lambda: defaultdict(dict))
    # Learner seconds per replying node.
    node_learner_s: dict[int, float] = field(default_factory=dict)
    # The largest peak memory (MiB) any replying node reported, per kind (peak_rss_mb, peak_gpu_mb).
    peak_mb: dict[str, float] = field(default_factory=dict)

    def failed_in(self, part: str) -> set[int]:
        return self.failed | set(self.rejected[part])


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
    msgs = [
        Message(
            content=wire.request(
                {**config, **{f"{p}_ids": ids for p, ids in node_parts.items()}}, arrays
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
            outcome.failed.update(c for ids in by_node.get(node, {}).values() for c in ids)
            continue
        node_parts, node_metrics = wire.record_to_results(reply.content)
        outcome.node_learner_s[node] = node_metrics.get("learner_s", 0.0)
        for key in ("peak_rss_mb", "peak_gpu_mb"):
            if key in node_metrics:
                outcome.peak_mb[key] = max(outcome.peak_mb.get(key, 0.0), node_metrics[key])
        for part, results in node_parts.items():
            for cid, res in results.items():
                if _finite(res):
                    outcome.results[part][cid] = res
                else:
                    log.warning("client %s sent non-finite values (%s); ignored", cid, part)
                    outcome.rejected[part][cid] = res
    for node in set(by_node) - replied:
        log.warning("node %s sent no reply in %s within %.0f s", node, message_type, timeout)
        outcome.failed.update(c for ids in by_node[node].values() for c in ids)
    # Replies arrive in any order; float sums over clients (teachers, means) must not depend on
    # it, or the same seed gives last-digit differences between node layouts.
    for part in outcome.results:
        outcome.results[part] = dict(sorted(outcome.results[part].items()))
    return outcome


def _peak(exchanges: list[Exchange], key: str) -> float | None:
    values = [x.peak_mb[key] for x in exchanges if key in x.peak_mb]
    return max(values) if values else None


def _client_metrics(results: dict[int, ClientResult]) -> dict[str, float | None]:
    test = [r.metrics["test_acc"] for r in results.values() if "test_acc" in r.metrics]
    local = [r.metrics["local_acc"] for r in results.values() if "local_acc" in r.metrics]
    local = [a for a in local if math.isfinite(a)]
    return {
        "client_test_acc_mean": float(np.mean(test)) if test else None,
        "client_test_acc_min": float(np.min(test)) if test else None,
        "client_test_acc_max": float(np.max(test)) if test else None,
        "client_local_acc_mean": float(np.mean(local)) if local else None,
    }


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


def _admit_within_budget(
    book: LedgerBook | None,
    spec: Spec,
    sampled: list[int],
    rnd: int,
    worst_case: list[PrivacyEvent] | None = None,
) -> list[int]:
    """Drop sampled clients whose next round would exceed their privacy budget (`worst_case`:
    the strategy's bound on what this round's release charges, from
    `Strategy.planned_release_events`)."""
    if book is None or book.budget_epsilon is None:
        return sampled
    extra = []
    if spec.privacy.release_noise > 0:
        extra.append(gaussian_release_event(spec.privacy.release_noise, rnd))
    epochs_in = step_config(spec.train).epochs_in  # DP-SGD steps scale with a round's epochs
    admitted = []
    for cid in sampled:
        was_stopped = cid in book.stopped
        planned = book.planned_events(cid, rnd, extra, epochs_in, worst_case)
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


def _record_dpsgd(book: LedgerBook | None, results: dict[int, ClientResult], rnd: int) -> None:
    """Charge each client the DP-SGD steps it reports, and any steps it took unheard.

    `results` holds every reply that reports DP-SGD steps, used or not (a non-finite upload
    still came from private training). A client whose reply arrived too late (the node timed
    out) kept that round's training in its state, and what it releases from now on depends on
    it: its count of steps over the run runs ahead of its ledger, and the missing steps are
    charged now (sample rate and noise are the client's for the whole run), so that epsilon
    never leaves out a step that ran.
    """
    if book is None:
        return
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
    grid: Grid, spec: Spec, recorder: RunRecorder, on_round: RoundCallback | None = None
) -> dict[str, Any]:
    """The whole run; returns the summary. Finished rounds are on disk whatever happens."""
    _poll_replies_faster(grid)
    try:
        summary = _run_rounds(grid, spec, recorder, on_round)
    except Exception as err:
        recorder.finish(status="failed", error=f"{type(err).__name__}: {err}")
        raise
    if spec.audit.enabled:
        audit_at_end(recorder)
    return summary


def export_audited(
    grid: Grid,
    node_of: dict[int, int],
    spec: Spec,
    recorder: RunRecorder,
    timeout: float,
    teachers: dict[int, dict[str, np.ndarray]],
) -> None:
    """Keep the audited client's final student (asked from its node) and the digests it got."""
    save_teachers(recorder.dir, teachers)
    cid = spec.audit.client
    outcome = run_exchange(
        grid, node_of, {"export": [cid]}, wire.MSG_EXPORT, {"round": spec.rounds}, {}, timeout
    )
    if cid not in outcome.results["export"]:
        log.warning("audit: client %d did not send its final student; nothing to audit", cid)
        return
    res = outcome.results["export"][cid]
    save_student(
        recorder.dir,
        cid,
        spec.student_for(cid),
        res.arrays,
        int(res.metrics.get("rounds_trained", spec.rounds)),
    )


def audit_at_end(recorder: RunRecorder) -> None:
    """Run `fedkd audit` on the finished run; a failed audit never fails the run."""
    try:
        result = audit_run(recorder.dir)
    except Exception as err:  # the run's results are complete; say why the audit is missing
        log.warning("audit failed: %s: %s", type(err).__name__, err)
        return
    log.warning("%s\n(audit.json in %s)", render_text(result), recorder.dir)


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
    ok: dict[int, ClientResult]
    failed: set[int]
    digest_ids: list[int]
    digest_arrays: dict[str, np.ndarray]
    evaluate_ids: list[int]
    exchanges: list[Exchange]


def _digest_request(open_round: _OpenRound | None) -> tuple[dict[str, list[int]], dict, dict]:
    """The parts, config and arrays of an exchange that carry `open_round`'s digest."""
    if open_round is None:
        return {}, {}, {}
    parts = {"digest": open_round.digest_ids, "evaluate": open_round.evaluate_ids}
    config = {"digest_round": open_round.row["round"]}
    arrays = wire.with_prefix(open_round.digest_arrays, wire.DIGEST_PREFIX)
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
    failed = open_round.failed | exchange.failed_in("digest")
    evaluated = {c: r for c, r in exchange.results["evaluate"].items() if c not in failed}
    failed |= set(open_round.evaluate_ids) & exchange.failed_in("evaluate")
    if open_round.evaluate:
        num_examples = {c: r.metrics.get("num_examples", 1.0) for c, r in open_round.ok.items()}
        row["teacher_test_acc"] = _teacher_acc(strategy, evaluated, test_y, num_examples)
    row.update(_client_metrics(evaluated))
    exchanges = open_round.exchanges
    row.update(
        {
            "clients_ok": len(set(open_round.ok) - failed),
            "clients_failed": len(failed),
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
    return row


def _run_rounds(
    grid: Grid, spec: Spec, recorder: RunRecorder, on_round: RoundCallback | None
) -> dict[str, Any]:
    data = federated_data(spec)
    strategy = build_strategy(spec, data)
    timeout = spec.resources.round_timeout
    node_of = discover_clients(grid, spec, timeout) if strategy.uses_clients else {}
    test_idx = eval_test_indices(spec, len(data.test_y))
    test_y = data.test_y[test_idx]
    book = ledger_book(spec)
    audit_teachers: dict[int, dict[str, np.ndarray]] = {}

    def write(row: dict[str, Any]) -> None:
        recorder.record_round(row)
        if on_round is not None:
            on_round(row["round"], row)

    # One exchange per round (wire.MSG_ROUND): round r's digest and evaluation travel with
    # round r+1's local training, so round r's row is written after round r+1's exchange.
    open_round: _OpenRound | None = None
    for rnd in range(1, spec.rounds + 1):
        started = time.perf_counter()
        evaluate = rnd % spec.eval.every == 0 or rnd == spec.rounds
        row: dict[str, Any] = {"round": rnd, "teacher_test_acc": None, "epsilon_max": None}
        row["epsilon"] = None
        ok: dict[int, ClientResult] = {}
        failed: set[int] = set()
        exchanges: list[Exchange] = []
        bytes_up = bytes_down = 0
        targets: list[int] = []
        digest_arrays: dict[str, np.ndarray] = {}
        evaluate_clients = False
        if not strategy.uses_clients:  # centralized: the server trains alone
            strategy.aggregate(rnd, {})
        else:
            sampled = _admit_within_budget(
                book, spec, sample_clients(spec, rnd), rnd, strategy.planned_release_events(rnd)
            )
            plan = strategy.plan_local(rnd)
            plan_arrays: dict[str, np.ndarray] = {}
            if len(plan.proxy_idx):
                plan_arrays["proxy_idx"] = plan.proxy_idx.astype(np.int32)
            if plan.class_logits is not None:
                plan_arrays["class_logits"] = plan.class_logits.astype(np.float32)
                plan_arrays["class_present"] = plan.class_present.astype(np.uint8)
            if plan.global_weights is not None:
                plan_arrays.update(wire.with_prefix(plan.global_weights, wire.WEIGHTS_PREFIX))
            parts, config, arrays = _digest_request(open_round)
            exchange = run_exchange(
                grid,
                node_of,
                {**parts, "train": sampled},
                wire.MSG_ROUND,
                {**config, "round": rnd, "upload": plan.upload},
                {**arrays, **plan_arrays},
                timeout,
            )
            if open_round is not None:
                write(_close_round(strategy, test_y, open_round, exchange, started))
            exchanges.append(exchange)
            ok, failed = exchange.results["train"], exchange.failed_in("train") & set(sampled)
            _record_dpsgd(book, {**exchange.rejected["train"], **ok}, rnd)
            bytes_down += wire.payload_bytes(plan_arrays) * len(sampled)
            bytes_up = sum(wire.payload_bytes(r.arrays) for r in ok.values())

            enough = len(ok) >= spec.clients.min_clients
            if enough:
                strategy.aggregate(rnd, ok)
                for cid, events in strategy.release_events(rnd).items():
                    for event in events:
                        book.record(cid, event)
                for cid, events in strategy.one_time_events(rnd).items():
                    for event in events:
                        book.record(cid, event, recurs=False)
            else:
                log.warning(
                    "round %d: %d clients replied, fewer than clients.min_clients=%d; "
                    "nothing aggregated this round",
                    rnd,
                    len(ok),
                    spec.clients.min_clients,
                )
            payload = strategy.digest_payload(rnd) if enough else None
            targets = sorted(ok)
            evaluate_clients = evaluate and strategy.evaluates_clients
            if payload is not None and targets:
                digest_arrays = payload.arrays()
                if "proxy_idx" in digest_arrays:
                    digest_arrays["proxy_idx"] = digest_arrays["proxy_idx"].astype(np.int32)
                if spec.audit.enabled and spec.audit.client in targets:
                    audit_teachers[rnd] = digest_arrays  # the audit's shadows replay this digest
                bytes_down += wire.payload_bytes(digest_arrays) * len(targets)

        row["server_test_acc"] = strategy.server_test_acc() if evaluate else None
        row.update(strategy.round_metrics())
        if book is not None:
            reports = book.reports()
            row["epsilon"] = {str(c): r.epsilon for c, r in reports.items()}
            row["epsilon_max"] = max(row["epsilon"].values()) if reports else 0.0
            independent = [
                r.epsilon_rdp_data_independent
                for r in reports.values()
                if r.epsilon_rdp_data_independent is not None
            ]
            if independent:  # PATE: the guarantee is data-independent (= epsilon_max)
                row["epsilon_data_independent_max"] = max(independent)
                # The data-dependent figure, computed from private votes and not released
                # through a mechanism: not a guarantee, reported under a name that says so.
                dependent = {
                    str(c): r.epsilon_data_dependent_unreleased
                    for c, r in reports.items()
                    if r.epsilon_data_dependent_unreleased is not None
                }
                row["epsilon_data_dependent_unreleased"] = dependent
                row["epsilon_data_dependent_unreleased_max"] = max(dependent.values())
            row["clients_stopped"] = len(book.stopped)
            recorder.write_extra("ledgers.json", book.to_dict())
        train_losses = [r.metrics["train_loss"] for r in ok.values() if "train_loss" in r.metrics]
        row.update(
            {
                "bytes_up": bytes_up,
                "bytes_down": bytes_down,
                "bytes_up_per_client": bytes_up / len(ok) if ok else 0.0,
                "train_loss_mean": float(np.mean(train_losses)) if train_losses else None,
            }
        )
        open_round = _OpenRound(
            row=row,
            started=started,
            evaluate=evaluate,
            ok=ok,
            failed=failed,
            digest_ids=targets if digest_arrays else [],
            digest_arrays=digest_arrays,
            evaluate_ids=targets if evaluate_clients else [],
            exchanges=exchanges,
        )
        if not strategy.uses_clients:  # nothing travels with a next exchange
            write(_close_round(strategy, test_y, open_round, Exchange(), time.perf_counter()))
            open_round = None

    if open_round is not None:  # the last round's digest and evaluation
        parts, config, arrays = _digest_request(open_round)
        exchange = Exchange()
        if any(parts.values()):
            exchange = run_exchange(
                grid,
                node_of,
                parts,
                wire.MSG_ROUND,
                {**config, "round": spec.rounds + 1},
                arrays,
                timeout,
            )
            open_round.exchanges.append(exchange)
        write(_close_round(strategy, test_y, open_round, exchange, time.perf_counter()))
    if spec.audit.enabled and strategy.uses_clients:
        export_audited(grid, node_of, spec, recorder, timeout, audit_teachers)
    return recorder.finish()


def make_server_app(
    spec: Spec,
    recorder: RunRecorder,
    on_round: RoundCallback | None = None,
    outcome: dict[str, Any] | None = None,
) -> ServerApp:
    """A ServerApp bound to a spec and a results folder (the `fedkd run` path).

    The simulation engine only logs an exception raised by the ServerApp; `outcome` receives
    ``ok`` or ``error`` so that the caller can exit with the right status.
    """
    app = ServerApp()
    outcome = {} if outcome is None else outcome

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            run_rounds(grid, spec, recorder, on_round)
            outcome["ok"] = True
        except Exception as err:
            outcome["error"] = f"{type(err).__name__}: {err}"
            raise

    return app


# `flwr run .` loads this (pyproject: [tool.flwr.app.components]); the spec comes from the
# run config (`spec`, `overrides`, `out-dir`).
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    spec = spec_from_run_config(context.run_config)
    recorder = RunRecorder(spec.output.dir or default_run_dir(spec), spec)
    summary = run_rounds(grid, spec, recorder, _log_round)
    log.warning("fedkd run finished: results in %s (%s)", recorder.dir, summary["status"])


def _log_round(rnd: int, row: dict[str, Any]) -> None:
    acc = row["server_test_acc"]
    log.warning(
        "round %d: server_test_acc=%s clients_ok=%d wall_s=%.1f",
        rnd,
        "n/a" if acc is None else f"{acc:.4f}",
        row["clients_ok"],
        row["wall_s"],
    )
