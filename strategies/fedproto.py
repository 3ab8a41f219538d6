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

Two options act on the head after local training: the logit adjustment that every per-class
algorithm has (`strategies.per_class`; on by default here) and a calibration of the head on
the global prototypes (off by default). Beside its own validation slice, a client's head is
scored on that slice class-balanced and on the proxy set's public labelled validation slice
(where the run sets one), validation sets that can see what these options change.

Privacy: the regulariser runs outside DP-SGD, so DP-SGD is not supported; the counts are the
clients' exact label counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedkd.learner.functional_optim import ParamSGD
from fedkd.learner.loop import accuracy
from fedkd.learner.protocol import Learner
from fedkd.models.zoo import EMBEDDING_WIDTH, fixed_projection
from strategies.params import AlgorithmParams, Capabilities, ParamError, check_positive
from strategies.per_class import PerClassParams, PerClassStrategy


@dataclass
class FedProtoParams(PerClassParams):
    """FedProto's parameters."""

    # Weight of the prototype-distance regulariser in the clients' local training (lambda);
    # chosen with the head's logit adjustment on validation (the paper uses 1).
    proto_weight: float = 0.1
    # Head calibration on the global prototypes after local training (`calibrate_head`):
    # full-batch gradient steps (0: off) and their learning rate.
    calibration_steps: int = 0
    calibration_lr: float = 0.1
    # Logit adjustment of the head after local training (`strategies.per_class`): tau (0: off).
    # On by default: chosen on a public validation slice drawn like the global test set, the
    # distribution the clients' global accuracy is measured on (results/fedproto.md).
    logit_adjustment: float = 1.0

    def check(self) -> None:
        super().check()
        check_positive("proto_weight", self.proto_weight, zero_ok=True)
        if not isinstance(self.calibration_steps, int) or self.calibration_steps < 0:
            raise ParamError(
                f"calibration_steps: must be an integer >= 0, got {self.calibration_steps!r}"
            )
        check_positive("calibration_lr", self.calibration_lr)


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


def head_inputs(embeddings: torch.Tensor, width: int) -> torch.Tensor:
    """Inputs of a head `width` wide whose embeddings are `embeddings` ``(N, EMBEDDING_WIDTH)``.

    The embedding is the head's input itself where `width` is `EMBEDDING_WIDTH`, else that
    input times `fedkd.models.zoo.fixed_projection`; the least-norm preimage under the
    projection stands in for it there (a virtual feature's part outside the projection's
    range is unknown).
    """
    if width == EMBEDDING_WIDTH:
        return embeddings
    return embeddings @ torch.linalg.pinv(fixed_projection(width))


def calibrate_head(
    weight: np.ndarray,
    bias: np.ndarray,
    prototypes: np.ndarray,
    present: np.ndarray,
    steps: int,
    lr: float,
) -> tuple[np.ndarray, np.ndarray]:
    """A linear head after `steps` full-batch gradient steps of cross-entropy on the present
    classes' global prototypes, each labelled with its class (virtual features, one per class).

    A head trained on one client's skewed labels rarely predicts the classes the client holds
    few or none of; the prototypes are a class-balanced set that covers every class any client
    holds, including those.

    Parameters
    ----------
    weight, bias : ndarray
        The head, ``(C, H)`` and ``(C,)``.
    prototypes : ndarray
        ``(C, EMBEDDING_WIDTH)`` global prototypes (`head_inputs` maps them to the head's input).
    present : ndarray
        ``(C,)`` which classes have one.
    steps : int
        Gradient steps.
    lr : float
        Their learning rate.

    Returns
    -------
    (ndarray, ndarray)
        The calibrated head, float32.
    """
    classes = torch.from_numpy(np.flatnonzero(present))
    w = torch.tensor(weight, dtype=torch.float32, requires_grad=True)
    b = torch.tensor(bias, dtype=torch.float32, requires_grad=True)
    virtual = head_inputs(torch.from_numpy(prototypes).float()[classes], w.shape[1])
    opt = ParamSGD([w, b], lr=lr)  # torch.optim.SGD's update without its torch._dynamo import
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(virtual @ w.T + b, classes)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return w.detach().numpy(), b.detach().numpy()


class FedProto(PerClassStrategy):
    """Count-weighted per-class averaging of the clients' embedding prototypes.

    Parameters
    ----------
    **kwargs
        See `strategies.per_class.PerClassStrategy`. The regulariser's weight is the spec's
        ``algorithm.proto_weight`` (applied by the clients).
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

    def evaluate_payload(self, round_num: int) -> dict[str, np.ndarray]:
        """This round's global prototypes, for the nearest-prototype scores."""
        return self.global_means()

    @classmethod
    def calibrates(cls, params: AlgorithmParams, payload: dict[str, np.ndarray]) -> bool:
        """With ``calibration_steps``, once there are global prototypes."""
        assert isinstance(params, FedProtoParams)
        return bool(params.calibration_steps) and cls.means_key in payload

    @classmethod
    def calibrate(
        cls,
        params: AlgorithmParams,
        payload: dict[str, np.ndarray],
        weight: np.ndarray,
        bias: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The head calibrated on the global prototypes (`calibrate_head`) where `calibrates`."""
        assert isinstance(params, FedProtoParams)
        if not cls.calibrates(params, payload):
            return weight, bias
        return calibrate_head(
            weight,
            bias,
            payload[cls.means_key],
            payload[cls.present_key],
            params.calibration_steps,
            params.calibration_lr,
        )

    evaluation_metrics = (
        "client_proto_test_acc",
        "client_proto_local_acc",
        "client_proto_val_acc",
        *PerClassStrategy.evaluation_metrics,
    )

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
        held-out slice and its validation slice (NaN where a slice is empty), beside the
        head's scores on the validation sets of `PerClassStrategy.client_evaluate`."""
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
        head = super().client_evaluate(params, learner, client_ids, test_idx, payload)
        metrics = {}
        for cid in client_ids:
            client = data.clients[cid]
            metrics[cid] = {"client_proto_test_acc": score(test[cid], data.test_y[test_idx])}
            for name, x, y in (
                ("client_proto_local_acc", client.x_local_test, client.y_local_test),
                ("client_proto_val_acc", client.x_val, client.y_val),
            ):
                metrics[cid][name] = own_score(cid, x, y)
            metrics[cid].update(head[cid])
        return metrics

    def round_metrics(self) -> dict[str, float]:
        """How many classes have a global prototype."""
        if self._present is None:
            return {}
        return {"prototype_classes": float(self._present.sum())}
