"""Relational knowledge distillation: logits and the similarity structure between proxy inputs.

Relation-based knowledge (Park et al., "Relational knowledge distillation", CVPR 2019) in a
federation. The round's proxy inputs are cut into consecutive relation batches of
``relation_batch`` inputs (the server samples whole batches). Each client uploads its logits on
them, as DS-FL and FedDF do, and per relation batch the cosine similarities of its outputs (the
Gram matrix of its L2-normalised embeddings, or logits: ``relation_space``): a symmetric
``b x b`` matrix with a unit diagonal, so only its ``b (b - 1) / 2`` entries above the diagonal
are sent. It says which inputs the client puts near each other, not where, so it does not
depend on the architecture or on the orientation of its embedding space. The server builds the
logit teacher as the logit algorithms do (``teacher``, default the count-weighted mean of the
logits) and aggregates the similarity matrices entry by entry (``relation_aggregate``: the
count-weighted mean, or the median as the robust option). The mean of Gram matrices of unit
vectors is itself the Gram matrix of unit vectors (each client's, scaled by the square root of
its weight and concatenated), so distances and angles read off it are those of a real point set.

Clients distill towards the teacher's logits (the spec's distillation loss at
``distill.temperature``) and, on batches made of whole relation batches, towards the relations:
RKD's distance-wise term (pairwise distances divided by their mean) weighted by
``distance_weight`` and angle-wise term (the cosine of the angle at every point of every
triplet) weighted by ``angle_weight``, both Huber losses between the potentials of the client's
own unit-normalised outputs and those of the aggregated Gram matrix.

Bytes: logits are ``N x C`` floats per client and round, relations ``N (b - 1) / 2``: they stay
within the logits' (DS-FL's) budget for ``b <= 2 C + 1``.

Privacy: the relations, like the logits, are functions of the student on public inputs: under
DP-SGD they are post-processing, without it they are unprotected releases. The Gaussian teacher
release would protect the logit teacher only, so it is not offered.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fedkd.knowledge.teachers import mean_logits, median_logits
from fedkd.learner.cohort import ClientResult
from fedkd.learner.generator import payload_proxy_inputs
from fedkd.learner.loop import PHASE_SAMPLE, REGULARISER_SPACES, GroupRegulariser, derive_seed
from fedkd.learner.protocol import Learner
from strategies.base import BuildContext, LogitTeacherStrategy, stack_uploads
from strategies.params import (
    AlgorithmParams,
    Capabilities,
    ParamError,
    TeacherParams,
    check_one_of,
    check_positive,
)

RELATION_AGGREGATES = ("mean", "median")
# An output shorter than this fraction of its batch's mean output norm, or than NORM_FLOOR,
# is divided by that floor instead of its norm: a point near the origin, not a direction.
# The direction of a (nearly) all-zero embedding, a dead ReLU layer's on some inputs, is noise,
# and normalising it to unit length multiplies its gradient by 1 / norm.
RELATIVE_NORM_FLOOR = 0.01
NORM_FLOOR = 1e-3
# Unit vectors whose squared distance is below this (about 0.6 degrees apart) count as one
# point: their distance is taken as its square root and no angle is read at them. An angle's
# cosine read off a Gram matrix divides a difference of inner products, whose float32 rounding
# is about 1e-7, by the product of two distances, so near-duplicate outputs gave cosines far
# outside [-1, 1] and gradients up to 1 / (distance * distance); above the floor the rounding
# moves a cosine by at most about 1e-3. Healthy outputs (no pair this close, no output this
# short) get the same potentials, bit for bit, as without these floors.
COINCIDENT = 1e-4


@dataclass
class RelationParams(TeacherParams):
    """The relational algorithm's parameters: the logit teacher's, and the relations'."""

    # Proxy inputs per similarity matrix (b); the round's proxy inputs are whole batches.
    relation_batch: int = 20
    # Whose cosine similarities: the shared-width embedding, or the logits.
    relation_space: str = "embeddings"
    # How the server combines the clients' similarity matrices, entry by entry.
    relation_aggregate: str = "mean"
    # Weights of RKD's distance-wise and angle-wise terms in the clients' distillation (in
    # Park et al.'s ratio, 1 to 2; the scale chosen on the quickstart's client validation).
    distance_weight: float = 5.0
    angle_weight: float = 10.0

    def check(self) -> None:
        super().check()
        if self.relation_batch < 3:
            raise ParamError(
                f"relation_batch: must be >= 3 (an angle needs three inputs), "
                f"got {self.relation_batch}"
            )
        check_one_of("relation_space", self.relation_space, REGULARISER_SPACES)
        check_one_of("relation_aggregate", self.relation_aggregate, RELATION_AGGREGATES)
        check_positive("distance_weight", self.distance_weight, zero_ok=True)
        check_positive("angle_weight", self.angle_weight, zero_ok=True)
        if self.self_distill_weight > 0:
            raise ParamError(
                "self_distill_weight: relation's clients distill the teacher together with "
                "the relations, without their earlier logits; leave it 0"
            )
        if self.mutual_weight > 0:
            raise ParamError(
                "mutual_weight: relation's clients upload and digest with their own student; "
                "mutual learning with a meme model is not built for it, leave it 0"
            )


def similarity_matrices(outputs: Tensor) -> Tensor:
    """Cosine similarities ``(..., b, b)`` between the rows of ``outputs`` ``(..., b, D)``: the
    Gram matrix of the L2-normalised rows (rows far shorter than the others' mean norm are
    divided by a floor instead: `RELATIVE_NORM_FLOOR`)."""
    norms = outputs.norm(dim=-1, keepdim=True)
    floor = (RELATIVE_NORM_FLOOR * norms.detach().mean(dim=-2, keepdim=True)).clamp(min=NORM_FLOOR)
    unit = outputs / torch.maximum(norms, floor)
    return unit @ unit.transpose(-1, -2)


def pack_upper(matrices: Tensor) -> Tensor:
    """The entries above the diagonal ``(..., b (b - 1) / 2)`` of ``(..., b, b)`` matrices,
    row by row."""
    b = matrices.shape[-1]
    rows, cols = torch.triu_indices(b, b, offset=1)
    return matrices[..., rows, cols]


def unpack_similarities(packed: Tensor, b: int) -> Tensor:
    """The symmetric ``(..., b, b)`` matrices with a unit diagonal whose entries above it are
    ``packed`` (`pack_upper`'s inverse for similarity matrices)."""
    rows, cols = torch.triu_indices(b, b, offset=1)
    matrices = torch.zeros((*packed.shape[:-1], b, b), dtype=packed.dtype)
    matrices[..., rows, cols] = packed
    matrices[..., cols, rows] = packed
    return matrices + torch.eye(b, dtype=packed.dtype)


def relation_potentials(gram: Tensor) -> tuple[Tensor, Tensor]:
    """RKD's distance-wise and angle-wise potentials of the points with Gram matrix ``gram``.

    Parameters
    ----------
    gram : Tensor
        ``(..., b, b)`` inner products of b points.

    Returns
    -------
    distances : Tensor
        ``(..., b, b)``: the Euclidean distance of every pair divided by the mean distance over
        the pairs of distinct points (0 on the diagonal; at least ``sqrt(COINCIDENT)`` before
        the division).
    angles : Tensor
        ``(..., b, b, b)``: ``[j, i, k]`` the cosine of the angle at point j between points i
        and k (0 where i or k is j or coincides with it: `COINCIDENT`).

    Notes
    -----
    Written for ``torch.func.vmap`` (no data-dependent shapes or branches).
    """
    b = gram.shape[-1]
    diag = gram.diagonal(dim1=-2, dim2=-1)
    other = 1.0 - torch.eye(b, dtype=gram.dtype, device=gram.device)
    squared = diag[..., :, None] + diag[..., None, :] - 2.0 * gram
    # Distances of (nearly) coincident points are held at the floor's root, so the gradient
    # of the root is bounded and the mean distance is never below it.
    dist = squared.clamp(min=COINCIDENT).sqrt() * other
    mean = dist.sum(dim=(-2, -1), keepdim=True) / (b * (b - 1))
    distances = dist / mean
    # <x_i - x_j, x_k - x_j> from inner products, at [j, i, k].
    inner = gram[..., None, :, :] - gram[..., :, :, None] - gram[..., :, None, :]
    inner = inner + diag[..., :, None, None]
    apart = torch.where(squared >= COINCIDENT, other, 0.0)
    valid = apart[..., :, :, None] * apart[..., :, None, :]
    norms = dist[..., :, :, None] * dist[..., :, None, :]
    angles = inner / torch.where(valid > 0, norms, 1.0) * valid
    return distances, angles


def relational_loss(
    outputs: Tensor, target_rows: Tensor, distance_weight: float, angle_weight: float
) -> Tensor:
    """RKD's loss between a student's outputs and target similarity matrices.

    Parameters
    ----------
    outputs : Tensor
        ``(G, b, D)``: the student's outputs on G relation batches.
    target_rows : Tensor
        ``(G, b, b)``: the target similarity matrices (Gram matrices of unit vectors).
    distance_weight, angle_weight : float
        Weights of the Huber losses between the distance-wise and the angle-wise potentials.

    Returns
    -------
    Tensor
        Scalar.
    """
    own_distances, own_angles = relation_potentials(similarity_matrices(outputs))
    distances, angles = relation_potentials(target_rows)
    return distance_weight * F.smooth_l1_loss(
        own_distances, distances
    ) + angle_weight * F.smooth_l1_loss(own_angles, angles)


def aggregate_relations(relations: Tensor, weights: Tensor, kind: str) -> Tensor:
    """The clients' packed similarities ``(K, B, P)`` combined entry by entry into ``(B, P)``:
    ``"mean"`` weighted by `weights` ``(K,)``, or the unweighted ``"median"``."""
    if kind == "median":
        return median_logits(relations)
    return mean_logits(relations, weights)


class Relation(LogitTeacherStrategy):
    """Logit teacher plus aggregated similarity structure, distilled with RKD.

    Parameters
    ----------
    relation_batch : int, default 20
        Proxy inputs per similarity matrix; each round's proxy inputs are the first whole
        relation batches of the base sample.
    relation_aggregate : {"mean", "median"}, default "mean"
        How the clients' similarity matrices are combined.
    teacher : str, default "mean_logits"
        The logit teacher (`strategies.params.TeacherParams`).
    **kwargs
        See `strategies.base.Strategy`.
    """

    name = "relation"
    Params = RelationParams
    capabilities = Capabilities(
        uploads=("logits", "relations"), needs_proxy=True, logit_teacher=True
    )

    def __init__(
        self,
        *args,
        relation_batch: int = 20,
        relation_aggregate: str = "mean",
        teacher: str = "mean_logits",
        **kwargs,
    ) -> None:
        super().__init__(*args, teacher=teacher, **kwargs)
        self.relation_batch = relation_batch
        self.relation_aggregate = relation_aggregate
        sent = len(super()._sample_proxy(1))
        if relation_batch > sent:
            raise ParamError(
                f"relation_batch: {relation_batch} is more than the {sent} proxy inputs a "
                "round sends; lower it or raise distill.proxy_per_round"
            )
        self._relations: np.ndarray | None = None

    @classmethod
    def init_kwargs(cls, params: AlgorithmParams, context: BuildContext) -> dict[str, Any]:
        assert isinstance(params, RelationParams)
        return {
            **super().init_kwargs(params, context),
            "relation_batch": params.relation_batch,
            "relation_aggregate": params.relation_aggregate,
        }

    def _sample_proxy(self, round_num: int) -> np.ndarray:
        """The base sample in an order drawn per round, cut to whole relation batches
        (consecutive inputs of it): every round relates other inputs, even where it sends the
        whole proxy set."""
        sample = super()._sample_proxy(round_num)
        rng = np.random.default_rng(derive_seed(self.seed, round_num, PHASE_SAMPLE, 4))
        return rng.permutation(sample)[: len(sample) // self.relation_batch * self.relation_batch]

    def aggregate(self, round_num: int, updates: dict[int, ClientResult]) -> None:
        """The logit teacher, and the clients' similarities combined entry by entry."""
        super().aggregate(round_num, updates)
        relations, weights = stack_uploads(updates, "relations")
        self._relations = aggregate_relations(relations, weights, self.relation_aggregate).numpy()

    def digest_payload(self, round_num: int) -> dict[str, np.ndarray] | None:
        """The teacher's payload and the aggregated packed similarities ``(B, P)``."""
        payload = super().digest_payload(round_num)
        if payload is None or self._relations is None:
            return payload
        return {**payload, "relations": self._relations.astype(np.float32)}

    @classmethod
    def client_round(
        cls,
        params: AlgorithmParams,
        learner: Learner,
        round_num: int,
        client_ids: list[int],
        payload: dict[str, np.ndarray],
    ) -> dict[int, ClientResult]:
        """Private training, the logits on the round's proxy inputs and, per relation batch,
        the packed cosine similarities of the client's outputs ``(B, b (b - 1) / 2)``."""
        assert isinstance(params, RelationParams)
        results = super().client_round(params, learner, round_num, client_ids, payload)
        b = params.relation_batch
        if params.relation_space == "logits":
            outputs = {cid: results[cid].arrays["logits"] for cid in client_ids}
        else:
            outputs = learner.embeddings(client_ids, payload_proxy_inputs(learner.data, payload))
        for cid, out in outputs.items():
            batches = torch.from_numpy(out).reshape(-1, b, out.shape[-1])
            packed = pack_upper(similarity_matrices(batches))
            results[cid].arrays["relations"] = packed.numpy().astype(np.float32)
        return results

    @classmethod
    def client_digest(
        cls,
        params: AlgorithmParams,
        learner: Learner,
        round_num: int,
        client_ids: list[int],
        payload: dict[str, np.ndarray],
    ) -> dict[int, ClientResult]:
        """Distill towards the teacher's logits and, on whole relation batches, towards the
        aggregated similarities (RKD's distance and angle terms)."""
        assert isinstance(params, RelationParams)
        inputs = payload_proxy_inputs(learner.data, payload)
        b = params.relation_batch
        matrices = unpack_similarities(torch.from_numpy(payload["relations"]), b)
        regulariser = GroupRegulariser(
            group_size=b,
            targets=matrices.reshape(-1, b),  # row r: input r's similarities in its batch
            loss=functools.partial(
                relational_loss,
                distance_weight=params.distance_weight,
                angle_weight=params.angle_weight,
            ),
            space=params.relation_space,
        )
        return learner.distill(
            round_num, client_ids, inputs, payload["teacher_logits"], regulariser
        )

    def round_metrics(self) -> dict[str, float]:
        """The teacher's proxy accuracy, and the mean aggregated similarity of distinct inputs."""
        metrics = super().round_metrics()
        if self._relations is not None:
            metrics["relation_mean_similarity"] = float(self._relations.mean())
        return metrics
