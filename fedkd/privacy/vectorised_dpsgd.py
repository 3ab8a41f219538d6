"""DP-SGD for the vectorised learner: many clients at once.

The math is Opacus's (``GradSampleModule`` + ``DPOptimizer`` with ``loss_reduction="mean"``), per
client and step:

1. Poisson sampling: each of the client's ``n`` examples joins the batch with probability
   ``sample_rate``, independently (`poisson_plan`); an empty batch still takes a noise-only step.
2. Per-sample gradients of the per-example loss, and
3. clipping: each example's gradient, flattened over *all* parameters, is scaled by
   ``min(1, max_grad_norm / (norm + 1e-6))`` (Opacus's factor). Both by closed forms from each
   layer's activations and backprops (`fedkd.privacy.layer_grads`: one forward and one
   backward per batch, the per-example norms of linear layers never materialised) where the
   model has only the zoo's layer types, else by nested ``vmap`` (over examples inside
   ``vmap`` over clients, of ``grad`` of ``functional_call``); `clipped_sum_and_losses`.
4. Sum over the batch, plus Gaussian noise ``N(0, (noise_multiplier * max_grad_norm)^2)`` per
   coordinate, from the client's own noise source (`fedkd.privacy.noise`).
5. Division by the *expected* batch size ``int(n * sample_rate)`` (Opacus's convention for
   ``loss_reduction="mean"``), not by the realised one.

`dp_sgd_gradients` is one step's gradient for K clients; `train_dp_sgd` runs a round of local
training with a functional optimizer and returns, per client, the steps taken and the sample
rate, which is what a `fedkd.privacy.ledger.DpSgdEvent` records.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from fedkd.privacy import layer_grads
from fedkd.privacy.dpsgd import sample_rate_and_steps_per_epoch
from fedkd.privacy.noise import NoiseSource, as_noise_source

Params = dict[str, Tensor]  # parameter name -> (K, *shape)

# Opacus adds this to the per-sample norm before dividing (DPOptimizer.clip_and_accumulate).
CLIP_EPS = 1e-6


def per_client(value: float | Sequence[float], k: int) -> list[float]:
    """One value for each of `k` clients, from a shared value or a per-client sequence."""
    return [float(value)] * k if isinstance(value, int | float) else [float(v) for v in value]


def expected_batch_size(num_examples: int, sample_rate: float) -> int:
    """The divisor Opacus uses (``PrivacyEngine.make_private``: ``int(n * sample_rate)``)."""
    return int(num_examples * sample_rate)


@dataclass
class PoissonPlan:
    """Poisson-sampled batches of K clients over T aligned steps.

    Step t of client k uses rows ``index[t, k][mask[t, k]]``; ``active[t, k]`` is False once
    the client has taken all its steps (its weights and optimizer state are then left alone).
    """

    index: list[Tensor]  # per step: (K, L_t) int64 rows of the concatenated data, padded
    mask: list[Tensor]  # per step: (K, L_t) bool, True on sampled rows
    active: Tensor  # (T, K) bool

    @property
    def steps(self) -> int:
        return len(self.index)


def poisson_plan(
    lengths: Sequence[int],
    offsets: Sequence[int],
    sample_rates: Sequence[float],
    steps: Sequence[int],
    generators: Sequence[torch.Generator | NoiseSource],
    device: torch.device | str = "cpu",
) -> PoissonPlan:
    """Draw every client's Poisson batches: ``rand(n) < sample_rate`` per step, from the
    client's own source (a seeded generator or a `fedkd.privacy.noise.NoiseSource`)."""
    sources = [as_noise_source(g) for g in generators]
    total = max(steps, default=0)
    index, mask = [], []
    active = torch.zeros((total, len(lengths)), dtype=torch.bool)
    for t in range(total):
        rows: list[Tensor] = []
        for k, (n, off, q, s, gen) in enumerate(
            zip(lengths, offsets, sample_rates, steps, sources, strict=True)
        ):
            if t < s:
                active[t, k] = True
                picked = torch.nonzero(gen.poisson_mask(int(n), q)).flatten()
                rows.append(picked + int(off))
            else:
                rows.append(torch.zeros(0, dtype=torch.int64))
        width = max(1, max(len(r) for r in rows))
        idx = torch.zeros((len(rows), width), dtype=torch.int64)
        msk = torch.zeros((len(rows), width), dtype=torch.bool)
        for k, r in enumerate(rows):
            # Padding re-reads the client's first row (always a real example); masked out.
            idx[k] = int(offsets[k]) if lengths[k] else 0
            idx[k, : len(r)] = r
            msk[k, : len(r)] = True
        index.append(idx.to(device))
        mask.append(msk.to(device))
    return PoissonPlan(index=index, mask=mask, active=active.to(device))


def per_sample_grads(
    model: nn.Module,
    params: Params,
    x: Tensor,
    y: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
) -> tuple[Params, Tensor]:
    """Per-example gradients and losses of K clients: nested vmap (clients x examples).

    Parameters
    ----------
    model : nn.Module
        The architecture (its own weights are not used).
    params : dict of str to Tensor
        Stacked weights, each ``(K, *shape)``.
    x, y : Tensor
        ``(K, L, *input_shape)`` inputs and ``(K, L)`` targets.
    loss_fn : callable, default cross-entropy
        Mean loss of a batch; called on one example at a time.

    Returns
    -------
    grads : dict of str to Tensor
        ``(K, L, *shape)``: the gradient of each example's own loss.
    losses : Tensor
        ``(K, L)`` per-example losses.
    """

    def one(p: Params, xi: Tensor, yi: Tensor) -> Tensor:
        return loss_fn(functional_call(model, p, (xi[None],)).float(), yi[None])

    per_example = vmap(grad_and_value(one), in_dims=(None, 0, 0))
    return vmap(per_example, in_dims=(0, 0, 0))(params, x, y)


def clip_and_sum(grads: Params, mask: Tensor, max_grad_norm: float) -> Params:
    """Clip each example's gradient (L2 over all parameters) to `max_grad_norm`, sum per client.

    Masked-out (padding) examples contribute nothing.
    """
    norms = torch.stack([g.flatten(2).norm(2, dim=-1) for g in grads.values()], dim=-1).norm(
        2, dim=-1
    )  # (K, L)
    factor = layer_grads.clip_factors(norms, mask, max_grad_norm, CLIP_EPS)
    return {name: torch.einsum("kl,kl...->k...", factor, g) for name, g in grads.items()}


def clipped_sum_and_losses(
    model: nn.Module,
    params: Params,
    x: Tensor,
    y: Tensor,
    mask: Tensor,
    max_grad_norm: float,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    method: str = "auto",
) -> tuple[Params, Tensor]:
    """The clipped per-example gradients summed per client, and the ``(K, L)`` losses.

    `method` ``"layers"`` computes them from the layers' activations and backprops
    (`fedkd.privacy.layer_grads`, faster), ``"vmap"`` from nested ``vmap`` (`per_sample_grads`
    and `clip_and_sum`); ``"auto"`` takes ``"layers"`` where the model has only layer types it
    knows.
    """
    if method not in ("auto", "layers", "vmap"):
        raise ValueError(f"method must be 'auto', 'layers' or 'vmap', got {method!r}")
    if method == "layers" or (method == "auto" and layer_grads.supports(model)):
        out = layer_grads.clipped_sums(model, params, x, y, mask, max_grad_norm, CLIP_EPS, loss_fn)
        return out.sums, out.losses
    grads, losses = per_sample_grads(model, params, x, y, loss_fn)
    return clip_and_sum(grads, mask, max_grad_norm), losses


def add_noise(
    summed: Params,
    std: float | Sequence[float],
    generators: Sequence[torch.Generator | NoiseSource],
) -> Params:
    """``summed + N(0, std_k^2)`` per coordinate, client k's noise from ``generators[k]`` (a
    seeded generator on the device of `summed`, or a `fedkd.privacy.noise.NoiseSource`).

    `std` is one value for every client or one per client (clients of different sizes get
    different calibrated noise multipliers).
    """
    stds = per_client(std, len(generators))
    if not any(stds):
        return summed
    shapes = [g.shape[1:] for g in summed.values()]
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    first = next(iter(summed.values()))
    scale = torch.tensor(stds, device=first.device, dtype=first.dtype).unsqueeze(1)
    noise = (
        torch.stack(
            [
                as_noise_source(gen).normal(sum(sizes), dtype=first.dtype, device=first.device)
                for gen in generators
            ]
        )
        * scale
    )  # (K, P): one draw per client and step
    out = {}
    for (name, g), part, shape in zip(
        summed.items(), noise.split(sizes, dim=1), shapes, strict=True
    ):
        out[name] = g + part.reshape(len(generators), *shape)
    return out


def dp_sgd_gradients(
    model: nn.Module,
    params: Params,
    x: Tensor,
    y: Tensor,
    mask: Tensor,
    *,
    max_grad_norm: float,
    noise_multiplier: float | Sequence[float],
    expected_batch_sizes: Tensor | Sequence[float],
    noise_generators: Sequence[torch.Generator | NoiseSource],
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
) -> tuple[Params, Tensor]:
    """One DP-SGD gradient for each of K clients (what Opacus puts in ``p.grad``).

    Parameters
    ----------
    model : nn.Module
        The architecture shared by the K clients.
    params : dict of str to Tensor
        Stacked weights ``(K, *shape)``.
    x, y, mask : Tensor
        ``(K, L, ...)`` batch, padded; ``mask`` ``(K, L)`` marks real (sampled) examples.
    max_grad_norm : float
        Per-example clipping norm C.
    noise_multiplier : float or sequence of float
        Noise std divided by C: one for all clients, or one per client.
    expected_batch_sizes : Tensor or sequence of float
        ``(K,)`` divisors (Opacus: ``int(n * sample_rate)``).
    noise_generators : sequence of torch.Generator or NoiseSource
        One per client (a generator on the device of `params`).
    loss_fn : callable, default cross-entropy
        Batch-mean loss, applied per example.

    Returns
    -------
    grads : dict of str to Tensor
        ``(clipped sum + noise) / expected batch size``, ``(K, *shape)``.
    loss_sums : Tensor
        ``(K,)`` sums of the sampled examples' losses (for the reported mean loss).
    """
    summed, losses = clipped_sum_and_losses(model, params, x, y, mask, max_grad_norm, loss_fn)
    sigmas = per_client(noise_multiplier, len(noise_generators))
    noisy = add_noise(summed, [m * max_grad_norm for m in sigmas], noise_generators)
    first = next(iter(params.values()))
    divisor = torch.as_tensor(expected_batch_sizes, dtype=first.dtype, device=first.device)
    out = {n: g / divisor.view(-1, *([1] * (g.dim() - 1))) for n, g in noisy.items()}
    return out, (losses * mask.to(losses.dtype)).sum(dim=1)


@dataclass
class DpSgdRound:
    """What one round of vectorised DP-SGD did, per client (ledger: `DpSgdEvent`)."""

    params: Params
    opt_state: dict[str, Any]
    steps: list[int]
    sample_rates: list[float]
    noise_multipliers: list[float]
    loss: Tensor  # (K,) mean loss over the sampled examples


def train_dp_sgd(
    model: nn.Module,
    params: Params,
    optimizer: Any,
    opt_state: dict[str, Any],
    x_all: Tensor,
    y_all: Tensor,
    lengths: Sequence[int],
    offsets: Sequence[int],
    *,
    epochs: int,
    batch_size: int,
    max_grad_norm: float,
    noise_multiplier: float | Sequence[float] | Callable[[float, int], float],
    sample_generators: Sequence[torch.Generator | NoiseSource],
    noise_generators: Sequence[torch.Generator | NoiseSource],
) -> DpSgdRound:
    """A round of DP-SGD local training for K clients of one architecture.

    Each client samples at rate ``1 / ceil(n / batch_size)`` for that many steps per epoch
    (Opacus's Poisson loader); a client that has taken its steps is masked out of the update.
    `optimizer` is a functional optimizer of `fedkd.learner.functional_optim` (``step(params,
    grads, state, active)``, and ``step_first``: the same on the first clients of the stack).
    `noise_multiplier` is one value, one per client, or a function of a client's
    ``(sample_rate, steps_per_epoch)`` (`fedkd.privacy.dpsgd.DpSgdSettings.noise_for`: noise
    calibrated for the client's whole run, as the Opacus path does).
    """
    rates_steps = [sample_rate_and_steps_per_epoch(n, batch_size) for n in lengths]
    rates = [q for q, _ in rates_steps]
    steps = [s * epochs if n > 0 else 0 for (_, s), n in zip(rates_steps, lengths, strict=True)]
    if callable(noise_multiplier):
        sigmas = [float(noise_multiplier(q, s)) for q, s in rates_steps]
    else:
        sigmas = per_client(noise_multiplier, len(lengths))
    device = next(iter(params.values())).device
    plan = poisson_plan(lengths, offsets, rates, steps, sample_generators, device)
    divisors = [max(1, expected_batch_size(n, q)) for n, q in zip(lengths, rates, strict=True)]
    k = len(lengths)
    # Clients that have taken all their steps are left out of the computation when the ones
    # still stepping are the first ones of the stack (the learner stacks clients by size,
    # largest first), instead of computing their padded, masked-out batches; their weights are
    # written in place, so the caller's tensors are copied first.
    params = {n: p.clone() for n, p in params.items()}
    opt_state = _cloned(opt_state)
    stepping = plan.active.sum(1).tolist()
    total = torch.zeros(k, dtype=torch.float64, device=device)
    seen = torch.zeros(k, dtype=torch.float64, device=device)
    for t in range(plan.steps):
        a = stepping[t] if bool(plan.active[t, : stepping[t]].all()) else k
        if a == 0:
            continue
        idx, msk = plan.index[t][:a], plan.mask[t][:a]
        grads, loss_sums = dp_sgd_gradients(
            model,
            {n: p[:a] for n, p in params.items()},
            x_all[idx],
            y_all[idx],
            msk,
            max_grad_norm=max_grad_norm,
            noise_multiplier=sigmas[:a],
            expected_batch_sizes=divisors[:a],
            noise_generators=noise_generators[:a],
        )
        active = plan.active[t, :a]
        params, opt_state = optimizer.step_first(params, grads, opt_state, active, a)
        total[:a] += loss_sums.double() * active
        seen[:a] += msk.sum(dim=1).double() * active
    return DpSgdRound(
        params=params,
        opt_state=opt_state,
        steps=steps,
        sample_rates=rates,
        noise_multipliers=sigmas,
        loss=(total / seen.clamp(min=1)).float(),
    )


def _cloned(state: Any) -> Any:
    """A copy of an optimizer state (nested dicts of tensors) whose tensors nothing else holds."""
    if isinstance(state, Tensor):
        return state.clone()
    if isinstance(state, dict):
        return {key: _cloned(value) for key, value in state.items()}
    return state


__all__ = [
    "CLIP_EPS",
    "DpSgdRound",
    "PoissonPlan",
    "add_noise",
    "clip_and_sum",
    "clipped_sum_and_losses",
    "dp_sgd_gradients",
    "expected_batch_size",
    "per_client",
    "per_sample_grads",
    "poisson_plan",
    "train_dp_sgd",
]
