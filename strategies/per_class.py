"""Per-class knowledge without a proxy set: the shape FD and FedProto share.

Each client uploads per-class means of its outputs on its private training data (logits, or
embeddings of one width for every architecture) with per-class counts; the server averages
them per class, weighted by the counts, and sends the averages with the next training request;
each client then trains with a `fedkd.learner.loop.ClassRegulariser` pulling an example's output
towards its class's average. A subclass names its arrays, the space of its statistics and its
regulariser's weight.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from fedkd.knowledge.teachers import aggregate_per_class
from fedkd.learner.cohort import ClientResult
from fedkd.learner.loop import ClassRegulariser
from fedkd.learner.protocol import Learner
from strategies.base import Strategy, stack_uploads
from strategies.params import AlgorithmParams


class PerClassStrategy(Strategy):
    """Count-weighted per-class averages of the clients' per-class mean outputs.

    Parameters
    ----------
    **kwargs
        See `strategies.base.Strategy`; no proxy set and no server student are used.
    """

    # The space of the statistics and the regulariser: "logits" or "embeddings".
    space: ClassVar[str] = "logits"
    # Array names: a client's per-class means (and the server's averages, sent back under the
    # same name), the per-class counts, and which classes have an average.
    means_key: ClassVar[str] = "class_means"
    counts_key: ClassVar[str] = "class_counts"
    present_key: ClassVar[str] = "class_present"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.server_student = None
        self._means: np.ndarray | None = None
        self._present: np.ndarray | None = None

    @classmethod
    def regulariser_weight(cls, params: AlgorithmParams) -> float:
        """The regulariser's weight in the clients' local training (from the parameters)."""
        return 1.0

    def plan_local(self, round_num: int) -> dict[str, np.ndarray]:
        """The global per-class averages (C, D) and which classes have one (C,), once known."""
        if self._means is None:
            return {}
        return {
            self.means_key: self._means.astype(np.float32),
            self.present_key: self._present.astype(np.uint8),
        }

    def aggregate(self, round_num: int, updates: dict[int, ClientResult]) -> None:
        means, _ = stack_uploads(updates, self.means_key)
        counts, _ = stack_uploads(updates, self.counts_key)
        self._means = aggregate_per_class(means, counts).numpy()
        self._present = (counts.sum(dim=0) > 0).numpy()

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
        any), then the client's per-class means and counts."""
        regulariser = None
        if cls.means_key in payload:
            regulariser = ClassRegulariser(
                targets=torch.from_numpy(payload[cls.means_key]),
                present=torch.from_numpy(payload[cls.present_key].astype(bool)),
                weight=cls.regulariser_weight(params),
                space=cls.space,
            )
        results = learner.train_private(round_num, client_ids, regulariser)
        for cid, (means, counts) in learner.class_statistics(client_ids, cls.space).items():
            results[cid].arrays.update({cls.means_key: means, cls.counts_key: counts})
        return results
