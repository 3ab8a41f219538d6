"""FD: Federated Distillation (Jeong et al., 2018).

The cheapest exchange: no proxy set. Each client uploads its per-class average logits on its
private data (C x C numbers) with per-class counts; the server averages them per class,
weighted by counts; in the next round each client adds a distillation regulariser pulling its
output on an example of class c towards the global average for c.

The regulariser is bounded: KL between the student's tempered softmax and the softmax of the
global class average. Applying cross-entropy to raw averaged logits, as one public
implementation does, can diverge to NaN within a few rounds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedkd.knowledge.teachers import aggregate_per_class
from fedkd.learner.cohort import ClientResult
from fedkd.learner.loop import ClassRegulariser
from fedkd.learner.protocol import Learner
from strategies.base import Strategy, stack_uploads
from strategies.params import AlgorithmParams, Capabilities, check_positive


@dataclass
class FDParams(AlgorithmParams):
    """FD's parameters."""

    # Weight of the distillation regulariser in the clients' local training.
    fd_weight: float = 1.0

    def check(self) -> None:
        super().check()
        check_positive("fd_weight", self.fd_weight, zero_ok=True)


class FD(Strategy):
    """Federated Distillation with per-class logits.

    Parameters
    ----------
    **kwargs
        See `strategies.base.Strategy`; no proxy set and no server student are used. The
        regulariser weight and temperature are the spec's ``algorithm.fd_weight`` and
        ``distill.temperature`` (applied by the clients).
    """

    name = "fd"
    Params = FDParams
    # The regulariser's training runs outside DP-SGD.
    capabilities = Capabilities(
        uploads=("class_logits",), server_student="unused", supports_dpsgd=False
    )

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.server_student = None
        self._class_logits: np.ndarray | None = None
        self._class_present: np.ndarray | None = None

    def plan_local(self, round_num: int) -> dict[str, np.ndarray]:
        """The global per-class logits (C, C) and which classes are present (C,), once known."""
        if self._class_logits is None:
            return {}
        return {
            "class_logits": self._class_logits.astype(np.float32),
            "class_present": self._class_present.astype(np.uint8),
        }

    def aggregate(self, round_num: int, updates: dict[int, ClientResult]) -> None:
        class_logits, _ = stack_uploads(updates, "class_logits")
        counts, _ = stack_uploads(updates, "class_counts")
        self._class_logits = aggregate_per_class(class_logits, counts).numpy()
        self._class_present = (counts.sum(dim=0) > 0).numpy()

    @classmethod
    def client_round(
        cls,
        params: AlgorithmParams,
        learner: Learner,
        round_num: int,
        client_ids: list[int],
        payload: dict[str, np.ndarray],
    ) -> dict[int, ClientResult]:
        """Private training regularised towards the global per-class logits (KL at the spec's
        ``distill.temperature``), then the per-class mean logits and counts."""
        assert isinstance(params, FDParams)
        regulariser = None
        if "class_logits" in payload:
            regulariser = ClassRegulariser(
                targets=torch.from_numpy(payload["class_logits"]),
                present=torch.from_numpy(payload["class_present"].astype(bool)),
                weight=params.fd_weight,
            )
        results = learner.train_private(round_num, client_ids, regulariser)
        for cid, (means, counts) in learner.class_statistics(client_ids, "logits").items():
            results[cid].arrays.update(class_logits=means, class_counts=counts)
        return results
