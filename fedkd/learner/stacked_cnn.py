"""The zoo's CNN written out for K stacked clients: grouped convolutions, batched matmuls.

``vmap`` over ``functional_call`` of a convolution runs torch's batching rule for it, a grouped
convolution over the clients' channels stacked, in a layout that oneDNN runs slowly on a CPU,
and ``vmap`` adds dispatch overhead to every operation of a small model. `stacked_forward`
computes the same function directly: the clients' activations are held as one batch of
``K * C`` channels in ``channels_last`` memory, each convolution is one grouped convolution
(``groups=K``) over it, activations and pooling act on it as they are (they treat every
channel alike), and each linear layer is one batched matmul over the client dimension. Its
backward pass is plain autograd. `stacked_grad_and_value` turns it into the step function of
the vectorised learner (the signature of ``vmap(grad_and_value(loss_fn))``), optionally in
passes of a few clients at a time: a stack's activations are K times a client's, and on a CPU
a pass whose activations outgrow the caches and the allocator's reuse of freed memory (each
step's tensors then come back as freshly mapped pages) costs more per row than several
smaller passes.

A ReLU followed by max pooling is computed as pooling followed by the ReLU, on a quarter of the
values: the two orders give the same outputs and the same gradients (the ReLU does not change
which element of a window is the largest where that element is positive, and its gradient is
zero where it is not).

`supports` says which models it covers: `fedkd.models.zoo.SimpleCNN` on images
(``cnn_small``, ``cnn_small_tanh``, ``cnn_large``); the learner keeps ``vmap`` for the others.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap

from fedkd.learner.functional_optim import num_clients
from fedkd.models.zoo import EMBEDDING_WIDTH, SimpleCNN, fixed_projection

Params = dict[str, Tensor]  # parameter name -> (K, *shape)
# (logits, embedding or None, targets, row weights) of one client -> its scalar loss.
OutputLoss = Callable[[Tensor, Tensor | None, Tensor, Tensor], Tensor]


def supports(model: nn.Module) -> bool:
    """Whether `stacked_forward` computes `model`: a `SimpleCNN` with 2-D convolutions."""
    return isinstance(model, SimpleCNN) and all(
        not isinstance(m, nn.Conv2d) or (m.groups == 1 and m.padding_mode == "zeros")
        for m in model.features
    ) and any(isinstance(m, nn.Conv2d) for m in model.features)  # fmt: skip


def _features(model: SimpleCNN, params: Params, x: Tensor) -> Tensor:
    """``(K, B, F)`` flattened features of ``(K, B, C, H, W)`` inputs."""
    k, n = x.shape[:2]
    # (B, K C, H, W): client j's channels are the j-th block of C, as groups=K expects.
    h = x.transpose(0, 1).reshape(n, -1, *x.shape[3:])
    h = h.contiguous(memory_format=torch.channels_last)
    layers = list(model.features.named_children())
    for i, (name, module) in enumerate(layers):
        if isinstance(module, nn.Conv2d):
            weight, bias = params[f"features.{name}.weight"], params.get(f"features.{name}.bias")
            h = F.conv2d(
                h,
                weight.flatten(0, 1),
                None if bias is None else bias.flatten(),
                module.stride,
                module.padding,
                module.dilation,
                groups=k,
            )
        elif _pool_first(layers, i):  # the pooling below, then this ReLU (module docstring)
            h = torch.relu(layers[i + 1][1](h))
        elif not _pool_first(layers, i - 1):  # activations and pooling: alike on every channel
            h = module(h)
    return h.reshape(n, k, -1).transpose(0, 1)


def _pool_first(layers: list[tuple[str, nn.Module]], i: int) -> bool:
    """Whether layer `i` is a ReLU that the max pooling right after it may precede."""
    return (
        0 <= i < len(layers) - 1
        and type(layers[i][1]) is nn.ReLU
        and isinstance(layers[i + 1][1], nn.MaxPool2d)
    )


def _linear(params: Params, name: str, h: Tensor) -> Tensor:
    """``(K, B, in) -> (K, B, out)``: each client's linear layer on its own rows.

    Computed transposed, ``(weight @ h^T)^T``: the weight's gradient then comes out of the
    backward pass in the weight's own (contiguous) layout, not as a transposed view that the
    optimizer's updates would read with strides.
    """
    weight, bias = params[f"{name}.weight"], params.get(f"{name}.bias")
    if bias is None:
        return torch.bmm(weight, h.transpose(1, 2)).transpose(1, 2)
    return torch.baddbmm(bias.unsqueeze(2), weight, h.transpose(1, 2)).transpose(1, 2)


def stacked_forward(
    model: nn.Module, params: Params, x: Tensor, embed: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """Each client's logits on its own inputs: what ``vmap(functional_call(model, ...))`` gives.

    Parameters
    ----------
    model : nn.Module
        The architecture (its own weights are not used); `supports` must hold.
    params : dict of str to Tensor
        Stacked weights, ``(K, *shape)`` per parameter name of `model`.
    x : Tensor
        ``(K, B, C, H, W)``: client k's batch is ``x[k]``.
    embed : bool, default False
        Also return the embeddings, as ``model(x, embed=True)`` does.

    Returns
    -------
    Tensor or tuple of Tensor
        ``(K, B, classes)`` logits, and with `embed` ``(K, B, EMBEDDING_WIDTH)`` embeddings.
    """
    assert isinstance(model, SimpleCNN)
    h = _features(model, params, x)
    layers = list(model.head.named_children())
    for name, module in layers[:-1]:
        if isinstance(module, nn.Linear):
            h = _linear(params, f"head.{name}", h)
        elif not isinstance(module, nn.Flatten):  # the features are flat already
            h = module(h)
    logits = _linear(params, f"head.{layers[-1][0]}", h)
    if not embed:
        return logits
    width = h.shape[-1]
    if width != EMBEDDING_WIDTH:  # as `EmbeddingOutput._output`
        h = h @ fixed_projection(width, h.device).to(h.dtype)
    return logits, h


def stacked_grad_and_value(
    model: nn.Module, loss: OutputLoss, embed: bool = False, rows: int | None = None
) -> Callable[[Params, Tensor, Tensor, Tensor], tuple[Params, Tensor]]:
    """A step function ``(params, x, targets, weights) -> (grads, losses)`` of K clients.

    It equals ``vmap(grad_and_value(f))`` for ``f(p, x, t, w) = loss(model(x), emb, t, w)``
    (with `model` called through ``functional_call``, its outputs as float): each client's
    gradient of its own loss, from a forward pass of `stacked_forward` and a backward pass of
    the summed losses (the clients' losses depend on their own weights only), over all K
    clients at once or, with `rows`, over a few clients at a time.

    Parameters
    ----------
    model : nn.Module
        The architecture; `supports` must hold.
    loss : callable
        One client's loss from its ``(B, classes)`` logits, ``(B, EMBEDDING_WIDTH)`` embeddings
        (None unless `embed`), targets and row weights; mapped over the clients by ``vmap``.
    embed : bool, default False
        Whether `loss` needs the embeddings.
    rows : int or None, default None
        At most this many input rows (clients times batch rows) per forward and backward pass:
        passes of ``rows // B`` clients (at least one). Their gradients are written into
        buffers that the step function keeps and reuses, so they are only valid until its next
        call (and the caller may overwrite them). None: one pass over all K clients, fresh
        gradients. The gradients do not depend on it.
    """
    per_client = vmap(loss, in_dims=(0, 0 if embed else None, 0, 0))
    buffers: Params = {}

    def one_pass(
        params: Params, x: Tensor, targets: Tensor, weights: Tensor
    ) -> tuple[Params, Tensor]:
        leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
        with torch.enable_grad():
            out = stacked_forward(model, leaves, x, embed)
            logits, embedding = (out[0].float(), out[1].float()) if embed else (out.float(), None)
            losses = per_client(logits, embedding, targets, weights)
            grads = torch.autograd.grad(losses.sum(), list(leaves.values()))
        return dict(zip(leaves, grads, strict=True)), losses.detach()

    def step(params: Params, x: Tensor, targets: Tensor, weights: Tensor) -> tuple[Params, Tensor]:
        k = x.shape[0]
        per_pass = k if rows is None else max(1, rows // max(1, x.shape[1]))
        if per_pass >= k:
            return one_pass(params, x, targets, weights)
        grads = _reused(buffers, params)
        losses = []
        for lo in range(0, k, per_pass):
            part = slice(lo, lo + per_pass)
            got, loss_part = one_pass(
                {n: p[part] for n, p in params.items()}, x[part], targets[part], weights[part]
            )
            for n, g in got.items():
                grads[n][part].copy_(g)
            losses.append(loss_part)
        return grads, torch.cat(losses)

    return step


def _reused(buffers: Params, like: Params) -> Params:
    """Views of `buffers` shaped like `like`, (re)allocated where a buffer is too small."""
    k = num_clients(like)
    for n, p in like.items():
        b = buffers.get(n)
        fits = b is not None and len(b) >= k and b.shape[1:] == p.shape[1:]
        if not fits or b.dtype != p.dtype or b.device != p.device:
            buffers[n] = torch.empty_like(p)
    return {n: buffers[n][:k] for n in like}


__all__ = ["OutputLoss", "stacked_forward", "stacked_grad_and_value", "supports"]
