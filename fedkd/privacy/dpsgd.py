"""DP-SGD for one client's private training, through Opacus (the per-client reference path).

Each call wraps the client's model and optimizer with a fresh `PrivacyEngine` for one round of
local training and removes Opacus's hooks afterwards, so a client that trains again next round
(or a model rebuilt from bytes) never carries duplicated hooks. Batches are Poisson-sampled
(sample rate = batch_size / n); the optimizer's state (momentum) is the wrapped optimizer's and
persists. What is spent is returned as a ledger event; accounting happens in the ledger.
Distillation on the public proxy set does not go through here: it touches no private data.

Noise and Poisson sampling come from a `fedkd.privacy.noise.NoiseSource`. A seeded source hands
its generator to Opacus, which draws as it always does. A secure source replaces the two places
where Opacus draws randomness (Opacus's own ``secure_mode`` needs ``torchcsprng``, which has no
build for current torch): the optimizer's ``add_noise`` (the same clipped sum plus
``N(0, (noise_multiplier * max_grad_norm)^2)`` per coordinate, drawn from the source) and the
Poisson batch sampler (Opacus's sampler, drawing its masks from the source, behind Opacus's
own collate function for empty batches). Clipping, scaling and the hooks stay Opacus's.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedkd.privacy.ledger import DpSgdEvent, PrivacyEvent
from fedkd.privacy.noise import NoiseSource, as_noise_source


@dataclass(frozen=True)
class DpSgdSettings:
    """DP-SGD as the spec sets it.

    Either ``noise_multiplier`` is given, or ``target_epsilon`` > 0 and the noise is calibrated
    once for the whole planned run (``planned_epochs``, the epochs of all rounds together, x
    steps per epoch), leaving room for ``other_releases``: events the client is charged once
    over the run besides DP-SGD (e.g. its label histogram), which count against the same target.
    """

    max_grad_norm: float
    delta: float
    noise_multiplier: float = 0.0
    target_epsilon: float = 0.0
    planned_epochs: int = 1
    other_releases: tuple[PrivacyEvent, ...] = ()

    def noise_for(self, sample_rate: float, steps_per_epoch: int) -> float:
        """The noise multiplier of a client sampling at `sample_rate`, `steps_per_epoch` steps
        per epoch (the same in every round, so the whole run's noise is one value)."""
        if self.target_epsilon <= 0:
            return self.noise_multiplier
        return _calibrated(
            self.target_epsilon,
            self.delta,
            sample_rate,
            steps_per_epoch * self.planned_epochs,
            self.other_releases,
        )

    def round_event(
        self, num_examples: int, batch_size: int, epochs: int, round_num: int = 0
    ) -> DpSgdEvent:
        """The DP-SGD cost of one round of `epochs` epochs on `num_examples` examples: what
        `train_dpsgd` charges, known before training (the budget check plans with it)."""
        sample_rate, steps_per_epoch = sample_rate_and_steps_per_epoch(num_examples, batch_size)
        return DpSgdEvent(
            sample_rate=sample_rate,
            noise_multiplier=self.noise_for(sample_rate, steps_per_epoch),
            steps=steps_per_epoch * epochs,
            round=round_num,
        )


@functools.lru_cache(maxsize=1024)
def _calibrated(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    other_releases: tuple[PrivacyEvent, ...],
) -> float:
    # Imported here with the accountants it needs: only a calibrating client pays for them.
    from fedkd.privacy.calibration import calibrate_noise_multiplier

    return calibrate_noise_multiplier(
        target_epsilon, delta, sample_rate, steps, other_events=other_releases
    )


def sample_rate_and_steps_per_epoch(num_examples: int, batch_size: int) -> tuple[float, int]:
    """Opacus's Poisson sampling: rate = 1 / batches per epoch, that many steps per epoch."""
    batches = max(1, -(-num_examples // batch_size))
    return 1.0 / batches, batches


def train_dpsgd(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    settings: DpSgdSettings,
    generator: torch.Generator | NoiseSource,
    round_num: int = 0,
) -> tuple[dict[str, float], DpSgdEvent]:
    """One round of DP-SGD local training; returns (mean loss, steps) and the ledger event.

    `generator` is the source of the noise and of the Poisson sampling: a seeded generator
    (seeded noise) or a `fedkd.privacy.noise.NoiseSource` (module docstring). `optimizer` is
    wrapped by Opacus, which needs a ``torch.optim`` one (not fedkd's own CPU SGD:
    `fedkd.learner.loop.make_optimizer` with ``torch_optimizer=True``).
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"DP-SGD needs a torch.optim optimizer, not {type(optimizer).__name__}: "
            "make_optimizer(..., torch_optimizer=True)"
        )
    x = torch.as_tensor(x)
    y = torch.as_tensor(y)
    source = as_noise_source(generator)
    seeded = source.generator  # None: a secure source, fed to Opacus below
    event = settings.round_event(len(y), batch_size, epochs, round_num)
    sigma = event.noise_multiplier
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, generator=seeded)
    model.train()  # Opacus refuses a model left in eval mode (e.g. after computing logits)
    # Imported here: Opacus takes seconds to import, and a client without DP-SGD never needs it.
    from opacus import PrivacyEngine

    with warnings.catch_warnings():
        # Opacus's secure RNG needs torchcsprng; fedkd's own source replaces it (module
        # docstring), and a seeded run chose seeded noise in its spec.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant="rdp")  # its accountant is unused: the ledger accounts
        private_model, private_opt, private_loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=sigma,
            max_grad_norm=settings.max_grad_norm,
            poisson_sampling=True,
            noise_generator=seeded,
        )
    if seeded is None:
        private_loader = _draw_from(source, private_opt, private_loader)
    try:
        with warnings.catch_warnings():
            # Opacus's hooks fire on module outputs when inputs need no grad: expected here.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            stats = _epochs(private_model, private_opt, private_loader, epochs)
    finally:
        private_model.remove_hooks()
        for p in model.parameters():
            p.grad_sample = None
            p.grad = None
    return {"loss": stats["loss"], "steps": float(event.steps)}, event


def _draw_from(source: NoiseSource, optimizer: Any, loader: DataLoader) -> DataLoader:
    """Make Opacus's optimizer draw its noise, and its Poisson loader its batches, from
    `source`; returns the loader to iterate (module docstring)."""
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    class SourceSampler(UniformWithReplacementSampler):
        def __iter__(self) -> Iterator[list[int]]:
            for _ in range(self.steps):
                yield (
                    source.poisson_mask(self.num_samples, self.sample_rate)
                    .nonzero()
                    .flatten()
                    .tolist()
                )

    def add_noise() -> None:  # DPOptimizer.add_noise, with the noise from `source`
        std = optimizer.noise_multiplier * optimizer.max_grad_norm
        for p in optimizer.params:
            _check_processed_flag(p.summed_grad)
            summed = p.summed_grad
            noise = source.normal(summed.shape, dtype=summed.dtype, device=summed.device)
            p.grad = (summed + std * noise).view_as(p)
            _mark_as_processed(p.summed_grad)

    optimizer.add_noise = add_noise
    sampler = SourceSampler(
        num_samples=len(loader.dataset), sample_rate=loader.sample_rate, steps=len(loader)
    )
    return DataLoader(loader.dataset, batch_sampler=sampler, collate_fn=loader.collate_fn)


def _epochs(
    model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, epochs: int
) -> dict[str, float]:
    model.train()
    total, seen = 0.0, 0
    for _ in range(epochs):
        for xb, yb in loader:
            optimizer.zero_grad(set_to_none=True)
            if len(yb) == 0:
                # An empty Poisson batch still takes a (noise-only) step: the accounting
                # assumes every step happens. Opacus needs (empty) per-sample gradients for it.
                for p in model.parameters():
                    if p.requires_grad:
                        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
                optimizer.step()
                continue
            loss = nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(yb)
            seen += len(yb)
    return {"loss": total / max(seen, 1)}
