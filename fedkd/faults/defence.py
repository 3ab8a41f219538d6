"""A history-based defence of a logit teacher, in the spirit of ExpGuard (Roux et al., 2025).

Each round, every upload is compared with a robust consensus, the coordinate-wise median of
the round's uploads: its distance is the mean total-variation distance between its softmax and
the consensus's over the round's inputs, relative to the median distance of the round (so that
1 is a typical client, whatever the heterogeneity of the data). A client's score is this
relative distance accumulated over the rounds it took part in with exponential decay. A client
whose score is above the threshold is rejected; any other client above 1 is down-weighted:
its upload is pulled towards the consensus, ``w * upload + (1 - w) * consensus`` with
``w = 1 / score``, which works the same under any teacher (mean, ERA, median, trimmed mean).
An honest client that differs for a round is forgiven as its score decays; a client that
attacks every round stays above the threshold.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

DEFENCES: tuple[str, ...] = ("none", "history")


@dataclass
class Screening:
    """One round's verdicts: the uploads to keep (some pulled towards the consensus), the
    rejected clients, the down-weighted ones with their weights, and every client's score."""

    kept: dict[int, np.ndarray] = field(default_factory=dict)
    rejected: list[int] = field(default_factory=list)
    weights: dict[int, float] = field(default_factory=dict)
    scores: dict[int, float] = field(default_factory=dict)


def _cosine_distance(stacked: np.ndarray, consensus: np.ndarray) -> np.ndarray:
    """Per client, the mean over inputs of ``(1 - cos) / 2`` between its centred logits and
    the consensus's: 0 for the same ranking of the classes, 1 for the reverse, whatever the
    scale (a weak student's logits are close to uniform, yet ranked)."""
    a = stacked - stacked.mean(axis=-1, keepdims=True)
    b = consensus - consensus.mean(axis=-1, keepdims=True)
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    cos = (a * b).sum(axis=-1) / np.where(norms > 0, norms, 1.0)
    return ((1 - cos) / 2).mean(axis=-1)


class HistoryDefence:
    """Per-client scores from each upload's distance to the median consensus, over rounds.

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
            The kept uploads (those down-weighted, pulled towards the consensus), the rejected
            clients and the scores after this round.
        """
        ids = sorted(uploads)
        if not ids:
            return Screening()
        stacked = np.stack([uploads[c] for c in ids]).astype(np.float64)
        consensus = np.median(stacked, axis=0)
        distance = _cosine_distance(stacked, consensus)
        typical = float(np.median(distance))
        relative = distance / typical if typical > 0 else np.ones_like(distance)
        out = Screening()
        for cid, rel in zip(ids, relative, strict=True):
            before = self.scores.get(cid)
            score = float(rel) if before is None else self.decay * before + (1 - self.decay) * rel
            self.scores[cid] = out.scores[cid] = float(score)
            if score > self.threshold:
                out.rejected.append(cid)
                continue
            weight = min(1.0, 1.0 / score) if score > 0 else 1.0
            upload = uploads[cid]
            if weight < 1.0:
                out.weights[cid] = weight
                upload = (weight * upload + (1 - weight) * consensus).astype(upload.dtype)
            out.kept[cid] = upload
        return out
