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

Two options act on the head after local training, off by default: a logit adjustment that
makes it predict as if the client's classes were balanced (the global test set holds every
class; one client's skewed labels teach its head to rarely predict the classes it lacks), and
a calibration of the head on the global prototypes. Beside its own validation slice, a client's
head is scored on that slice class-balanced and on the proxy set's public labelled validation
slice (where the run sets one), validation sets that can see what these options change.

Privacy: the regulariser runs outside DP-SGD, so DP-SGD is not supported; the counts are the
clients' exact label counts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedkd.learner.cohort import ClientResult
from fedkd.learner.loop import accuracy
from fedkd.learner.protocol import Learner
from fedkd.models.zoo import EMBEDDING_WIDTH, fixed_projection
from strategies.base import BuildContext
from strategies.params import AlgorithmParams, Capabilities, ParamError, check_positive
from strategies.per_class import PerClassStrategy


@dataclass
class FedProtoParams(AlgorithmParams):
    """FedProto's parameters."""

    # Weight of the prototype-distance regulariser in the clients' local training (lambda);
    # chosen with the head's logit adjustment on validation (the paper uses 1).
    proto_weight: float = 0.1
    # Head calibration on the global prototypes after local training (`calibrate_head`):
    # full-batch gradient steps (0: off) and their learning rate.
    calibration_steps: int = 0
    calibration_lr: float = 0.1
    # Logit adjustment of the head after local training (`adjusted_bias`): tau (0: off). On by
    # default: chosen on a public validation slice drawn like the global test set, the
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


def balanced_accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    """Mean over the classes present in `y` of the accuracy on that class's examples (NaN
    where `y` is empty).

    A client's validation slice is drawn like its skewed private data, the global test set
    is not: weighting every class alike estimates accuracy under balanced classes from it,
    for the classes the slice holds (a selection metric for options that trade a client's
    frequent classes for its rare ones).
    """
    if len(y) == 0:
        return float("nan")
    correct = np.asarray(logits).argmax(axis=1) == y
    return float(np.mean([correct[y == c].mean() for c in np.unique(y)]))


def balancing_offsets(counts: np.ndarray) -> np.ndarray:
    """Per-class logit offsets that move a head trained on a client's label `counts` towards
    balanced predictions (logit adjustment, Menon et al., ICLR 2021): minus the log of the
    client's smoothed class frequencies ``(count + 1) / (total + classes)``, centred.
    """
    offsets = -np.log((counts + 1.0) / (counts.sum() + len(counts)))
    return (offsets - offsets.mean()).astype(np.float32)


class FedProto(PerClassStrategy):
    """Count-weighted per-class averaging of the clients' embedding prototypes.

    Parameters
    ----------
    logit_adjustment : float, default 0.0
        The spec's ``algorithm.logit_adjustment``: where it is not 0, each training request
        says which clients' heads carry the adjustment (`client_round`).
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

    def __init__(self, *args, logit_adjustment: float = 0.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.logit_adjustment = logit_adjustment
        # Clients whose uploads were aggregated: their heads carry the logit adjustment.
        self._adjusted = np.zeros(len(self.data.clients), dtype=np.uint8)

    @classmethod
    def init_kwargs(cls, params: AlgorithmParams, context: BuildContext) -> dict[str, Any]:
        assert isinstance(params, FedProtoParams)
        return {**super().init_kwargs(params, context), "logit_adjustment": params.logit_adjustment}

    def plan_local(self, round_num: int) -> dict[str, np.ndarray]:
        """The global prototypes (once known) and, with ``logit_adjustment``, which clients'
        heads carry the adjustment (``adjusted_clients``, one byte per client)."""
        payload = super().plan_local(round_num)
        if self.logit_adjustment and self._adjusted.any():
            payload["adjusted_clients"] = self._adjusted.copy()
        return payload

    def aggregate(self, round_num: int, updates: dict[int, ClientResult]) -> None:
        super().aggregate(round_num, updates)
        self._adjusted[list(updates)] = 1

    def evaluate_payload(self, round_num: int) -> dict[str, np.ndarray]:
        """This round's global prototypes, for the nearest-prototype scores."""
        return super().plan_local(round_num)

    @classmethod
    def client_round(
        cls,
        params: AlgorithmParams,
        learner: Learner,
        round_num: int,
        client_ids: list[int],
        payload: dict[str, np.ndarray],
    ) -> dict[int, ClientResult]:
        """Local training pulled towards the global prototypes and the uploads, with the
        head options around it.

        With ``logit_adjustment`` (tau), a client's head leaves every round with its bias
        shifted by tau times `balancing_offsets` of its label counts, and the shift is taken
        off again before its next training (where ``adjusted_clients`` says its head carries
        it), so that training itself is FedProto's. With ``calibration_steps``, the head is
        calibrated on the global prototypes after training (`calibrate_head`). Neither
        changes the uploads (means of embeddings, below the head). A head rewritten here gets
        a fresh private-training optimizer (`Learner.set_weights`).
        """
        assert isinstance(params, FedProtoParams)
        tau = params.logit_adjustment

        def offsets(cid: int) -> np.ndarray:
            labels = learner.data.clients[cid].y_train
            return balancing_offsets(np.bincount(labels, minlength=learner.data.num_classes))

        adjusted = payload.get("adjusted_clients")
        if tau and adjusted is not None:
            carrying = [cid for cid in client_ids if adjusted[cid]]
            cls._rewrite_heads(learner, carrying, lambda cid, w, b: (w, b - tau * offsets(cid)))
        results = super().client_round(params, learner, round_num, client_ids, payload)

        def after_training(cid: int, weight: np.ndarray, bias: np.ndarray) -> tuple:
            if params.calibration_steps and cls.means_key in payload:
                weight, bias = calibrate_head(
                    weight,
                    bias,
                    payload[cls.means_key],
                    payload[cls.present_key],
                    params.calibration_steps,
                    params.calibration_lr,
                )
            return weight, bias + tau * offsets(cid)

        if tau or (params.calibration_steps and cls.means_key in payload):
            cls._rewrite_heads(learner, client_ids, after_training)
        return results

    @staticmethod
    def _rewrite_heads(
        learner: Learner,
        client_ids: list[int],
        rewrite: Callable[[int, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
    ) -> None:
        """Replace each client's head (its last layer, a linear one) by ``rewrite(cid, weight,
        bias)``."""
        num_classes = learner.data.num_classes
        for cid, weights in learner.get_weights(client_ids).items():
            *_, weight_key, bias_key = weights
            weight, bias = weights[weight_key], weights[bias_key]
            if weight.ndim != 2 or weight.shape[0] != num_classes or bias.shape != (num_classes,):
                raise ValueError(
                    "algorithm.logit_adjustment / calibration_steps: the student's last layer "
                    f"is not a linear head ({weight_key} {weight.shape}, {bias_key} "
                    f"{bias.shape}); set them to 0"
                )
            new_weight, new_bias = rewrite(cid, weight, bias)
            weights[weight_key] = np.asarray(new_weight, dtype=weight.dtype)
            weights[bias_key] = np.asarray(new_bias, dtype=bias.dtype)
            learner.set_weights([cid], weights)

    evaluation_metrics = (
        "client_proto_test_acc",
        "client_proto_local_acc",
        "client_proto_val_acc",
        "client_balanced_val_acc",
        "client_public_val_acc",
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
        held-out slice and its validation slice (NaN where a slice is empty); the head's
        class-balanced accuracy on the validation slice (`balanced_accuracy`) and its accuracy
        on the proxy set's labelled validation slice (``data.proxy_validation_size``; NaN
        without one), public data drawn like the global test set."""
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
        public = learner.logits(client_ids, data.proxy_val_x) if len(data.proxy_val_y) else {}
        metrics = {}
        for cid in client_ids:
            client = data.clients[cid]
            metrics[cid] = {"client_proto_test_acc": score(test[cid], data.test_y[test_idx])}
            for name, x, y in (
                ("client_proto_local_acc", client.x_local_test, client.y_local_test),
                ("client_proto_val_acc", client.x_val, client.y_val),
            ):
                metrics[cid][name] = own_score(cid, x, y)
            val_logits = learner.logits([cid], client.x_val)[cid]
            metrics[cid]["client_balanced_val_acc"] = balanced_accuracy(val_logits, client.y_val)
            scores = torch.as_tensor(public[cid]) if public else torch.empty(0)
            metrics[cid]["client_public_val_acc"] = accuracy(scores, data.proxy_val_y)
        return metrics

    def round_metrics(self) -> dict[str, float]:
        """How many classes have a global prototype."""
        if self._present is None:
            return {}
        return {"prototype_classes": float(self._present.sum())}
