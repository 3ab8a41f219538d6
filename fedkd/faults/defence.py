"""A history-based defence of a logit teacher, in the spirit of ExpGuard (Roux et al., 2025).

Each round, every upload is compared with a consensus: the argmax of the mean of the round's
softmax probabilities, in which no client moves any input's prediction by more than its share
(the bounded prediction space that makes distillation resilient), and which, unlike a
coordinate-wise median, still finds a class that only a few clients hold under label skew. A
client's distance is one minus its recall of the classes it predicts (`disagreement`): under
label skew an honest client predicts its few classes everywhere, but recalls them; a client
that inverts, relabels or randomises its predictions does not. The distance is divided by the
round's median distance, so that 1 is a typical client whatever the data's heterogeneity, and
accumulated over the rounds a client takes part in with exponential decay into its score. A
client whose score is above the threshold is rejected; any other client above 1 is
down-weighted by ``1 / score`` in the teacher's client weights. An honest client that differs
for a round is forgiven as its score decays; one that attacks every round stays above the
threshold. A client that predicts one class everywhere recalls it fully and is not caught.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

DEFENCES: tuple[str, ...] = ("none", "history")


@dataclass
class Screening:
    """One round's verdicts: the rejected clients, the down-weighted ones with their weight
    (in (0, 1)), and every client's score after the round."""

    rejected: list[int] = field(default_factory=list)
    weights: dict[int, float] = field(default_factory=dict)
    scores: dict[int, float] = field(default_factory=dict)


def _probs(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def disagreement(stacked: np.ndarray) -> np.ndarray:
    """Per client, one minus the recall of the classes it predicts, against the consensus.

    The consensus labels each input with the argmax of the clients' mean probabilities. A
    client's recall of class c is the share of the inputs the consensus labels c that the
    client labels c too; its agreement is the mean of its recalls weighted by how often it
    predicts each class. Under label skew an honest client predicts the few classes it holds,
    on every input, and recalls those well; a client that attacks them does not.

    Parameters
    ----------
    stacked : np.ndarray
        The clients' logits, shape ``(K, N, C)``.

    Returns
    -------
    np.ndarray
        Shape ``(K,)``, in [0, 1]: 0 recalls every class it predicts, 1 none.
    """
    num_classes = stacked.shape[-1]
    consensus = _probs(stacked.astype(np.float64)).mean(axis=0).argmax(axis=-1)  # (N,)
    labelled = np.bincount(consensus, minlength=num_classes)  # (C,)
    predicted = stacked.argmax(axis=-1)  # (K, N)
    out = np.empty(len(stacked))
    for k, pred in enumerate(predicted):
        hits = np.bincount(pred[pred == consensus], minlength=num_classes)
        counts = np.bincount(pred, minlength=num_classes) * (labelled > 0)
        recall = hits / np.maximum(labelled, 1)
        out[k] = 1 - (counts * recall).sum() / counts.sum() if counts.sum() else 1.0
    return out


class HistoryDefence:
    """Per-client scores from each upload's disagreement with the consensus, over rounds.

    Parameters
    ----------
    decay : float, default 0.5
        Weight of a client's past score in [0, 1) against this round's relative distance (0:
        no memory).
    threshold : float, default 2.0
        A client whose score is above this (in typical-client distances, > 1) is rejected.
    """

    def __init__(self, decay: float = 0.5, threshold: float = 2.0) -> None:
        self.decay = decay
        self.threshold = threshold
        self.scores: dict[int, float] = {}

    def screen(self, uploads: dict[int, np.ndarray]) -> Screening:
        """Score this round's `uploads` ({client: logits (N, C)}) and screen them.

        Parameters
        ----------
        uploads : dict of int to np.ndarray
            Every client's upload this round, all of one shape.

        Returns
        -------
        Screening
            The rejected and down-weighted clients, and the scores after this round.
        """
        ids = sorted(uploads)
        if not ids:
            return Screening()
        distance = disagreement(np.stack([uploads[c] for c in ids]))
        typical = float(np.median(distance))
        relative = distance / typical if typical > 0 else np.where(distance > 0, np.inf, 1.0)
        out = Screening()
        for cid, rel in zip(ids, relative, strict=True):
            before = self.scores.get(cid)
            score = float(rel) if before is None else self.decay * before + (1 - self.decay) * rel
            self.scores[cid] = out.scores[cid] = float(score)
            if score > self.threshold:
                out.rejected.append(cid)
            elif score > 1:
                out.weights[cid] = 1.0 / score
        return out
