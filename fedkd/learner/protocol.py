"""The learner interface an algorithm's client side is written against.

An algorithm (`strategies`) says what its clients compute and upload, and how they digest what
the server sends, in terms of these few batch operations over the client ids a node hosts. The
per-client reference loop (`fedkd.learner.cohort.CohortLearner`) and the vectorised learner
(`fedkd.learner.vectorised.VectorisedCohortLearner`) both implement it and compute the same
numbers up to float rounding, so an algorithm runs on either backend with no code of its own
for each. Every operation loads the clients' states and saves what it changes; client ids are
processed in the order given and results come back keyed by client id.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from fedkd.data.splits import FederatedData
from fedkd.learner.cohort import ClientResult
from fedkd.learner.loop import ClassRegulariser, GroupRegulariser


@runtime_checkable
class Learner(Protocol):
    """What a node's learner does for the clients it hosts.

    Attributes
    ----------
    data : FederatedData
        The run's data: a client's private slices, the public proxy set (its inputs are what
        algorithms pass as ``inputs``) and the global test set.
    """

    data: FederatedData

    def train_private(
        self,
        round_num: int,
        client_ids: list[int],
        regulariser: ClassRegulariser | None = None,
    ) -> dict[int, ClientResult]:
        """Train each client on its private data (DP-SGD where configured).

        Parameters
        ----------
        round_num : int
            The round (seeds each client's batches; selects the round's epochs).
        client_ids : list of int
            The clients.
        regulariser : ClassRegulariser or None, default None
            A per-class target regulariser added to the cross-entropy (not under DP-SGD).

        Returns
        -------
        dict of int to ClientResult
            Per client: metrics ``num_examples``, ``train_loss`` and the DP-SGD figures; no
            arrays (the algorithm adds its uploads).
        """
        ...

    def partner(self) -> Learner:
        """This learner on each client's partner model: a second model of the client's
        architecture, with its own initial weights and optimizers, kept in the client's own
        state beside its student (checkpointed with it, never sent anywhere). Every operation
        of the view (logits, distill, evaluate...) acts on the partners; the view's keep/kept
        and released histograms are the client's own."""
        ...

    def train_mutual(
        self, round_num: int, client_ids: list[int], weight: float, partner_weight: float
    ) -> dict[int, ClientResult]:
        """Train each client's student and its partner model (`partner`) together on its
        private data: deep mutual learning (Zhang et al., 2018).

        On each minibatch, the same for both (the batches `train_private` would draw), the
        student minimises cross-entropy plus `weight` times the KL divergence from the
        partner's detached softmax to its own, and the partner cross-entropy plus
        `partner_weight` times the KL divergence from the student's. Not under DP-SGD.

        Returns
        -------
        dict of int to ClientResult
            As `train_private`'s; ``train_loss`` is the student's.
        """
        ...

    def logits(self, client_ids: list[int], inputs: np.ndarray) -> dict[int, np.ndarray]:
        """Each client's ``(N, C)`` float32 logits on `inputs` (eval mode)."""
        ...

    def embeddings(self, client_ids: list[int], inputs: np.ndarray) -> dict[int, np.ndarray]:
        """Each client's ``(N, EMBEDDING_WIDTH)`` float32 embeddings on `inputs` (eval mode;
        `fedkd.models.zoo.EmbeddingOutput`: one width for every architecture)."""
        ...

    def class_statistics(
        self, client_ids: list[int], space: str
    ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Per-class means over each client's private training data, with the counts.

        Parameters
        ----------
        client_ids : list of int
            The clients.
        space : {"logits", "embeddings"}
            Mean of the logits ``(C, C)`` or of the embeddings ``(C, EMBEDDING_WIDTH)``.

        Returns
        -------
        dict of int to (ndarray, ndarray)
            Per client: the float32 means (rows of absent classes are zero) and the float32
            ``(C,)`` counts.
        """
        ...

    def distill(
        self,
        round_num: int,
        client_ids: list[int],
        inputs: np.ndarray,
        targets: np.ndarray,
        regulariser: GroupRegulariser | None = None,
    ) -> dict[int, ClientResult]:
        """Fit each client's logits on `inputs` to the target logits (the spec's distillation
        loss, temperature and steps), plus `regulariser`'s term on groups of inputs where one is
        given (batches of whole groups), plus the spec's private anchor where its weight is > 0
        (`fedkd.learner.loop.PrivateAnchor`: cross-entropy on the client's private examples). A
        client whose student turns non-finite keeps its state from before and reports
        ``digest_diverged``; the others report ``distill_loss``."""
        ...

    def get_weights(self, client_ids: list[int]) -> dict[int, dict[str, np.ndarray]]:
        """Each client's student weights by parameter name."""
        ...

    def set_weights(
        self,
        client_ids: list[int],
        weights: dict[str, np.ndarray],
        *,
        keep_optimizer: bool = False,
    ) -> None:
        """Load `weights` into every client's student, with a fresh private-training optimizer
        (momentum of the old weights does not carry over to new ones), or, with
        `keep_optimizer`, with the one it has (for weights that are the old ones moved by a
        shift the client takes off again before it trains, e.g. a head's logit adjustment)."""
        ...

    def keep(self, client_id: int, arrays: dict[str, np.ndarray]) -> None:
        """Keep `arrays` in the client's own state until it keeps others (its algorithm's
        memory across phases and rounds, e.g. its earlier outputs; never sent anywhere).
        Checkpointed with the client's state, so a resumed run finds them."""
        ...

    def kept(self, client_id: int) -> dict[str, np.ndarray]:
        """What the client last kept with `keep` ({} if nothing)."""
        ...

    def label_histogram(self, client_id: int) -> dict[str, np.ndarray]:
        """``{"label_histogram": counts}``, the client's released label histogram, where the
        run releases one ({} otherwise); drawn once per client and resent every round."""
        ...

    def shard_teacher_votes(
        self, round_num: int, client_ids: list[int], num_teachers: int, inputs: np.ndarray
    ) -> dict[int, ClientResult]:
        """Train each client's `num_teachers` teachers on disjoint shards of its private data
        (each example's shard a keyed hash of the example) and count their argmax votes on
        `inputs`: arrays ``votes`` ``(N, C)``, metrics ``num_examples`` and ``train_loss``."""
        ...

    def evaluate(self, client_ids: list[int], test_idx: np.ndarray) -> dict[int, ClientResult]:
        """Accuracy of each client's student on the global test subset, its local held-out
        slice and its validation slice, plus its test logits."""
        ...


__all__ = ["Learner"]
