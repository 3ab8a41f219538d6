"""FedAvg (McMahan et al., 2017): the weight-exchanging baseline.

Runs through the same engine, data and metrics as the logit strategies, for one shared
architecture: every round the server sends the global model with the training request (in the
first round its initialisation, so that all clients start from the same weights), clients train
it locally and upload their weights, and the server averages them weighted by example counts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fedkd.learner.cohort import ClientResult
from fedkd.learner.loop import PHASE_INIT, accuracy, init_student, predict_logits
from fedkd.learner.protocol import Learner
from strategies.base import BuildContext, Strategy
from strategies.params import AlgorithmParams, Capabilities


class FedAvg(Strategy):
    """Weighted averaging of client weights.

    Parameters
    ----------
    arch : str
        The architecture every client shares (the global model's).
    **kwargs
        See `strategies.base.Strategy`; proxy set and server student are unused.
    """

    name = "fedavg"
    # Weights as the upload: every client shares one architecture (the spec checks it).
    capabilities = Capabilities(uploads_weights=True, server_student="unused")

    def __init__(self, *args, arch: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.server_student = None
        self.global_model = init_student(
            arch, self.data.input_shape, self.data.num_classes, self.seed, -2, PHASE_INIT
        )

    @classmethod
    def init_kwargs(cls, params: AlgorithmParams, context: BuildContext) -> dict[str, Any]:
        return {**super().init_kwargs(params, context), "arch": context.client_arch}

    def plan_local(self, round_num: int) -> dict[str, np.ndarray]:
        """The global model every client starts the round from."""
        return {k: v.detach().numpy().copy() for k, v in self.global_model.state_dict().items()}

    @classmethod
    def client_round(
        cls,
        params: AlgorithmParams,
        learner: Learner,
        round_num: int,
        client_ids: list[int],
        payload: dict[str, np.ndarray],
    ) -> dict[int, ClientResult]:
        """Start from the global weights (a fresh local optimizer), train, upload the weights."""
        learner.set_weights(client_ids, payload)
        results = learner.train_private(round_num, client_ids)
        for cid, weights in learner.get_weights(client_ids).items():
            results[cid].arrays.update(weights)
        return results

    def aggregate(self, round_num: int, updates: dict[int, ClientResult]) -> None:
        ids = sorted(updates)
        weights = np.array([updates[c].metrics["num_examples"] for c in ids], dtype=np.float64)
        weights /= weights.sum()
        averaged = {
            k: sum(
                w * updates[c].arrays[k].astype(np.float64)
                for c, w in zip(ids, weights, strict=True)
            ).astype(updates[ids[0]].arrays[k].dtype)
            for k in updates[ids[0]].arrays
        }
        self.global_model.load_state_dict({k: torch.from_numpy(v) for k, v in averaged.items()})

    def global_model_accuracy(self, x: np.ndarray, y: np.ndarray) -> float | None:
        return accuracy(predict_logits(self.global_model, x), y)
