"""Per-sample gradient norms and clipped sums from layer activations and output gradients.

DP-SGD needs, per client and example, the L2 norm of the example's gradient over all
parameters, then the sum over the batch of the gradients scaled by their clip factors. For the
layers of the student zoo both follow in closed form from what one forward and one backward
pass see at each parameterised layer: its input ``a`` (the activation) and the gradient ``g`` of
the summed per-example losses with respect to its output (the backprop), as in Opacus's
``GradSampleModule`` hooks and its ghost clipping:

- ``Linear``: an example's weight gradient is the outer product ``g a^T``; its norm is
  ``|g| |a|`` ("ghost" norm: the gradient is never materialised), and the clipped sum is one
  matrix product of the clip-weighted ``g`` with ``a``. The bias gradient is ``g``.
- ``Conv1d`` / ``Conv2d``: with ``U`` the example's input patches (``C k k`` by ``P``
  positions), the weight gradient is ``g U^T``. It is materialised per example where that is
  cheaper than the ghost norm's ``P x P`` Gram matrices (always, for the zoo's small kernels on
  full-size inputs); otherwise its norm comes from ``sum((U^T U) * (g^T g))``.
- ``GroupNorm``: the weight gradient is ``g * normalised(a)`` summed over positions, the bias
  gradient ``g`` summed over positions.

A layer's clipped sum is a contraction of the same ``a`` and ``g`` weighted by the clip
factors: what a second, weighted backward pass (Opacus's "fast gradient clipping") would
compute, without running it.

`clipped_sums` records ``a`` and ``g`` with forward hooks on the layers inside
``functional_call``: on a CPU one client at a time with plain autograd (faster there than
``vmap`` over the clients, whose batched convolutions and pooling are slow on a CPU), on other
devices for all clients at once, ``vmap`` over the clients of ``grad`` with respect to zero
"probes" added to each layer's output (the probes' gradients are the backprops). `supports`
says whether a model has only layers of the kinds above; the caller keeps nested ``vmap`` for
any other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

Params = dict[str, Tensor]  # parameter name -> (K, *shape)
LossFn = Callable[[Tensor, Tensor], Tensor]

_CONV = (nn.Conv1d, nn.Conv2d)
_LAYERS = (nn.Linear, *_CONV, nn.GroupNorm)


def supports(model: nn.Module) -> bool:
    """Whether every parameter of `model` belongs to a layer with a closed form here.

    Those are ``Linear``, ``Conv1d`` and ``Conv2d`` (zero padding given as numbers, one
    group) and ``GroupNorm``, each called once per forward pass (`clipped_sums` checks that).
    """
    for module in _layers(model).values():
        if not isinstance(module, _LAYERS):
            return False
        if isinstance(module, _CONV) and (
            module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str)
        ):
            return False
    return True


@dataclass
class ClippedSums:
    """One DP-SGD batch of K clients before noise.

    ``sums`` holds the clipped per-example gradients summed per client, ``(K, *shape)`` per
    parameter name; ``norms`` ``(K, L)`` the examples' unclipped gradient norms; ``losses``
    ``(K, L)`` their losses (padding rows included: the caller masks them).
    """

    sums: Params
    norms: Tensor
    losses: Tensor


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    """The modules that hold parameters of their own, by name."""
    return {
        n: m
        for n, m in model.named_modules()
        if next(m.parameters(recurse=False), None) is not None
    }


@contextmanager
def _hooks(
    layers: dict[str, nn.Module], record: Callable[[str, Tensor, Tensor], Tensor | None]
) -> Iterator[None]:
    """Forward hooks calling ``record(name, input, output)`` (its result, if any, replaces the
    output); a layer that runs twice in one pass is refused (its closed form would be wrong)."""
    seen: set[str] = set()

    def hook(name: str) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], Tensor | None]:
        def on_forward(_: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor | None:
            if name in seen:
                raise ValueError(f"layer '{name}' ran twice in one forward pass")
            seen.add(name)
            return record(name, inputs[0], output)

        return on_forward

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _per_example_losses(loss_fn: LossFn) -> Callable[[Tensor, Tensor], Tensor]:
    """`loss_fn` (a batch-mean loss) applied to each example alone: ``(L, C), (L,) -> (L,)``."""
    return vmap(lambda out, t: loss_fn(out[None], t[None]))


def _capture_one(
    model: nn.Module, layers: dict[str, nn.Module], params: Params, x: Tensor, y: Tensor,
    loss_fn: LossFn,
) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:  # fmt: skip
    """One client's ``(L, ...)`` layer inputs and backprops and ``(L,)`` losses, plain autograd."""
    inputs: dict[str, Tensor] = {}
    outputs: dict[str, Tensor] = {}

    def record(name: str, a: Tensor, out: Tensor) -> None:
        inputs[name], outputs[name] = a.detach(), out

    # Weights that require grad make the layer outputs part of the graph; only the outputs'
    # gradients are asked for, so autograd computes no weight gradient.
    weights = {n: p.detach().requires_grad_() for n, p in params.items()}
    with torch.enable_grad(), _hooks(layers, record):
        logits = functional_call(model, weights, (x,))
        losses = _per_example_losses(loss_fn)(logits.float(), y)
        backprops = torch.autograd.grad(losses.sum(), [outputs[n] for n in layers])
    return inputs, dict(zip(layers, backprops, strict=True)), losses.detach()


def _capture_batched(
    model: nn.Module, layers: dict[str, nn.Module], params: Params, x: Tensor, y: Tensor,
    loss_fn: LossFn,
) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:  # fmt: skip
    """K clients' ``(K, L, ...)`` layer inputs and backprops and ``(K, L)`` losses, in one
    ``vmap`` over the clients of ``grad`` with respect to zero probes on the layer outputs."""
    shapes: dict[str, torch.Size] = {}

    def shape_of(name: str, _: Tensor, out: Tensor) -> None:
        shapes[name] = out.shape[1:]

    with torch.no_grad(), _hooks(layers, shape_of):
        functional_call(model, {n: p[0] for n, p in params.items()}, (x[0, :1],))
    first = next(iter(params.values()))
    probes = {
        n: torch.zeros(x.shape[0], x.shape[1], *s, dtype=first.dtype, device=first.device)
        for n, s in shapes.items()
    }
    per_example = _per_example_losses(loss_fn)

    def client(
        p: Params, z: dict[str, Tensor], xk: Tensor, yk: Tensor
    ) -> tuple[Tensor, tuple[Tensor, dict[str, Tensor]]]:
        inputs: dict[str, Tensor] = {}

        def record(name: str, a: Tensor, out: Tensor) -> Tensor:
            inputs[name] = a
            return out + z[name].to(out.dtype)

        with _hooks(layers, record):
            logits = functional_call(model, p, (xk,))
        losses = per_example(logits.float(), yk)
        return losses.sum(), (losses, inputs)

    backprops, (losses, inputs) = vmap(grad(client, argnums=1, has_aux=True))(params, probes, x, y)
    return inputs, backprops, losses


def _patches(module: nn.Module, a: Tensor) -> Tensor:
    """``(N, C k k, P)`` input patches of a convolution over ``a`` ``(N, C, *spatial)`` (what
    ``F.unfold`` gives, by one strided copy instead of its per-example loop)."""
    kernel, padding, stride, dilation = (
        module.kernel_size,
        module.padding,
        module.stride,
        module.dilation,
    )
    if isinstance(module, nn.Conv1d):  # as a 2-D convolution over one row
        a = a.unsqueeze(-2)
        kernel, padding, stride, dilation = (
            (1, *kernel),
            (0, *padding),
            (1, *stride),
            (1, *dilation),
        )
    (kh, kw), (ph, pw), (sh, sw), (dh, dw) = kernel, padding, stride, dilation
    a = F.pad(a, (pw, pw, ph, ph))
    n, c, h, w = a.shape
    rows, cols = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    s = a.stride()
    view = a.as_strided(
        (n, c, kh, kw, rows, cols), (s[0], s[1], s[2] * dh, s[3] * dw, s[2] * sh, s[3] * sw)
    )
    return view.reshape(n, c * kh * kw, rows * cols)


def _layer_terms(
    module: nn.Module, a: Tensor, g: Tensor
) -> tuple[Tensor, Callable[[Tensor], dict[str, Tensor]]]:
    """A layer's squared per-example gradient norms ``(K, L)`` and a function of the clip
    factors ``(K, L)`` giving its clipped sums (``{"weight": (K, *shape), "bias": ...}``).

    ``a`` is the layer's input ``(K, L, ...)``, ``g`` the gradient at its output.
    """
    k, n = g.shape[0], g.shape[1]
    bias = getattr(module, "bias", None) is not None
    if isinstance(module, nn.Linear):
        a3 = a.reshape(k, n, -1, a.shape[-1])  # (K, L, T, in): T positions share the weight
        g3 = g.reshape(k, n, -1, g.shape[-1])
        if a3.shape[2] == 1:
            sq = a3.square().sum((2, 3)) * g3.square().sum((2, 3))
        else:
            gram_a = torch.einsum("klti,klsi->klts", a3, a3)
            sq = (gram_a * torch.einsum("klto,klso->klts", g3, g3)).sum((2, 3))
        bias_rows = g3.sum(2)  # (K, L, out)

        def weight_sum(c: Tensor) -> Tensor:
            return torch.einsum("kl,klto,klti->koi", c, g3, a3)

    elif isinstance(module, _CONV):
        u = _patches(module, a.flatten(0, 1))
        u = u.reshape(k, n, *u.shape[1:])  # (K, L, C k k, P)
        go = g.reshape(k, n, g.shape[2], -1)  # (K, L, O, P)
        positions, out_ch, fan_in = go.shape[-1], go.shape[2], u.shape[2]
        bias_rows = go.sum(-1)
        if positions * (out_ch + fan_in) < out_ch * fan_in:  # the ghost norm is cheaper
            gram_u = torch.einsum("klcp,klcq->klpq", u, u)
            sq = (gram_u * torch.einsum("klop,kloq->klpq", go, go)).sum((2, 3))

            def weight_sum(c: Tensor) -> Tensor:
                return torch.einsum("kl,klop,klcp->koc", c, go, u).reshape(k, *module.weight.shape)

        else:
            grads = torch.einsum("klop,klcp->kloc", go, u)
            sq = grads.square().sum((2, 3))

            def weight_sum(c: Tensor) -> Tensor:
                return torch.einsum("kl,kloc->koc", c, grads).reshape(k, *module.weight.shape)

    else:  # GroupNorm
        normed = F.group_norm(a.flatten(0, 1), module.num_groups, eps=module.eps)
        normed = normed.reshape(k, n, module.num_channels, -1)
        go = g.reshape(k, n, module.num_channels, -1)
        weight_rows, bias_rows = (go * normed).sum(-1), go.sum(-1)  # (K, L, C)
        sq = weight_rows.square().sum(-1)

        def weight_sum(c: Tensor) -> Tensor:
            return torch.einsum("kl,klc->kc", c, weight_rows)

    if bias:
        sq = sq + bias_rows.square().sum(-1)

    def sums(c: Tensor) -> dict[str, Tensor]:
        out = {"weight": weight_sum(c)}
        if bias:
            out["bias"] = torch.einsum("kl,klo->ko", c, bias_rows)
        return out

    return sq, sums


def clip_factors(norms: Tensor, mask: Tensor, max_grad_norm: float, eps: float) -> Tensor:
    """Opacus's per-example scale ``min(1, C / (norm + eps))``, zero where `mask` is False."""
    return (max_grad_norm / (norms + eps)).clamp(max=1.0) * mask.to(norms.dtype)


def _clip(
    layers: dict[str, nn.Module],
    inputs: dict[str, Tensor],
    backprops: dict[str, Tensor],
    mask: Tensor,
    max_grad_norm: float,
    eps: float,
    dtype: torch.dtype,
) -> tuple[dict[str, Tensor], Tensor]:
    """Clipped sums (by parameter name) and norms from ``(K, L, ...)`` inputs and backprops."""
    terms = {
        name: _layer_terms(m, inputs[name].to(dtype), backprops[name].to(dtype))
        for name, m in layers.items()
    }
    norms = torch.stack([sq for sq, _ in terms.values()]).sum(0).sqrt()  # (K, L)
    factor = clip_factors(norms, mask, max_grad_norm, eps)
    out = {}
    for name, (_, sums) in terms.items():
        for leaf, value in sums(factor).items():
            out[f"{name}.{leaf}" if name else leaf] = value
    return out, norms


def clipped_sums(
    model: nn.Module,
    params: Params,
    x: Tensor,
    y: Tensor,
    mask: Tensor,
    max_grad_norm: float,
    eps: float,
    loss_fn: LossFn = F.cross_entropy,
    batched: bool | None = None,
) -> ClippedSums:
    """Each example's gradient clipped to `max_grad_norm` (L2 over all parameters), summed
    per client: ``sum_l min(1, C / (norm_l + eps)) grad_l`` over the examples `mask` marks.

    Parameters
    ----------
    model : nn.Module
        The architecture (its own weights are not used); `supports` must hold.
    params : dict of str to Tensor
        Stacked weights, each ``(K, *shape)``.
    x, y, mask : Tensor
        ``(K, L, *input_shape)`` inputs, ``(K, L)`` targets and ``(K, L)`` bool, True on
        real (sampled) examples.
    max_grad_norm : float
        Clipping norm C.
    eps : float
        Added to the norm before dividing (Opacus's 1e-6).
    loss_fn : callable, default cross-entropy
        Batch-mean loss, applied to each example's logits alone.
    batched : bool, optional
        All clients in one ``vmap`` (True) or one client at a time (False); by default
        one at a time on a CPU, batched elsewhere.

    Returns
    -------
    ClippedSums
        The sums in the order of `params`, the norms and the per-example losses.
    """
    layers = _layers(model)
    first = next(iter(params.values()))
    if batched is None:
        batched = first.device.type != "cpu"
    device_type = first.device.type
    if batched:
        inputs, backprops, losses = _capture_batched(model, layers, params, x, y, loss_fn)
        with torch.autocast(device_type, enabled=False):
            sums, norms = _clip(layers, inputs, backprops, mask, max_grad_norm, eps, first.dtype)
    else:
        parts = []
        for k in range(x.shape[0]):
            one = {n: p[k] for n, p in params.items()}
            inputs, backprops, losses = _capture_one(model, layers, one, x[k], y[k], loss_fn)
            with torch.autocast(device_type, enabled=False):
                parts.append(
                    (
                        *_clip(
                            layers,
                            {n: v[None] for n, v in inputs.items()},
                            {n: v[None] for n, v in backprops.items()},
                            mask[k : k + 1],
                            max_grad_norm,
                            eps,
                            first.dtype,
                        ),
                        losses[None],
                    )
                )
        sums = {n: torch.cat([p[0][n] for p in parts]) for n in parts[0][0]}
        norms = torch.cat([p[1] for p in parts])
        losses = torch.cat([p[2] for p in parts])
    return ClippedSums(sums={n: sums[n] for n in params}, norms=norms, losses=losses)


__all__ = ["ClippedSums", "clip_factors", "clipped_sums", "supports"]
