"""Client-level Gaussian mechanism on the aggregated teacher.

Each participating client's whole (N, C) probability matrix on the proxy subset is clipped to
Frobenius norm ``clip_norm``, the clipped matrices are summed, and Gaussian noise of std
``noise_multiplier * clip_norm`` is added once per coordinate. Only the noisy sum (or its
post-processing, the teacher) leaves the server.

Sensitivity, and what goes in the ledger
----------------------------------------
Each client's epsilon in fedkd protects the examples of that client (the unit of DP-SGD), so
the release must be charged under the add-or-remove-one-*example* relation. Changing one
example of client k can move k's clipped matrix anywhere in the clip ball, but the matrices
are probabilities, hence non-negative, so two of them have a non-negative inner product and
``||P - P'||_F^2 <= ||P||^2 + ||P'||^2 <= 2 clip^2``: the L2 sensitivity is ``sqrt(2) clip``
and the sensitivity-normalised noise multiplier for the ledger is ``noise_multiplier / sqrt(2)``.
Under *client-level* add/remove (the whole client joins or leaves) the sensitivity is ``clip``
and the ledger multiplier is ``noise_multiplier``. :func:`gaussian_release_event` builds the
event for either unit. (When a client also trains with DP-SGD its predictions are already
post-processing of a DP model; charging the release on top is conservative.)

:class:`GaussianRelease` is the mechanism as an object: its parameters, the clip, the noise and
the ledger event, for any algorithm that releases a sum or mean of per-client probabilities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

from fedkd.privacy.ledger import GaussianReleaseEvent, PrivacyEvent
from fedkd.privacy.noise import NoiseSource, as_noise_source

__all__ = [
    "GaussianRelease",
    "PrivateTeacher",
    "clip_l2",
    "gaussian_release_event",
    "private_mean_teacher",
    "private_sum_of_probabilities",
    "release_sensitivity",
]

PrivacyUnit = Literal["example", "client"]


class PrivateTeacher(NamedTuple):
    """A noisy teacher: probabilities and the matching logits (log-probabilities)."""

    probs: torch.Tensor
    logits: torch.Tensor


def _check_release_args(client_probs: torch.Tensor, clip_norm: float, noise: float) -> None:
    if client_probs.ndim != 3:
        raise ValueError(f"client_probs must have shape (K, N, C), got {tuple(client_probs.shape)}")
    if client_probs.shape[0] == 0:
        raise ValueError("client_probs holds no client (K == 0)")
    if not client_probs.is_floating_point():
        raise ValueError(f"client_probs must be floating point, got {client_probs.dtype}")
    if not torch.isfinite(client_probs).all():
        raise ValueError("client_probs contains NaN or infinite values")
    # Non-negativity is what makes the per-example sensitivity sqrt(2)*clip (module docstring).
    if (client_probs < 0).any():
        raise ValueError("client_probs must be probabilities (non-negative)")
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm must be a finite number > 0, got {clip_norm!r}")
    if not (math.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise!r}")


def clip_l2(client_probs: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Scale each client's whole matrix down to Frobenius norm at most ``clip_norm``.

    Parameters
    ----------
    client_probs : Tensor, shape (K, N, C)
        One matrix per client.
    clip_norm : float
        Maximum Frobenius norm per client.

    Returns
    -------
    Tensor, shape (K, N, C)
        Matrices with norm ``min(norm, clip_norm)``; those already inside are unchanged.
    """
    norms = client_probs.flatten(1).norm(dim=1)
    # Exact scaling (no +eps in the denominator) so a clipped matrix has norm == clip_norm.
    factor = torch.where(norms > clip_norm, clip_norm / norms.clamp_min(1e-30), 1.0)
    return client_probs * factor.to(client_probs.dtype)[:, None, None]


def private_sum_of_probabilities(
    client_probs: torch.Tensor,
    clip_norm: float,
    noise_multiplier: float,
    generator: torch.Generator | NoiseSource,
) -> torch.Tensor:
    """Clip each client's matrix, sum over clients, add Gaussian noise once.

    Parameters
    ----------
    client_probs : Tensor, shape (K, N, C)
        Each participating client's probabilities on the proxy subset.
    clip_norm : float
        Per-client Frobenius clip norm.
    noise_multiplier : float
        Noise std divided by ``clip_norm``.
    generator : torch.Generator or NoiseSource
        Source of the noise (a generator: seeded noise, see :mod:`fedkd.privacy.noise`).

    Returns
    -------
    Tensor, shape (N, C)
        ``sum_k clip(P_k) + N(0, (noise_multiplier * clip_norm)^2)`` per coordinate.
    """
    _check_release_args(client_probs, clip_norm, noise_multiplier)
    total = clip_l2(client_probs, clip_norm).sum(dim=0)
    noise = as_noise_source(generator).normal(total.shape, dtype=total.dtype, device=total.device)
    return total + (noise_multiplier * clip_norm) * noise


def private_mean_teacher(
    client_probs: torch.Tensor,
    clip_norm: float,
    noise_multiplier: float,
    generator: torch.Generator | NoiseSource,
    min_prob: float = 1e-8,
) -> PrivateTeacher:
    """Noisy mean of the clipped client probabilities, as teacher probabilities and logits.

    The number of participants K is public (the server picks them), so dividing by K and the
    clamp/renormalise/log below are post-processing of the noisy sum: they cost no privacy.

    Parameters
    ----------
    client_probs : Tensor, shape (K, N, C)
        Each participating client's probabilities on the proxy subset.
    clip_norm : float
        Per-client Frobenius clip norm.
    noise_multiplier : float
        Noise std divided by ``clip_norm``.
    generator : torch.Generator or NoiseSource
        Source of the noise.
    min_prob : float, default 1e-8
        Floor applied before the log so the logits stay finite (a -inf logit turns the KL
        distillation loss into NaN).

    Returns
    -------
    PrivateTeacher
        ``probs`` (N, C): rows clamped to >= 0 and renormalised (a row that is all <= 0 after
        noise becomes uniform); ``logits`` (N, C): ``log(max(probs, min_prob))``.
    """
    k = client_probs.shape[0] if client_probs.ndim == 3 else 0
    noisy_sum = private_sum_of_probabilities(client_probs, clip_norm, noise_multiplier, generator)
    probs = (noisy_sum / max(k, 1)).clamp_min(0.0)
    row_sum = probs.sum(dim=1, keepdim=True)
    uniform = torch.full_like(probs, 1.0 / probs.shape[1])
    probs = torch.where(row_sum > 0, probs / row_sum.clamp_min(1e-30), uniform)
    return PrivateTeacher(probs=probs, logits=probs.clamp_min(min_prob).log())


def release_sensitivity(unit: PrivacyUnit = "example") -> float:
    """L2 sensitivity of the clipped-sum release, in units of ``clip_norm``.

    Parameters
    ----------
    unit : {"example", "client"}
        ``"example"``: add/remove one example of a participating client (``sqrt(2)``, see the
        module docstring). ``"client"``: add/remove a whole client (``1``).

    Returns
    -------
    float
        The sensitivity divided by ``clip_norm``.
    """
    if unit == "example":
        return math.sqrt(2.0)
    if unit == "client":
        return 1.0
    raise ValueError(f"unit must be 'example' or 'client', got {unit!r}")


def gaussian_release_event(
    noise_multiplier: float, round: int, unit: PrivacyUnit = "example", count: int = 1
) -> GaussianReleaseEvent:
    """Ledger event for ``count`` releases by :func:`private_sum_of_probabilities`.

    Append one to the ledger of every client whose matrix went into the release.

    Parameters
    ----------
    noise_multiplier : float
        The release's noise multiplier (std / clip_norm), as in the spec.
    round : int
        Federated round.
    unit : {"example", "client"}, default "example"
        Privacy unit (see :func:`release_sensitivity`); ``"example"`` composes consistently
        with the DP-SGD events in the same ledger.
    count : int, default 1
        Number of releases.

    Returns
    -------
    GaussianReleaseEvent
        With ``noise_multiplier / release_sensitivity(unit)``.
    """
    return GaussianReleaseEvent(
        noise_multiplier=noise_multiplier / release_sensitivity(unit), count=count, round=round
    )


@dataclass(frozen=True)
class GaussianRelease:
    """The client-level Gaussian mechanism on per-client probability matrices (the spec's
    ``privacy.release_noise`` and ``privacy.release_clip``).

    An algorithm that sends the server's teacher built from clients' probabilities releases it
    through :meth:`mean_teacher` (or :meth:`noisy_sum`) and appends :meth:`event` to the ledger
    of every client whose matrix went in; :meth:`planned_events` is what the budget check plans
    for one round, before any upload arrives.

    Parameters
    ----------
    clip_norm : float
        Per-client Frobenius clip norm, > 0.
    noise_multiplier : float
        Noise std divided by ``clip_norm``, >= 0.
    unit : {"example", "client"}, default "example"
        Privacy unit of the ledger event (see :func:`release_sensitivity`).
    """

    clip_norm: float
    noise_multiplier: float
    unit: PrivacyUnit = "example"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ValueError(f"clip_norm must be a finite number > 0, got {self.clip_norm!r}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ValueError(
                f"noise_multiplier must be a finite number >= 0, got {self.noise_multiplier!r}"
            )
        release_sensitivity(self.unit)  # rejects an unknown unit

    def clip(self, client_probs: torch.Tensor) -> torch.Tensor:
        """Each client's matrix scaled to Frobenius norm at most ``clip_norm`` (`clip_l2`)."""
        return clip_l2(client_probs, self.clip_norm)

    def noisy_sum(
        self, client_probs: torch.Tensor, noise: torch.Generator | NoiseSource
    ) -> torch.Tensor:
        """The clipped matrices' sum plus Gaussian noise (`private_sum_of_probabilities`)."""
        return private_sum_of_probabilities(
            client_probs, self.clip_norm, self.noise_multiplier, noise
        )

    def mean_teacher(
        self, client_probs: torch.Tensor, noise: torch.Generator | NoiseSource
    ) -> PrivateTeacher:
        """The noisy mean as teacher probabilities and logits (`private_mean_teacher`)."""
        return private_mean_teacher(client_probs, self.clip_norm, self.noise_multiplier, noise)

    def event(self, round_num: int, count: int = 1) -> GaussianReleaseEvent:
        """The ledger event of `count` releases, for each client whose matrix went in."""
        return gaussian_release_event(self.noise_multiplier, round_num, self.unit, count)

    def planned_events(self, round_num: int) -> list[PrivacyEvent]:
        """The most one round's release charges a contributing client: one release."""
        return [self.event(round_num)]
