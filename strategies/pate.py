"""PATE: Private Aggregation of Teacher Ensembles (Papernot et al., 2017 and 2018).

Each client hosts teachers trained on disjoint shards of its private data and returns their
vote counts on the round's proxy queries. The server sums the votes and answers a query only
through (Confident-)GNMax: the noisy maximum vote must clear a threshold (noise sigma1), then
the label is the noisy argmax (noise sigma2). Only answered labels are released; the server
student learns from them, and optionally from its own confident predictions on the unanswered
inputs (self-training; post-processing, so free of privacy cost).

Privacy: a client's teachers learn from disjoint shards, each example's teacher fixed by the
example alone (`fedkd.privacy.teacher_shards`), so adding or removing one example of any client
changes one teacher's vote, and every contributing client is charged the same Renyi-DP curve
per batch of queries. The guarantee is the data-independent bound; the data-dependent bound of
Papernot et al. 2018 (Theorem 6 with Proposition 7) is reported beside it, not as a guarantee.
That charge is fixed by the number of queries before any vote, so the budget check plans each
round with it and cannot overshoot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedkd.learner.cohort import ClientResult
from fedkd.learner.protocol import Learner
from fedkd.privacy.gnmax import GNMax
from fedkd.privacy.ledger import PrivacyEvent
from strategies.base import BuildContext, Strategy, self_training_kwargs
from strategies.params import AlgorithmParams, Capabilities, SelfTrainingParams, check_positive


@dataclass
class PATEParams(SelfTrainingParams):
    """PATE's parameters: teachers per client (disjoint shards), the Confident-GNMax threshold
    (0 = plain GNMax), the noise of the threshold check and of the argmax, and the server
    student's self-training on unanswered inputs."""

    teachers_per_client: int = 1
    pate_threshold: float = 0.0
    pate_sigma_threshold: float = 150.0
    pate_sigma: float = 40.0

    def check(self) -> None:
        super().check()
        check_positive("teachers_per_client", self.teachers_per_client)
        check_positive("pate_threshold", self.pate_threshold, zero_ok=True)
        check_positive("pate_sigma_threshold", self.pate_sigma_threshold)
        check_positive("pate_sigma", self.pate_sigma)


class PATE(Strategy):
    """Confident-GNMax over the clients' teachers; a server student on the answered labels.

    Parameters
    ----------
    gnmax : GNMax or None, default None
        The mechanism that releases labels from the summed votes (`fedkd.privacy.gnmax`):
        Confident-GNMax with a threshold T on the noisy maximum vote (noise sigma1), then the
        noisy argmax (noise sigma2). None: plain GNMax with sigma2 = 40 (every query answered).
    **kwargs
        See `strategies.base.Strategy`; a ``server_student`` is required. Its
        ``self_training_confidence`` and ``self_training_iterations`` set the student's
        self-training on the unanswered inputs.

    Notes
    -----
    Each round the student restarts from its initial weights and learns every label released
    so far: pseudo-labels a weaker, earlier student got wrong are not carried into later rounds.
    """

    name = "pate"
    Params = PATEParams
    # Clients hold teacher ensembles, not one student; the teachers train outside DP-SGD and
    # the noisy votes are always a privacy mechanism.
    capabilities = Capabilities(
        client_students=False,
        needs_proxy=True,
        server_student="required",
        supports_dpsgd=False,
        always_private=True,
    )

    def __init__(
        self,
        *args,
        gnmax: GNMax | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        if self.server_student is None:
            raise ValueError("pate needs a server student (spec: server.student)")
        self.gnmax = gnmax if gnmax is not None else GNMax(sigma=40.0)
        # Released label per proxy input (-1: never answered).
        self.labels = np.full(len(self.data.proxy_x), -1, dtype=np.int64)
        self.queries = 0
        self.pseudo_labelled = 0  # unanswered inputs the student labelled itself (last fit)

    @classmethod
    def init_kwargs(cls, params: AlgorithmParams, context: BuildContext) -> dict[str, Any]:
        assert isinstance(params, PATEParams)
        return {
            **super().init_kwargs(params, context),
            **self_training_kwargs(params),
            "gnmax": GNMax(
                sigma=params.pate_sigma,
                threshold=params.pate_threshold,
                sigma_threshold=params.pate_sigma_threshold,
            ),
        }

    def plan_local(self, round_num: int) -> dict[str, np.ndarray]:
        """The round's proxy queries."""
        self._proxy_idx = self._sample_proxy(round_num)
        return {"proxy_idx": self._proxy_idx.astype(np.int32)}

    @classmethod
    def client_round(
        cls,
        params: AlgorithmParams,
        learner: Learner,
        round_num: int,
        client_ids: list[int],
        payload: dict[str, np.ndarray],
    ) -> dict[int, ClientResult]:
        """Each client's teachers train on disjoint shards of its data (the learner's
        `shard_teacher_votes`, which keeps them as the client's state) and upload their vote
        counts on the queries (arrays ``votes``)."""
        assert isinstance(params, PATEParams)
        inputs = learner.data.proxy_x[payload["proxy_idx"].astype(np.int64)]
        return learner.shard_teacher_votes(
            round_num, client_ids, params.teachers_per_client, inputs
        )

    def planned_release_events(self, round_num: int) -> list[PrivacyEvent]:
        """The data-independent charge of the round's queries, known before any vote."""
        return self.gnmax.planned_events(len(self._sample_proxy(round_num)), round_num)

    def aggregate(self, round_num: int, updates: dict[int, ClientResult]) -> None:
        votes = torch.from_numpy(sum(updates[c].arrays["votes"] for c in sorted(updates)))
        labels, answered = self.gnmax.release(votes, self._noise(round_num, 3))
        event = self.gnmax.event(votes, answered, round_num)
        self._release_events = {cid: [event] for cid in updates}
        answered_np = answered.numpy().astype(bool)
        self.labels[self._proxy_idx[answered_np]] = labels.numpy()[answered_np]
        self.queries += len(self._proxy_idx)
        self._fit_student(round_num)

    def _fit_student(self, round_num: int) -> None:
        """From initial weights on every label released so far, with self-training on the
        unanswered inputs."""
        pseudo_labelled = self._fit_proxy_labels(round_num, self.labels)
        if pseudo_labelled is not None:
            self.pseudo_labelled = pseudo_labelled

    @property
    def answered(self) -> int:
        return int((self.labels >= 0).sum())

    def round_metrics(self) -> dict[str, float]:
        return {
            "pate_answered": float(self.answered),
            "pate_queries": float(self.queries),
            "pate_pseudo_labelled": float(self.pseudo_labelled),
            # Diagnostic only (the proxy's true labels never reach the student).
            "pate_label_acc": self._proxy_label_accuracy(self.labels),
        }
