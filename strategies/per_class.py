"""Per-class knowledge without a proxy set: the shape FD and FedProto share.

Each client uploads per-class means of its outputs on its private training data (logits, or
embeddings of one width for every architecture) with per-class counts; the server averages
them per class, weighted by the counts, and sends the averages with the next training request;
each client then trains with a `fedkd.learner.loop.ClassRegulariser` pulling an example's output
towards its class's average. A subclass names its arrays, the space of its statistics and its
regulariser's weight.

Both share one head option, the logit adjustment (``algorithm.logit_adjustment``, tau): a head
trained on one client's skewed labels rarely predicts the classes it holds little or none of,
while the global test set holds all of them. A client's head leaves every round with its bias
shifted by tau times `balancing_offsets` of its label counts, and the shift is taken off again
before its next training, so that training itself is the algorithm's. To choose it, clients'
heads are also scored on validation sets that can see what it changes
(`PerClassStrategy.client_evaluate`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from fedkd.knowledge.teachers import aggregate_per_class
from fedkd.learner.cohort import ClientResult
from fedkd.learner.loop import ClassRegulariser, accuracy
from fedkd.learner.protocol import Learner
from strategies.base import BuildContext, Strategy, stack_uploads
from strategies.params import AlgorithmParams, check_positive


@dataclass
class PerClassParams(AlgorithmParams):
    """Parameters every per-class algorithm has."""

    # Logit adjustment of the head after local training (`balancing_offsets`): tau (0: off).
    logit_adjustment: float = 0.0

    def check(self) -> None:
        super().check()
        check_positive("logit_adjustment", self.logit_adjustment, zero_ok=True)


def balancing_offsets(counts: np.ndarray) -> np.ndarray:
    """Per-class logit offsets that move a head trained on a client's label `counts` towards
    balanced predictions (logit adjustment, Menon et al., ICLR 2021): minus the log of the
    client's smoothed class frequencies ``(count + 1) / (total + classes)``, centred.
    """
    offsets = -np.log((counts + 1.0) / (counts.sum() + len(counts)))
    return (offsets - offsets.mean()).astype(np.float32)


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


HeadRewrite = Callable[[int, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def rewrite_heads(
    learner: Learner,
    client_ids: list[int],
    rewrite: HeadRewrite,
    *,
    keep_optimizer: bool = False,
) -> None:
    """Replace each client's head (its last layer, a linear one) by ``rewrite(cid, weight,
    bias)``; the client gets a fresh private-training optimizer, or keeps its own with
    `keep_optimizer` (`Learner.set_weights`)."""
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
        learner.set_weights([cid], weights, keep_optimizer=keep_optimizer)


class PerClassStrategy(Strategy):
    """Count-weighted per-class averages of the clients' per-class mean outputs.

    Parameters
    ----------
    logit_adjustment : float, default 0.0
        The spec's ``algorithm.logit_adjustment``: where it is not 0, each training request
        says which clients' heads carry the adjustment (`client_round`).
    **kwargs
        See `strategies.base.Strategy`; no proxy set and no server student are used.
    """

    Params = PerClassParams
    # The space of the statistics and the regulariser: "logits" or "embeddings".
    space: ClassVar[str] = "logits"
    # Array names: a client's per-class means (and the server's averages, sent back under the
    # same name), the per-class counts, and which classes have an average.
    means_key: ClassVar[str] = "class_means"
    counts_key: ClassVar[str] = "class_counts"
    present_key: ClassVar[str] = "class_present"

    def __init__(self, *args, logit_adjustment: float = 0.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.server_student = None
        self._means: np.ndarray | None = None
        self._present: np.ndarray | None = None
        self.logit_adjustment = logit_adjustment
        # Clients whose uploads were aggregated: their heads carry the logit adjustment.
        self._adjusted = np.zeros(len(self.data.clients), dtype=np.uint8)

    @classmethod
    def init_kwargs(cls, params: AlgorithmParams, context: BuildContext) -> dict[str, Any]:
        assert isinstance(params, PerClassParams)
        return {**super().init_kwargs(params, context), "logit_adjustment": params.logit_adjustment}

    @classmethod
    def regulariser_weight(cls, params: AlgorithmParams) -> float:
        """The regulariser's weight in the clients' local training (from the parameters)."""
        return 1.0

    @classmethod
    def regulariser_normalise(cls, params: AlgorithmParams) -> bool:
        """Whether the clients' loss is divided by 1 + the regulariser's weight
        (`fedkd.learner.loop.ClassRegulariser`'s ``normalise``; no)."""
        return False

    def global_means(self) -> dict[str, np.ndarray]:
        """The global per-class averages (C, D) and which classes have one (C,), once known."""
        if self._means is None:
            return {}
        return {
            self.means_key: self._means.astype(np.float32),
            self.present_key: self._present.astype(np.uint8),
        }

    def plan_local(self, round_num: int) -> dict[str, np.ndarray]:
        """`global_means` and, with ``logit_adjustment``, which clients' heads carry the
        adjustment (``adjusted_clients``, one byte per client)."""
        payload = self.global_means()
        if self.logit_adjustment and self._adjusted.any():
            payload["adjusted_clients"] = self._adjusted.copy()
        return payload

    def aggregate(self, round_num: int, updates: dict[int, ClientResult]) -> None:
        means, _ = stack_uploads(updates, self.means_key)
        counts, _ = stack_uploads(updates, self.counts_key)
        self._means = aggregate_per_class(means, counts).numpy()
        self._present = (counts.sum(dim=0) > 0).numpy()
        self._adjusted[list(updates)] = 1

    @classmethod
    def calibrates(cls, params: AlgorithmParams, payload: dict[str, np.ndarray]) -> bool:
        """Whether `calibrate` rewrites the heads after this round's training (no)."""
        return False

    @classmethod
    def calibrate(
        cls,
        params: AlgorithmParams,
        payload: dict[str, np.ndarray],
        weight: np.ndarray,
        bias: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """A client's head after training, before the logit adjustment (unchanged)."""
        return weight, bias

    @classmethod
    def client_round(
        cls,
        params: AlgorithmParams,
        learner: Learner,
        round_num: int,
        client_ids: list[int],
        payload: dict[str, np.ndarray],
    ) -> dict[int, ClientResult]:
        """Private training pulled towards the global per-class averages (once there are
        any), then the client's per-class means and counts, with the head options around it.

        With ``logit_adjustment`` (tau), the shift comes off a head that carries it (where
        ``adjusted_clients`` says so) before training and goes on again after it, once the
        uploads are computed; `calibrate` (where `calibrates`) rewrites the head before the
        shift. Neither changes the uploads. The shift alone keeps the client's optimizer (its
        momentum), so that the adjustment leaves training as it is without it; a calibrated
        head is a new one and gets a fresh optimizer.
        """
        assert isinstance(params, PerClassParams)
        tau = params.logit_adjustment

        def offsets(cid: int) -> np.ndarray:
            labels = learner.data.clients[cid].y_train
            return balancing_offsets(np.bincount(labels, minlength=learner.data.num_classes))

        adjusted = payload.get("adjusted_clients")
        if tau and adjusted is not None:
            carrying = [cid for cid in client_ids if adjusted[cid]]
            rewrite_heads(
                learner,
                carrying,
                lambda cid, w, b: (w, b - tau * offsets(cid)),
                keep_optimizer=True,
            )
        regulariser = None
        if cls.means_key in payload:
            regulariser = ClassRegulariser(
                targets=torch.from_numpy(payload[cls.means_key]),
                present=torch.from_numpy(payload[cls.present_key].astype(bool)),
                weight=cls.regulariser_weight(params),
                space=cls.space,
                normalise=cls.regulariser_normalise(params),
            )
        results = learner.train_private(round_num, client_ids, regulariser)
        for cid, (means, counts) in learner.class_statistics(client_ids, cls.space).items():
            results[cid].arrays.update({cls.means_key: means, cls.counts_key: counts})

        def after_training(cid: int, weight: np.ndarray, bias: np.ndarray) -> tuple:
            weight, bias = cls.calibrate(params, payload, weight, bias)
            return weight, bias + tau * offsets(cid)

        calibrates = cls.calibrates(params, payload)
        if tau or calibrates:
            rewrite_heads(learner, client_ids, after_training, keep_optimizer=not calibrates)
        return results

    evaluation_metrics: ClassVar[tuple[str, ...]] = (
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
        """The head's class-balanced accuracy on the client's validation slice
        (`balanced_accuracy`) and its accuracy on the proxy set's labelled validation slice
        (``data.proxy_validation_size``; NaN without one), public data drawn like the global
        test set: validation sets that can see what the logit adjustment changes."""
        data = learner.data
        public = learner.logits(client_ids, data.proxy_val_x) if len(data.proxy_val_y) else {}
        metrics = {}
        for cid in client_ids:
            client = data.clients[cid]
            val_logits = learner.logits([cid], client.x_val)[cid]
            scores = torch.as_tensor(public[cid]) if public else torch.empty(0)
            metrics[cid] = {
                "client_balanced_val_acc": balanced_accuracy(val_logits, client.y_val),
                "client_public_val_acc": accuracy(scores, data.proxy_val_y),
            }
        return metrics
