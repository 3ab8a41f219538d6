"""Gaussian release of a client's label histogram (its number of examples per class).

The class-weighted teacher (`fedkd.knowledge.teachers.class_weighted_probs`) takes each class's
probability from the clients that hold that class, so the server needs every client's label
histogram. The counts are private: adding or removing one example changes one count by 1, so
the histogram has L2 sensitivity 1 under the add-or-remove-one-example relation of the ledger,
and Gaussian noise of std ``noise_std`` per count is a Gaussian mechanism with noise multiplier
``noise_std``.

A client draws its noisy histogram once and releases the *same* one every round (seeded noise
is seeded by run and client only, not by round; secure noise is drawn once and kept in the
client's state): sending a released value again is post-processing, and the server charges the
release once, the first time it receives it.

:class:`LabelHistogramRelease` is the mechanism as an object: the client releases through
:meth:`~LabelHistogramRelease.release`, the server asks :meth:`~LabelHistogramRelease.charges`
what a received histogram costs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fedkd.privacy.ledger import GaussianReleaseEvent, PrivacyEvent
from fedkd.privacy.noise import NoiseSource, as_noise_source

__all__ = ["LabelHistogramRelease", "label_histogram_event", "released_label_histogram"]


def released_label_histogram(
    labels: np.ndarray,
    num_classes: int,
    noise_std: float,
    generator: torch.Generator | NoiseSource,
) -> np.ndarray:
    """The client's count per class plus N(0, noise_std^2) noise on each (0: exact counts).

    Parameters
    ----------
    labels : np.ndarray
        The client's private training labels, ints in ``[0, num_classes)``.
    num_classes : int
        Number of classes C.
    noise_std : float
        Noise std per count, >= 0 (the noise multiplier: the sensitivity is 1).
    generator : torch.Generator or NoiseSource
        Source of the noise (a generator: seeded noise, see :mod:`fedkd.privacy.noise`);
        draw it once per client, not per round (module docstring).

    Returns
    -------
    np.ndarray
        Shape ``(C,)``, float32; noisy counts can be negative.
    """
    if not (math.isfinite(noise_std) and noise_std >= 0):
        raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std!r}")
    counts = torch.from_numpy(np.bincount(np.asarray(labels), minlength=num_classes)).float()
    if len(counts) != num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got max {int(labels.max())}")
    if noise_std > 0:
        counts = counts + noise_std * as_noise_source(generator).normal(num_classes)
    return counts.numpy().astype(np.float32)


def label_histogram_event(noise_std: float, round_num: int = 0) -> GaussianReleaseEvent:
    """The ledger event of one histogram release: sensitivity 1, so multiplier = noise std."""
    return GaussianReleaseEvent(noise_multiplier=noise_std, count=1, round=round_num)


@dataclass(frozen=True)
class LabelHistogramRelease:
    """The Gaussian mechanism on a client's label histogram (the spec's
    ``privacy.histogram_noise``, for the teachers that weight clients by class).

    Nothing to clip: one example changes one count by 1, so the sensitivity is 1 whatever the
    data. ``noise_std = 0`` releases exact counts, which a run may do only when it claims no
    privacy (the spec check refuses it otherwise), and is charged nothing.

    Parameters
    ----------
    noise_std : float
        Noise std per count, >= 0 (the noise multiplier).
    """

    noise_std: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_std) and self.noise_std >= 0):
            raise ValueError(f"noise_std must be a finite number >= 0, got {self.noise_std!r}")

    def release(
        self, labels: np.ndarray, num_classes: int, noise: torch.Generator | NoiseSource
    ) -> np.ndarray:
        """The client's noisy count per class (`released_label_histogram`); draw it once per
        client and resend it (module docstring)."""
        return released_label_histogram(labels, num_classes, self.noise_std, noise)

    def event(self, round_num: int = 0) -> GaussianReleaseEvent:
        """The ledger event of one release."""
        return label_histogram_event(self.noise_std, round_num)

    def planned_events(self, round_num: int) -> list[PrivacyEvent]:
        """The most a client's first release costs (nothing for exact counts); resending it
        later costs nothing, so the budget plans it once, before the client's first round."""
        return [self.event(round_num)] if self.noise_std > 0 else []

    def charges(
        self, round_num: int, received: np.ndarray, before: np.ndarray | None
    ) -> list[PrivacyEvent]:
        """What the server charges a client for the histogram it `received`: one event the
        first time, and for one that differs from the one it sent `before` (a client that lost
        its state redraws its noise: a new release); a resent one is free, and so are exact
        counts."""
        if self.noise_std == 0 or (before is not None and np.array_equal(received, before)):
            return []
        return [self.event(round_num)]
