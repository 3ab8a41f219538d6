"""FedAvg (McMahan et al., 2017): the weight-exchanging baseline.

Runs through the same engine, data and metrics as the logit strategies, for one shared
architecture: clients upload their weights after local training, the server averages them
weighted by example counts, and clients start the next round from the average.
"""

from __future__ import annotations

import numpy as np
import torch

from fedkd.learner.cohort import ClientResult
from fedkd.learner.loop import PHASE_INIT, accuracy, init_student, predict_logits
from strategies.base import DigestPayload, Strategy


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
    upload = "weights"
    has_teacher = False

    def __init__(self, *args, arch: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.server_student = None
        self.global_model = init_student(
            arch, self.data.input_shape, self.data.num_classes, self.seed, -2, PHASE_INIT
        )
        self._global: dict[str, np.ndarray] | None = None

    def aggregate(self, round_num: int, updates: dict[int, ClientResult]) -> None:
        ids = sorted(updates)
        weights = np.array([updates[c].metrics["num_examples"] for c in ids], dtype=np.float64)
        weights /= weights.sum()
        keys = updates[ids[0]].arrays.keys()
        self._global = {
            k: sum(
                w * updates[c].arrays[k].astype(np.float64)
                for c, w in zip(ids, weights, strict=True)
            ).astype(updates[ids[0]].arrays[k].dtype)
            for k in keys
        }
        self.global_model.load_state_dict({k: torch.from_numpy(v) for k, v in self._global.items()})

    def digest_payload(self, round_num: int) -> DigestPayload | None:
        return None if self._global is None else DigestPayload(global_weights=self._global)

    def server_test_acc(self) -> float | None:
        return accuracy(predict_logits(self.global_model, self.data.test_x), self.data.test_y)
