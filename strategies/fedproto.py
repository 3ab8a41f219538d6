"""FedProto: federated prototype learning (Tan et al., "FedProto: federated prototype learning
across heterogeneous clients", AAAI 2022).

Feature knowledge instead of logits, and no proxy set: each client uploads its prototypes, the
per-class means of its embeddings on its private training data, with per-class counts
(classes x width numbers, `fedkd.models.zoo.EMBEDDING_WIDTH` wide for every architecture, so
that heterogeneous students are comparable). The server averages them per class, weighted by
the counts, into global prototypes and sends them with the next training request; each client
then trains with cross-entropy plus ``proto_weight`` times the mean squared distance of an
example's embedding to its class's global prototype.

Clients are evaluated by their own classification head (``client_test_acc_*``), like every
other algorithm's students; there is no global model.

Privacy: the regulariser runs outside DP-SGD, so DP-SGD is not supported; the counts are the
clients' exact label counts.
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
class FedProtoParams(AlgorithmParams):
    """FedProto's parameters."""

    # Weight of the prototype-distance regulariser in the clients' local training (lambda).
    proto_weight: float = 1.0

    def check(self) -> None:
        super().check()
        check_positive("proto_weight", self.proto_weight, zero_ok=True)


class FedProto(Strategy):
    """Count-weighted per-class averaging of the clients' embedding prototypes.

    Parameters
    ----------
    **kwargs
        See `strategies.base.Strategy`; no proxy set and no server student are used. The
        regulariser's weight is the spec's ``algorithm.proto_weight`` (applied by the clients).
    """

    name = "fedproto"
    Params = FedProtoParams
    capabilities = Capabilities(
        uploads=("prototypes",), server_student="unused", supports_dpsgd=False
    )

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.server_student = None
        self._prototypes: np.ndarray | None = None
        self._present: np.ndarray | None = None

    def plan_local(self, round_num: int) -> dict[str, np.ndarray]:
        """The global prototypes (C, width) and which classes have one (C,), once known."""
        if self._prototypes is None:
            return {}
        return {"prototypes": self._prototypes, "prototype_present": self._present}

    def aggregate(self, round_num: int, updates: dict[int, ClientResult]) -> None:
        prototypes, _ = stack_uploads(updates, "prototypes")
        counts, _ = stack_uploads(updates, "prototype_counts")
        self._prototypes = aggregate_per_class(prototypes, counts).numpy().astype(np.float32)
        self._present = (counts.sum(dim=0) > 0).numpy().astype(np.uint8)

    def round_metrics(self) -> dict[str, float]:
        """How many classes have a global prototype."""
        if self._present is None:
            return {}
        return {"prototype_classes": float(self._present.sum())}

    @classmethod
    def client_round(
        cls,
        params: AlgorithmParams,
        learner: Learner,
        round_num: int,
        client_ids: list[int],
        payload: dict[str, np.ndarray],
    ) -> dict[int, ClientResult]:
        """Private training pulled towards the global prototypes (from round 2), then the
        client's prototypes and per-class counts."""
        assert isinstance(params, FedProtoParams)
        regulariser = None
        if "prototypes" in payload:
            regulariser = ClassRegulariser(
                targets=torch.from_numpy(payload["prototypes"]),
                present=torch.from_numpy(payload["prototype_present"].astype(bool)),
                weight=params.proto_weight,
                space="embeddings",
            )
        results = learner.train_private(round_num, client_ids, regulariser)
        for cid, (means, counts) in learner.class_statistics(client_ids, "embeddings").items():
            results[cid].arrays.update(prototypes=means, prototype_counts=counts)
        return results
