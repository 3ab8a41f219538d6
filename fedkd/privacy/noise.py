"""Where the randomness of every privacy mechanism comes from: seeded or secure.

Every noise draw and every privacy-relevant sampling decision in fedkd goes through a
:class:`NoiseSource`: DP-SGD's Gaussian noise and Poisson sampling (the Opacus path and the
vectorised path), the noisy label histograms, GNMax's votes and threshold, and the Gaussian
release of the teacher. There are two sources, chosen by the spec's ``privacy.noise_rng``:

``"seeded"`` (:class:`SeededNoise`)
    A ``torch.Generator`` seeded from the spec's seed, the round, the client and the phase.
    Runs are reproducible to the bit, and so is the noise: anyone who knows the seed (it is in
    every results folder's ``spec.toml``) can draw the same noise and subtract it. The
    epsilons of such a run hold for the simulation only.

``"secure"`` (:class:`SecureNoise`)
    A ChaCha20 key stream (``cryptography``) under a fresh 256-bit key from the operating
    system's CSPRNG (``os.urandom``), made by the party that adds the noise each time it needs
    a source, never derived from the spec. Uniforms are 53-bit (``k * 2**-53``), Poisson
    sampling keeps example i when its uniform is below the sample rate, and Gaussians come from
    the Box-Muller transform of two uniforms, computed in float64 and rounded to the target
    dtype once. Not reproducible, by design.

Opacus's own ``secure_mode`` needs ``torchcsprng``, which has no build for current torch; the
Opacus path therefore keeps Opacus for clipping, noise scale and its Poisson data loader and
feeds it this module's secure draws (see :func:`fedkd.privacy.dpsgd.train_dpsgd`).

Floating point: like Opacus without ``secure_mode``, a Gaussian is rounded once to the dtype
of the value it protects; the precision attacks on floating-point Gaussian samplers (Mironov
2012; Jin et al. 2021) are not mitigated here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

__all__ = [
    "NOISE_RNGS",
    "NoiseSource",
    "SecureNoise",
    "SeededNoise",
    "as_noise_source",
    "noise_source",
]

NOISE_RNGS = ("seeded", "secure")

Shape = Sequence[int] | torch.Size | int
Device = torch.device | str | None

_MANTISSA = (1 << 53) - 1  # low 53 bits of a 64-bit word: a uniform integer in [0, 2**53)
_ULP = 2.0**-53


@runtime_checkable
class NoiseSource(Protocol):
    """A source of the random draws a privacy mechanism makes."""

    @property
    def name(self) -> str:
        """``"seeded"`` or ``"secure"`` (what ``privacy.noise_rng`` calls it)."""
        ...

    @property
    def generator(self) -> torch.Generator | None:
        """The seeded generator behind the draws, or None for a secure source."""
        ...

    def normal(
        self, shape: Shape, *, dtype: torch.dtype = torch.float32, device: Device = None
    ) -> torch.Tensor:
        """Independent standard normal draws of `shape`, as `dtype` on `device`."""
        ...

    def poisson_mask(self, n: int, rate: float) -> torch.Tensor:
        """``(n,)`` bool on the CPU: each entry True with probability `rate`, independently."""
        ...


class SeededNoise:
    """Reproducible draws from a seeded ``torch.Generator`` (simulations only).

    Draws exactly what fedkd drew before the source became a choice: ``torch.randn`` and
    ``torch.rand(n) < rate`` on the generator, on the generator's device.

    Parameters
    ----------
    generator : torch.Generator
        The seeded generator (its device is where the draws are made).
    """

    name = "seeded"

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def normal(
        self, shape: Shape, *, dtype: torch.dtype = torch.float32, device: Device = None
    ) -> torch.Tensor:
        """Standard normal draws (see :class:`NoiseSource`)."""
        gen = self.generator
        out = torch.randn(_size(shape), generator=gen, dtype=dtype, device=gen.device)
        return out if device is None else out.to(device)

    def poisson_mask(self, n: int, rate: float) -> torch.Tensor:
        """Poisson-sampling mask (see :class:`NoiseSource`); Opacus's own sampler draws this."""
        return torch.rand(int(n), generator=self.generator) < rate


class SecureNoise:
    """Draws from a ChaCha20 key stream under a fresh key from ``os.urandom``.

    Each instance has its own 256-bit key and 96-bit nonce from the OS CSPRNG, so two sources
    (two runs, two clients, two rounds) never share a stream, and nothing in the spec or the
    run's files determines it.
    """

    name = "secure"
    generator = None

    def __init__(self) -> None:
        # cryptography's 16-byte ChaCha20 nonce is a 32-bit block counter (from 0) and a
        # 96-bit nonce: the stream runs 256 GiB before the counter could wrap.
        nonce = bytes(4) + os.urandom(12)
        cipher = Cipher(algorithms.ChaCha20(os.urandom(32), nonce), mode=None)
        self._stream = cipher.encryptor()

    def _uniform53(self, n: int, device: Device) -> torch.Tensor:
        """``(n,)`` float64 integers in ``[0, 2**53)`` (exactly representable), on `device`."""
        if n == 0:
            return torch.zeros(0, dtype=torch.float64, device=device)
        raw = bytearray(self._stream.update(bytes(8 * n)))  # writable, as frombuffer wants
        words = torch.frombuffer(raw, dtype=torch.int64)
        return (words.to(device) & _MANTISSA).double()

    def normal(
        self, shape: Shape, *, dtype: torch.dtype = torch.float32, device: Device = None
    ) -> torch.Tensor:
        """Standard normal draws by Box-Muller (see :class:`NoiseSource`)."""
        size = _size(shape)
        n = math.prod(size)
        pairs = (n + 1) // 2
        u = self._uniform53(2 * pairs, device)
        radius = torch.sqrt(-2.0 * torch.log((u[:pairs] + 1.0) * _ULP))  # uniform in (0, 1]
        angle = (2.0 * math.pi * _ULP) * u[pairs:]
        z = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:n]
        return z.reshape(size).to(dtype)

    def poisson_mask(self, n: int, rate: float) -> torch.Tensor:
        """Poisson-sampling mask (see :class:`NoiseSource`): a uniform in [0, 1) below `rate`."""
        return self._uniform53(int(n), "cpu") * _ULP < rate


def _size(shape: Shape) -> torch.Size:
    return torch.Size([shape]) if isinstance(shape, int) else torch.Size(shape)


def noise_source(noise_rng: str, seeded: Callable[[], torch.Generator]) -> NoiseSource:
    """The source ``privacy.noise_rng`` names.

    Parameters
    ----------
    noise_rng : {"seeded", "secure"}
        The spec's choice (resolved: no empty default).
    seeded : callable
        Makes the seeded generator this draw uses in a seeded run (called only then).

    Returns
    -------
    NoiseSource
        :class:`SeededNoise` on ``seeded()``, or a new :class:`SecureNoise`.
    """
    if noise_rng == "seeded":
        return SeededNoise(seeded())
    if noise_rng == "secure":
        return SecureNoise()
    raise ValueError(f"noise_rng must be one of {', '.join(NOISE_RNGS)}, got {noise_rng!r}")


def as_noise_source(source: NoiseSource | torch.Generator) -> NoiseSource:
    """`source` itself, or a seeded ``torch.Generator`` wrapped as :class:`SeededNoise`."""
    if isinstance(source, torch.Generator):
        return SeededNoise(source)
    return source
