"""The fedkd ClientApp: one node, hosting a cohort of one or more clients.

Thin by design: it reads the spec, finds the node's clients, translates messages into calls of
`CohortLearner` and results back into messages. Client students and optimizer states persist
in the node's `context.state` (kept by the SuperNode / simulation engine between rounds, so a
different Ray actor may serve the node next round).

A ClientApp that reads its spec from Flower's run config and runs outside Flower's Ray
simulation engine is a deployed SuperNode on real data: it refuses seeded noise (the spec, and
so the seed, comes from the server), see docs/noise.md.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedkd.apps import wire
from fedkd.apps.faults import act_in_clients
from fedkd.apps.run_config import spec_from_run_config
from fedkd.assembly import cohort_config, eval_test_indices, hosted_clients, node_data
from fedkd.learner.auto import LEARNER_CHOICES
from fedkd.learner.cohort import ClientResult, CohortLearner
from fedkd.learner.device import set_up_torch
from fedkd.learner.state_store import SpillingStateStore
from fedkd.learner.vectorised import VectorisedCohortLearner
from fedkd.rounds.checkpoint import load_client_state, save_client_state
from fedkd.spec import Spec, refuse_seeded_noise


class NodeStateStore(MutableMapping[int, bytes]):
    """Per-client bytes in the node's `context.state` (one ConfigRecord per client): client
    states under the prefix "client", what a client released once or its algorithm keeps
    under others."""

    def __init__(self, context: Context, prefix: str = "client") -> None:
        self.state = context.state
        self.prefix = f"{prefix}."

    def _key(self, client_id: int) -> str:
        return f"{self.prefix}{client_id}"

    def __getitem__(self, client_id: int) -> bytes:
        key = self._key(client_id)
        if key not in self.state:
            raise KeyError(client_id)
        return self.state[key]["blob"]

    def __setitem__(self, client_id: int, blob: bytes) -> None:
        self.state[self._key(client_id)] = ConfigRecord({"blob": blob})

    def __delitem__(self, client_id: int) -> None:
        del self.state[self._key(client_id)]

    def __iter__(self) -> Iterator[int]:
        return (int(k.split(".", 1)[1]) for k in self.state if k.startswith(self.prefix))

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _node_clients(spec: Spec, context: Context) -> list[int]:
    partition_id = int(context.node_config.get("partition-id", 0))
    num_partitions = int(context.node_config.get("num-partitions", spec.num_nodes))
    return hosted_clients(spec, partition_id, num_partitions)


def _client_states(
    spec: Spec, context: Context, request: dict, simulated: bool
) -> MutableMapping[int, bytes]:
    """Where the node's clients keep their states: the node's memory, spilling past
    ``resources.state_memory_mb`` into a file of this node's in the folder the server names
    (``state_dir``) in a simulation; a deployed node keeps them all in its own memory (it never
    writes where a server tells it to)."""
    folder = str(request.get("state_dir", "")) if simulated else ""
    spill = None
    if folder:
        partition_id = int(context.node_config.get("partition-id", 0))
        spill = Path(folder) / f"node-{partition_id}.states"
    budget = int(spec.resources.state_memory_mb * 2**20)
    return SpillingStateStore(NodeStateStore(context), spill, spec.clients.num_clients, budget)


def _stores(
    spec: Spec, context: Context, request: dict, simulated: bool
) -> dict[str, MutableMapping[int, bytes]]:
    """The node's per-client stores by kind (`STATE_KINDS`); `request`: the message's config."""
    return {
        "client": _client_states(spec, context, request, simulated),
        "released": NodeStateStore(context, "released"),
        "kept": NodeStateStore(context, "kept"),
        "partner": NodeStateStore(context, "partner"),
    }


def chosen_learner(spec: Spec, request: dict) -> str:
    """The cohort learner this node runs: the spec's, or for ``"auto"`` the one the server
    chose for the whole run and names in every message (``learner``)."""
    if spec.resources.learner != "auto":
        return spec.resources.learner
    chosen = str(request.get("learner", ""))
    if chosen not in LEARNER_CHOICES:
        raise ValueError(
            f"resources.learner = 'auto': the server's message names no chosen learner "
            f"({chosen!r}; expected one of {', '.join(LEARNER_CHOICES)})"
        )
    return chosen


def _learner(spec: Spec, context: Context, request: dict, simulated: bool) -> CohortLearner:
    """The node's cohort learner: the per-client loop, or torch.func over stacked clients."""
    # A long-lived Ray worker may have served other runs, and Flower may hand a message to
    # another thread: set torch up every time.
    set_up_torch(spec.resources.torch_threads)
    # The run's data, or (deployment, node config data-path) with the site's own private data.
    data = node_data(spec, context.node_config)
    stores = _stores(spec, context, request, simulated)
    config, store = cohort_config(spec), stores["client"]
    others = (stores["released"], stores["kept"], stores["partner"])
    r = spec.resources
    if chosen_learner(spec, request) == "vectorised":
        return VectorisedCohortLearner(
            data, config, store, *others, device=r.device, precision=r.precision
        )
    return CohortLearner(data, config, store, *others)


# What a node keeps per client in its state (`NodeStateStore` prefixes), and so checkpoints:
# its student, what it released once, what its algorithm keeps (`Learner.keep`), its partner
# model (`Learner.partner`).
STATE_KINDS = ("client", "released", "kept", "partner")


def _checkpoint_folder(config: dict, context: Context, simulated: bool) -> Path | None:
    """Where this node keeps its clients' states between runs: in simulation the folder the
    server names (beside the run); on a deployed site its own, the node config's
    ``checkpoint-dir`` (never a path the server sends); None: nowhere."""
    if simulated:
        folder = str(config.get("checkpoint_dir", ""))
    else:
        folder = str(context.node_config.get("checkpoint-dir", ""))
    return Path(folder) if folder else None


def _restore_clients(
    spec: Spec, folder: Path, config: dict, context: Context, ids: set[int], simulated: bool
) -> None:
    """A resumed run: clients this node holds no state for take theirs back as of the
    checkpoint's round (``restore_round``; a client with no file yet starts fresh)."""
    restore_round = int(config.get("restore_round", 0))
    stores = _stores(spec, context, config, simulated)
    for cid in sorted(ids):
        if restore_round <= 0 or cid in stores["client"]:
            continue
        for kind, blob in (load_client_state(folder, cid, restore_round) or {}).items():
            stores[kind][cid] = blob


def _checkpoint_clients(
    spec: Spec, folder: Path, config: dict, context: Context, ids: set[int], simulated: bool
) -> None:
    """Keep the state of every client this message touched, as of its round."""
    stores = _stores(spec, context, config, simulated)
    for cid in sorted(ids):
        blobs = {kind: store[cid] for kind, store in stores.items() if cid in store}
        if blobs:
            save_client_state(folder, cid, int(config["round"]), blobs)


# How `PhaseClock` reads each of `wire.PHASE_CLOCKS`.
_CLOCK_READERS = dict(
    zip(wire.PHASE_CLOCKS, (time.perf_counter, time.thread_time, time.process_time), strict=True)
)


class PhaseClock:
    """Seconds a node spends in each phase of one message (`wire.NODE_PHASES`), by each of
    `wire.PHASE_CLOCKS`, and its learner seconds: wall time since the clock was made.

    The thread's CPU seconds against the wall's say whether a phase computed or waited (for the
    disk, or for a core another process or thread held); the process's CPU seconds against the
    thread's say how much other threads of the node's process worked meanwhile.
    """

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds = {f"{c}.{p}": 0.0 for c in wire.PHASE_CLOCKS for p in wire.NODE_PHASES}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as phase `name` (added to what it already holds)."""
        begun = {clock: read() for clock, read in _CLOCK_READERS.items()}
        try:
            yield
        finally:
            for clock, read in _CLOCK_READERS.items():
                self.seconds[f"{clock}.{name}"] += read() - begun[clock]

    def learner_s(self) -> float:
        return time.perf_counter() - self.started


def _peak_memory_mb() -> dict[str, float]:
    """This process's peak memory so far: resident set size, and CUDA memory when used."""
    peak = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # KiB
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peak


def _reply(
    spec: Spec,
    parts: dict[str, dict[int, ClientResult]],
    clock: PhaseClock | None,
    msg: Message,
    oracle: bool,
) -> Message:
    """The reply: results per part and client, and this node's learner seconds (with their
    phases, where `clock` timed them) and memory.

    The server sums ``learner_s`` over nodes to split a round's wall time into learner time
    and engine overhead (messaging, Ray, serialisation), which the benchmark reports. In a run
    that claims privacy, the clients' private statistics are no metrics: they go into the
    oracle channel where `oracle` (a simulation), else nowhere.
    """
    with clock.phase("reply") if clock is not None else nullcontext():
        if spec.privacy.enabled(spec.algorithm.name):
            parts = {
                part: {cid: res.private_statistics_apart(oracle) for cid, res in results.items()}
                for part, results in parts.items()
            }
        node = _peak_memory_mb()
    if clock is not None:
        node["learner_s"] = clock.learner_s()
        node.update(clock.seconds)
    return Message(content=wire.results_to_record(parts, node), reply_to=msg)


def _parse(spec: Spec, msg: Message, context: Context) -> tuple[dict, dict[str, np.ndarray]]:
    """A request's config and arrays, its client ids checked against the clients hosted here."""
    config, arrays = wire.parse_request(msg.content)
    asked = {c for part in wire.PARTS for c in wire.part_ids(config, part)}
    foreign = asked - set(_node_clients(spec, context))
    if foreign:
        raise ValueError(f"asked to run clients {sorted(foreign)} that this node does not host")
    return config, arrays


def handle_hello(spec: Spec, msg: Message, context: Context) -> Message:
    clients = _node_clients(spec, context)
    node_data(spec, context.node_config)  # a site file that does not fit fails here, not later
    return Message(
        content=RecordDict({"config": ConfigRecord({"client_ids": clients})}), reply_to=msg
    )


def handle_round(
    spec: Spec, msg: Message, context: Context, oracle: bool = False, simulated: bool = True
) -> Message:
    """``train.round``: digest the previous round's payload, evaluate, then train and upload.

    What the clients compute is their algorithm's client side (`strategies.base.Strategy`'s
    `client_digest` and `client_round`, found from the spec): this app only moves its arrays.
    `simulated`: the node runs in a simulation (its checkpoint folder is the run's).
    """
    clock = PhaseClock()  # its phases and learner_s go into the reply's node metrics
    with clock.phase("parse"):
        config, arrays = _parse(spec, msg, context)
        touched = {c for part in wire.PARTS for c in wire.part_ids(config, part)}
        checkpoints = _checkpoint_folder(config, context, simulated)
    with clock.phase("restore"):
        if checkpoints is not None:
            _restore_clients(spec, checkpoints, config, context, touched, simulated)
    with clock.phase("build"):
        learner = _learner(spec, context, config, simulated)
    algorithm, params = spec.algorithm.cls, spec.algorithm.params
    parts: dict[str, dict[int, ClientResult]] = {}

    digest_ids = wire.part_ids(config, "digest")
    if digest_ids:
        with clock.phase("digest"):
            parts["digest"] = algorithm.client_digest(
                params,
                learner,
                int(config["digest_round"]),
                digest_ids,
                wire.without_prefix(arrays, wire.DIGEST_PREFIX),
            )
    evaluate_ids = wire.part_ids(config, "evaluate")
    if evaluate_ids:
        with clock.phase("evaluate"):
            test_idx = eval_test_indices(spec, len(learner.data.test_y))
            parts["evaluate"] = learner.evaluate(evaluate_ids, test_idx)
            extra = algorithm.client_evaluate(
                params,
                learner,
                evaluate_ids,
                test_idx,
                wire.without_prefix(arrays, wire.EVALUATE_PREFIX),
            )
            for cid, metrics in extra.items():
                parts["evaluate"][cid].metrics.update(metrics)

    train_ids = wire.part_ids(config, "train")
    if train_ids:
        with clock.phase("train"):
            parts["train"] = algorithm.client_round(
                params, learner, int(config["round"]), train_ids, wire.plan_arrays(arrays)
            )
        with clock.phase("faults"):
            parts = act_in_clients(spec, int(config["round"]), parts)  # simulated, if any
    with clock.phase("checkpoint"):
        if checkpoints is not None:
            _checkpoint_clients(spec, checkpoints, config, context, touched, simulated)
    return _reply(spec, parts, clock, msg, oracle)


def handle_export(
    spec: Spec, msg: Message, context: Context, oracle: bool = False, simulated: bool = True
) -> Message:
    """The audited clients' final student weights (``query.export``, end of an audited run)."""
    config, _ = _parse(spec, msg, context)
    if not spec.algorithm.capabilities.client_students:
        # Its clients' state is something else (PATE's teachers), not a student to export.
        raise ValueError(
            f"export: algorithm '{spec.algorithm.name}' has no client student to export; "
            "audit a run of an algorithm whose clients train students"
        )
    results = _learner(spec, context, config, simulated).export(wire.part_ids(config, "export"))
    return _reply(spec, {"export": results}, None, msg, oracle)


def in_simulation_engine() -> bool:
    """Whether this process is a worker of Flower's Ray simulation engine.

    Decided by the node's own process, which the server cannot influence: a deployed
    SuperNode's ClientApp never runs inside Ray.
    """
    ray = sys.modules.get("ray")
    return ray is not None and bool(ray.is_initialized())


def spec_for_node(context: Context) -> Spec:
    """The spec of the run config; a deployed node refuses one that asks for seeded noise."""
    spec = spec_from_run_config(context.run_config)
    if not in_simulation_engine():
        refuse_seeded_noise(spec, "a deployed SuperNode")
    return spec


def make_client_app(spec: Spec | None = None, oracle: bool | None = None) -> ClientApp:
    """A ClientApp bound to `spec`, or (None) reading the spec from the run config.

    `oracle`: whether its replies carry the oracle channel (private statistics a simulation
    measures beside the protocol; see `fedkd.learner.cohort.ClientResult`). Default: with a
    bound spec only, that is in `fedkd run`'s simulation; the `flwr run` app, which deployed
    SuperNodes load, never sends it.
    """
    app = ClientApp()
    oracle = spec is not None if oracle is None else oracle

    def _spec(context: Context) -> Spec:
        return spec if spec is not None else spec_for_node(context)

    @app.query("hello")
    def hello(msg: Message, context: Context) -> Message:
        return handle_hello(_spec(context), msg, context)

    @app.train("round")
    def round_(msg: Message, context: Context) -> Message:
        simulated = spec is not None or in_simulation_engine()
        return handle_round(_spec(context), msg, context, oracle, simulated)

    @app.query("export")
    def export(msg: Message, context: Context) -> Message:
        simulated = spec is not None or in_simulation_engine()
        return handle_export(_spec(context), msg, context, oracle, simulated)

    return app


# `flwr run .` loads this (pyproject: [tool.flwr.app.components]).
app = make_client_app()
