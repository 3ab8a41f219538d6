"""FedProto: federated prototype learning (Tan et al., "FedProto: federated prototype learning
across heterogeneous clients", AAAI 2022).

Feature knowledge instead of logits, and no proxy set: each client uploads its prototypes, the
per-class means of its embeddings on its private training data, with per-class counts
(classes x width numbers, `fedkd.models.zoo.EMBEDDING_WIDTH` wide for every architecture, so
that heterogeneous students are comparable). The server averages them per class, weighted by
the counts, into global prototypes and sends them with the next training request; each client
then trains with cross-entropy plus ``proto_weight`` times the mean squared distance of an
example's embedding to its class's global prototype.

There is no global model. Clients are scored two ways:

- by their own classification head (``client_test_acc_*``, ``client_local_acc_mean``,
  ``client_val_acc_mean``), like every other algorithm's students;
- by the nearest global prototype (``client_proto_test_acc_mean``,
  ``client_proto_local_acc_mean``, ``client_proto_val_acc_mean``), the paper's prediction: an
  input gets the class whose global prototype is nearest to the client's embedding of it
  (squared Euclidean distance, over the classes that have a prototype). It can predict classes
  the client never held. The global prototypes of the round travel with the evaluation.

Privacy: the regulariser runs outside DP-SGD, so DP-SGD is not supported; the counts are the
clients' exact label counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedkd.learner.loop import accuracy
from fedkd.learner.protocol import Learner
from strategies.params import AlgorithmParams, Capabilities, check_positive
from strategies.per_class import PerClassStrategy


@dataclass
class FedProtoParams(AlgorithmParams):
    """FedProto's parameters."""

    # Weight of the prototype-distance regulariser in the clients' local training (lambda).
    proto_weight: float = 1.0

    def check(self) -> None:
        super().check()
        check_positive("proto_weight", self.proto_weight, zero_ok=True)


def nearest_prototype_scores(
    embeddings: np.ndarray, prototypes: np.ndarray, present: np.ndarray
) -> torch.Tensor:
    """Scores ``(N, C)`` whose argmax is the class of the nearest present prototype.

    Parameters
    ----------
    embeddings : ndarray
        ``(N, D)`` embeddings.
    prototypes : ndarray
        ``(C, D)`` global prototypes.
    present : ndarray
        ``(C,)`` which classes have one (the others can never be predicted).

    Returns
    -------
    Tensor
        Minus the squared Euclidean distances, ``-inf`` for absent classes.
    """
    distances = torch.cdist(torch.from_numpy(embeddings), torch.from_numpy(prototypes)) ** 2
    return (-distances).masked_fill(~torch.from_numpy(present.astype(bool)), float("-inf"))


class FedProto(PerClassStrategy):
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
    space = "embeddings"
    means_key = "prototypes"
    counts_key = "prototype_counts"
    present_key = "prototype_present"

    @classmethod
    def regulariser_weight(cls, params: AlgorithmParams) -> float:
        assert isinstance(params, FedProtoParams)
        return params.proto_weight

    evaluation_metrics = ("client_proto_test_acc", "client_proto_local_acc", "client_proto_val_acc")

    def evaluate_payload(self, round_num: int) -> dict[str, np.ndarray]:
        """This round's global prototypes, for the nearest-prototype scores."""
        return self.plan_local(round_num)

    @classmethod
    def client_evaluate(
        cls,
        params: AlgorithmParams,
        learner: Learner,
        client_ids: list[int],
        test_idx: np.ndarray,
        payload: dict[str, np.ndarray],
    ) -> dict[int, dict[str, float]]:
        """Accuracy of the nearest global prototype on the global test subset, the client's
        held-out slice and its validation slice (NaN where a slice is empty)."""
        if cls.means_key not in payload:
            return {}
        data = learner.data

        def score(embeddings: np.ndarray, y: np.ndarray) -> float:
            prototypes, present = payload[cls.means_key], payload[cls.present_key]
            return accuracy(nearest_prototype_scores(embeddings, prototypes, present), y)

        def own_score(cid: int, x: np.ndarray, y: np.ndarray) -> float:
            if len(y) == 0:  # an empty slice: no score (left out of the mean)
                return float("nan")
            return score(learner.embeddings([cid], x)[cid], y)

        test = learner.embeddings(client_ids, data.test_x[test_idx])
        metrics = {}
        for cid in client_ids:
            client = data.clients[cid]
            metrics[cid] = {"client_proto_test_acc": score(test[cid], data.test_y[test_idx])}
            for name, x, y in (
                ("client_proto_local_acc", client.x_local_test, client.y_local_test),
                ("client_proto_val_acc", client.x_val, client.y_val),
            ):
                metrics[cid][name] = own_score(cid, x, y)
        return metrics

    def round_metrics(self) -> dict[str, float]:
        """How many classes have a global prototype."""
        if self._present is None:
            return {}
        return {"prototype_classes": float(self._present.sum())}
