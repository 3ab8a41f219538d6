"""An algorithm's own evaluation metrics (`Strategy.client_evaluate`): the server sends its
`evaluate_payload` with the evaluation and averages each metric over clients into the row."""

from __future__ import annotations

import numpy as np

from strategies.local_only import LocalOnly
from tests.test_engine import run_inprocess


class EvaluatedLocalOnly(LocalOnly):
    """Local-only whose clients report their id and the round of the payload they got."""

    name = "evaluated_local_only"
    evaluation_metrics = ("client_id", "payload_round_val_acc")

    def evaluate_payload(self, round_num: int) -> dict[str, np.ndarray]:
        return {"round": np.array([round_num], dtype=np.int32)}

    @classmethod
    def client_evaluate(cls, params, learner, client_ids, test_idx, payload):
        seen = float(payload["round"][0])
        return {cid: {"client_id": float(cid), "payload_round_val_acc": seen} for cid in client_ids}


def test_an_algorithms_evaluation_metrics_reach_the_row_as_means_over_clients(tmp_path):
    # DP-SGD on: a metric named like a private statistic travels in the oracle channel only.
    dp = ["privacy.dpsgd=true", "privacy.noise_multiplier=1.0", "train.epochs=1"]
    overrides = ["algorithm.name=tests.test_evaluation_hook:EvaluatedLocalOnly", *dp]
    _, summary, rows, grid = run_inprocess(tmp_path, overrides)
    assert summary["status"] == "completed"
    for row in rows:  # every client is evaluated (4 clients, full participation)
        assert row["client_id_mean"] == np.mean([0, 1, 2, 3])
        assert row["payload_round_val_acc_mean"] == row["round"]  # the round's own payload
        assert "payload_round_val_acc_mean" in row["oracle_metrics"]
        assert "client_id_mean" not in row["oracle_metrics"]
        # The payload is counted: 4 bytes to each evaluated client.
        assert row["bytes_down"] == 4 * 4
