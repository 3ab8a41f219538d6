"""The wire format: fedkd's plans, payloads and client results as Flower records.

Message types (DESIGN.md's round skeleton):
- ``query.hello``: which clients does this node host? (once, at the start)
- ``train.local``: local training, then the upload (logits on proxy indices, per-class logits,
  or weights); the proxy subset travels as indices, never as inputs.
- ``train.digest``: the teacher (or global weights) to learn from, then optional evaluation.
- ``evaluate``: evaluation only (strategies with nothing to digest).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedkd.learner.cohort import ClientResult

MSG_HELLO = "query.hello"
MSG_LOCAL = "train.local"
MSG_DIGEST = "train.digest"
MSG_EVALUATE = "evaluate"
# After the last round, with [audit] enabled: the audited client's final student weights.
MSG_EXPORT = "query.export"


def to_array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def payload_bytes(arrays: dict[str, np.ndarray]) -> int:
    """Bytes of the array data a message carries (what a deployment would transmit)."""
    return int(sum(a.nbytes for a in arrays.values()))


def request(config: dict, arrays: dict[str, np.ndarray] | None = None) -> RecordDict:
    return RecordDict({"config": ConfigRecord(config), "payload": to_array_record(arrays or {})})


def parse_request(content: RecordDict) -> tuple[dict, dict[str, np.ndarray]]:
    config = dict(content["config"])
    arrays = from_array_record(content["payload"]) if "payload" in content else {}
    return config, arrays


def results_to_record(results: dict[int, ClientResult]) -> RecordDict:
    content = RecordDict({"config": ConfigRecord({"client_ids": sorted(results)})})
    for cid, res in results.items():
        content[f"arrays.{cid}"] = to_array_record(res.arrays)
        content[f"metrics.{cid}"] = MetricRecord(res.metrics)
    return content


def record_to_results(content: RecordDict) -> dict[int, ClientResult]:
    out = {}
    for cid in content["config"]["client_ids"]:
        out[int(cid)] = ClientResult(
            arrays=from_array_record(content[f"arrays.{cid}"]),
            metrics={k: float(v) for k, v in content[f"metrics.{cid}"].items()},
        )
    return out
