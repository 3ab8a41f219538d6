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

from fedkd.learner.cohort import ClientResult
from fedkd.learner.loop import accuracy
from fedkd.learner.protocol import Learner
from fedkd.models.zoo import EMBEDDING_WIDTH, fixed_projection
from strategies.params import AlgorithmParams, Capabilities, ParamError, check_positive
from strategies.per_class import PerClassStrategy


@dataclass
class FedProtoParams(AlgorithmParams):
    """FedProto's parameters."""

    # Weight of the prototype-distance regulariser in the clients' local training (lambda).
    proto_weight: float = 1.0
    # Head calibration on the global prototypes after local training (`calibrate_head`):
    # full-batch gradient steps (0: off) and their learning rate.
    calibration_steps: int = 0
    calibration_lr: float = 0.1
    # Logit adjustment of the head after local training (`adjusted_bias`): tau (0: off).
    logit_adjustment: float = 0.0

    def check(self) -> None:
        super().check()
        check_positive("proto_weight", self.proto_weight, zero_ok=True)
        if not isinstance(self.calibration_steps, int) or self.calibration_steps < 0:
            raise ParamError(
                f"calibration_steps: must be an integer >= 0, got {self.calibration_steps!r}"
            )
        check_positive("calibration_lr", self.calibration_lr)
        check_positive("logit_adjustment", self.logit_adjustment, zero_ok=True)


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
    opt = torch.optim.SGD([w, b], lr=lr)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(virtual @ w.T + b, classes)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return w.detach().numpy(), b.detach().numpy()


def balancing_offsets(counts: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Per-class logit offsets that turn a head trained on `counts` towards a prior uniform
    over the `present` classes: ``-log`` of the client's smoothed class frequency
    (``(count + 1) / (total + classes)``) on present classes, centred; 0 on the others.
    """
    frequency = (counts + 1.0) / (counts.sum() + len(counts))
    offsets = np.where(present.astype(bool), -np.log(frequency), 0.0)
    offsets[present.astype(bool)] -= offsets[present.astype(bool)].mean()
    return offsets.astype(np.float32)


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

    @classmethod
    def client_round(
        cls,
        params: AlgorithmParams,
        learner: Learner,
        round_num: int,
        client_ids: list[int],
        payload: dict[str, np.ndarray],
    ) -> dict[int, ClientResult]:
        """Local training pulled towards the global prototypes, the uploads, then (with
        ``calibration_steps``) each client's head calibrated on the global prototypes
        (`calibrate_head`; the uploads, embeddings' means, do not depend on the head)."""
        results = super().client_round(params, learner, round_num, client_ids, payload)
        assert isinstance(params, FedProtoParams)
        if (not params.calibration_steps and not params.logit_adjustment) or (
            cls.means_key not in payload
        ):
            return results
        num_classes = learner.data.num_classes
        for cid, weights in learner.get_weights(client_ids).items():
            *_, weight_key, bias_key = weights  # the last layer: the head
            weight, bias = weights[weight_key], weights[bias_key]
            if weight.ndim != 2 or weight.shape[0] != num_classes or bias.shape != (num_classes,):
                raise ValueError(
                    "algorithm.calibration_steps: the student's last layer is not a linear head "
                    f"({weight_key} {weight.shape}, {bias_key} {bias.shape}); set it to 0"
                )
            if params.calibration_steps:
                weight, bias = calibrate_head(
                    weight,
                    bias,
                    payload[cls.means_key],
                    payload[cls.present_key],
                    params.calibration_steps,
                    params.calibration_lr,
                )
            if params.logit_adjustment:
                counts = results[cid].arrays[cls.counts_key]
                bias = bias + params.logit_adjustment * balancing_offsets(
                    counts, payload[cls.present_key]
                )
            weights[weight_key], weights[bias_key] = weight, bias
            learner.set_weights([cid], weights)
        return results

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
