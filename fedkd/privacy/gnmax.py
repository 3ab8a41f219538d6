"""(Confident-)GNMax as a mechanism object: PATE's release of labels from vote histograms.

The arithmetic lives in :mod:`fedkd.privacy.pate` (the noisy argmax, the threshold check and
their Rényi-DP curves); :class:`GNMax` holds the mechanism's parameters and gives an algorithm
that releases labels from summed votes the three things it needs: the release, the ledger event
of a batch of queries, and the planned worst case of a batch before any vote. Changing one
example changes one teacher's vote (the teachers' shards are disjoint), which is the
sensitivity both curves assume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedkd.privacy.ledger import PateQueryEvent, PrivacyEvent
from fedkd.privacy.noise import NoiseSource
from fedkd.privacy.pate import (
    confident_gnmax,
    gnmax_aggregate,
    pate_query_event,
    pate_worst_case_event,
)

__all__ = ["GNMax"]


@dataclass(frozen=True)
class GNMax:
    """GNMax on vote histograms, with Confident-GNMax's threshold check when ``threshold > 0``.

    Nothing to clip: each teacher casts one vote per query, so the vote histogram's
    sensitivity is fixed by the data's layout, not by its values.

    Parameters
    ----------
    sigma : float
        Noise std sigma2 of the noisy argmax, > 0.
    threshold : float, default 0.0
        T: a query is answered only if its noisy maximum vote reaches it; 0 = plain GNMax
        (every query answered, no threshold check).
    sigma_threshold : float, default 150.0
        Noise std sigma1 of the threshold check, > 0 (used only when ``threshold > 0``).
    """

    sigma: float
    threshold: float = 0.0
    sigma_threshold: float = 150.0

    def __post_init__(self) -> None:
        for name in ("sigma", "sigma_threshold"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if not (math.isfinite(self.threshold) and self.threshold >= 0):
            raise ValueError(f"threshold must be a finite number >= 0, got {self.threshold!r}")

    @property
    def confident(self) -> bool:
        """True when queries pass the threshold check first (Confident-GNMax)."""
        return self.threshold > 0

    def release(
        self, votes: torch.Tensor, noise: torch.Generator | NoiseSource
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Answer each query of `votes` (Q, C).

        Parameters
        ----------
        votes : Tensor, shape (Q, C)
            Vote counts summed over every contributing client's teachers.
        noise : torch.Generator or NoiseSource
            Where the noise comes from (`fedkd.privacy.noise`).

        Returns
        -------
        labels : Tensor, shape (Q,), long
            The released label of each answered query, -1 elsewhere.
        answered : Tensor, shape (Q,), bool
            Which queries were answered (all of them for plain GNMax).
        """
        if self.confident:
            return confident_gnmax(votes, self.threshold, self.sigma_threshold, self.sigma, noise)
        labels = gnmax_aggregate(votes, self.sigma, noise)
        return labels, torch.ones(len(labels), dtype=torch.bool)

    def event(self, votes: torch.Tensor, answered: torch.Tensor, round_num: int) -> PateQueryEvent:
        """The ledger event of the batch `votes` whose `answered` queries were released, for
        every contributing client (`pate_query_event`: the data-independent curve is the
        guarantee)."""
        if self.confident:
            return pate_query_event(
                votes, answered, self.sigma_threshold, self.sigma, round=round_num
            )
        return pate_query_event(votes, None, None, self.sigma, round=round_num)

    def planned_events(self, queries: int, round_num: int) -> list[PrivacyEvent]:
        """The most a batch of `queries` can charge a contributing client, known before any
        vote (`pate_worst_case_event`)."""
        sigma1 = self.sigma_threshold if self.confident else None
        return [pate_worst_case_event(queries, sigma1, self.sigma, round=round_num)]
