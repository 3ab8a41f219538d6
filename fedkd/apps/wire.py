"""The wire format: fedkd's plans, payloads and client results as Flower records.

Message types:
- ``query.hello``: which clients does this node host? (once, at the start)
- ``train.round``: one message per node per round. It carries, in this order: the previous
  round's teacher for its clients to digest (the round's last step, ``digest.*`` arrays, clients
  ``digest_ids``), their evaluation (``evaluate_ids``, with the algorithm's ``evaluate.*``
  arrays where it has any), then this round's local training and
  upload (the round's first steps; clients ``train_ids``). What the arrays hold is the
  algorithm's to say (`strategies.base.Strategy.plan_local`, ``digest_payload``): the apps
  only move them. The proxy subset travels as indices, never as inputs.
  Folding the digest into the
  next round's message halves the messages per round (each costs the engine's polling, and in
  deployment a ClientApp process); the math is unchanged because a client does nothing between
  digesting a teacher and its next local training. After the last round the same message
  carries only the digest and evaluation.
- ``query.export``: the audited client's final student (end of an audited run).

A reply holds one result per client per part (``digest``, ``evaluate``, ``train``, ``export``)
and the node's own metrics (learner seconds, their phases, peak memory); in a simulation of a
run that claims privacy, also ``<part>.oracle.<client>`` records: private statistics measured
beside the protocol, which deployed nodes never send (docs/what-leaves-a-client.md lists every
value).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedkd.learner.cohort import ClientResult

MSG_HELLO = "query.hello"
MSG_ROUND = "train.round"
# After the last round, with [audit] enabled: the audited client's final student weights.
MSG_EXPORT = "query.export"
# The parts of a request and its reply, in the order a node runs them.
PARTS = ("digest", "evaluate", "train", "export")
# Arrays of the previous round's digest carry this prefix (this round's plan has its own
# arrays, under their own names).
DIGEST_PREFIX = "digest."
# Arrays the evaluated clients get with their evaluation (`Strategy.evaluate_payload`).
EVALUATE_PREFIX = "evaluate."
# Records of a reply that a simulation's nodes add beside the protocol (ClientResult.oracle).
ORACLE = "oracle"
# The cause of a client asked for in a request whose node replied without a result for it.
NO_RESULT = "its node replied without a result for it (the client crashed?)"
# The phases of a ``train.round`` message a node times, in the order it runs them: the request's
# parsing, restoring clients from a checkpoint, building the learner (data, stores), the
# digest, the evaluation, the local training and upload, simulated faults, checkpointing the
# touched clients, and the reply's first steps (up to its ``learner_s``; building the record,
# which serialises the arrays, comes after it and is in neither).
NODE_PHASES = (
    "parse",
    "restore",
    "build",
    "digest",
    "evaluate",
    "train",
    "faults",
    "checkpoint",
    "reply",
)
# The clocks a node times its phases by, as the prefixes of its metrics' keys
# (``<clock>.<phase>``) and the keys of a round's row that sum them over nodes: wall seconds,
# CPU seconds of the thread that handles the message, CPU seconds of the whole node process
# (every thread: torch's, Ray's, Flower's).
PHASE_CLOCKS = ("learner_phases_s", "learner_phases_cpu_s", "learner_phases_process_cpu_s")


def to_array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def with_prefix(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {prefix + k: v for k, v in arrays.items()}


def without_prefix(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """The arrays whose names start with `prefix`, under their names without it."""
    return {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}


def plan_arrays(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A round request's arrays for this round's local phase (those of no digest or
    evaluation)."""
    return {k: v for k, v in arrays.items() if not k.startswith((DIGEST_PREFIX, EVALUATE_PREFIX))}


def payload_bytes(arrays: dict[str, np.ndarray]) -> int:
    """Bytes of the array data a message carries (what a deployment would transmit)."""
    return int(sum(a.nbytes for a in arrays.values()))


def request(config: dict, arrays: dict[str, np.ndarray] | ArrayRecord | None = None) -> RecordDict:
    """A request's content: its config and its arrays (or an already encoded `ArrayRecord`,
    which several messages may share: the server encodes an exchange's arrays once)."""
    payload = arrays if isinstance(arrays, ArrayRecord) else to_array_record(arrays or {})
    return RecordDict({"config": ConfigRecord(config), "payload": payload})


def parse_request(content: RecordDict) -> tuple[dict, dict[str, np.ndarray]]:
    config = dict(content["config"])
    arrays = from_array_record(content["payload"]) if "payload" in content else {}
    return config, arrays


def part_ids(config: dict, part: str) -> list[int]:
    """The clients a request asks to run `part` (``digest``, ``evaluate``, ``train``...)."""
    return [int(c) for c in config.get(f"{part}_ids", [])]


def results_to_record(
    parts: dict[str, dict[int, ClientResult]], node_metrics: dict[str, float]
) -> RecordDict:
    content = RecordDict(
        {
            "config": ConfigRecord({f"{p}_ids": sorted(r) for p, r in parts.items()}),
            "node": MetricRecord(node_metrics),
        }
    )
    for part, results in parts.items():
        for cid, res in results.items():
            content[f"{part}.arrays.{cid}"] = to_array_record(res.arrays)
            content[f"{part}.metrics.{cid}"] = MetricRecord(res.metrics)
            if res.oracle:  # simulation only (see ClientResult.oracle)
                content[f"{part}.{ORACLE}.{cid}"] = MetricRecord(res.oracle)
    return content


def record_to_results(
    content: RecordDict,
) -> tuple[dict[str, dict[int, ClientResult]], dict[str, float]]:
    """A reply's results per part and client, and the node's own metrics."""
    config = dict(content["config"])
    parts: dict[str, dict[int, ClientResult]] = {}
    for part in PARTS:
        parts[part] = {
            cid: ClientResult(
                arrays=from_array_record(content[f"{part}.arrays.{cid}"]),
                metrics={k: float(v) for k, v in content[f"{part}.metrics.{cid}"].items()},
                oracle={k: float(v) for k, v in content.get(f"{part}.{ORACLE}.{cid}", {}).items()},
            )
            for cid in part_ids(config, part)
        }
    node = {k: float(v) for k, v in content["node"].items()} if "node" in content else {}
    return parts, node
