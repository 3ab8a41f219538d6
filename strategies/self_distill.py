"""Client-side self-distillation: a client's own earlier model as a second teacher.

Before its local training in a round, a client computes its logits on the round's proxy
inputs with the model it holds then (its model from the end of its previous round) and keeps
them in its own state (`fedkd.learner.protocol.Learner.keep`: never uploaded, checkpointed with
the client). When it digests the round's teacher on those inputs, it distills towards
``(1 - w) * teacher + w * earlier`` with ``w`` the algorithm's ``self_distill_weight``: a mix of
logits, which under the KL loss is the normalised geometric mean of the two teachers' softened
distributions and under ``mae``/``mse`` the weighted mean of their logits. The earlier model
holds the client on what it knew before this round's local training moved it (the
self-distillation family of schemes; under label skew, the knowledge of its own classes the
federation's teacher may not carry).

Numbers: each client's target differs, so the clients distill one at a time (on both
learners; each client's computation is independent, so the numbers are the same).
"""

from __future__ import annotations

import numpy as np

from fedkd.learner.cohort import ClientResult
from fedkd.learner.protocol import Learner


def keep_earlier_logits(
    learner: Learner,
    round_num: int,
    client_ids: list[int],
    proxy_idx: np.ndarray,
    inputs: np.ndarray,
) -> None:
    """Each client keeps its current model's logits on the round's proxy inputs `inputs`
    (call before its local training), with the round and the inputs' indices they belong to."""
    idx = np.asarray(proxy_idx, dtype=np.int64)
    for cid, logits in learner.logits(client_ids, inputs).items():
        learner.keep(cid, {"round": np.array([round_num]), "proxy_idx": idx, "logits": logits})


def distill_with_earlier_self(
    learner: Learner,
    round_num: int,
    client_ids: list[int],
    proxy_idx: np.ndarray,
    inputs: np.ndarray,
    teacher_logits: np.ndarray,
    weight: float,
) -> dict[int, ClientResult]:
    """Each client distills on the proxy inputs towards the teacher mixed with the logits it
    kept for this round (`keep_earlier_logits`); a client that kept none for these inputs
    distills towards the teacher alone.

    Parameters
    ----------
    learner : Learner
        The node's learner.
    round_num : int
        The round whose teacher is digested.
    client_ids : list of int
        The digesting clients.
    proxy_idx : ndarray
        The round's proxy inputs (indices into the proxy set).
    inputs : ndarray
        Those inputs.
    teacher_logits : ndarray
        The teacher, ``(N, C)``.
    weight : float
        The earlier model's share ``w`` in ``[0, 1)``.

    Returns
    -------
    dict of int to ClientResult
        As `Learner.distill`'s.
    """
    idx = np.asarray(proxy_idx, dtype=np.int64)
    results: dict[int, ClientResult] = {}
    for cid in client_ids:
        kept = learner.kept(cid)
        target = teacher_logits
        if kept and int(kept["round"][0]) == round_num and np.array_equal(kept["proxy_idx"], idx):
            target = ((1.0 - weight) * teacher_logits + weight * kept["logits"]).astype(np.float32)
        results.update(learner.distill(round_num, [cid], inputs, target))
    return results
