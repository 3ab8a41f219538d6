"""Per-sample norms and clipped sums from layer activations equal ``torch.func``'s, per layer
type of the zoo."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from fedkd.models.zoo import MODEL_NAMES, build_model
from fedkd.privacy import layer_grads
from fedkd.privacy import vectorised_dpsgd as vdp

K, L = 3, 6


def _stacked(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        n: torch.stack([p.detach() + 0.1 * torch.randn(p.shape, generator=gen) for _ in range(K)])
        for n, p in model.named_parameters()
    }


def _reference_norms(model, params, x, y):
    """Each example's gradient norm over all parameters: nested vmap of torch.func.grad."""

    def one(p, xi, yi):
        return nn.functional.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    grads = vmap(vmap(grad(one), in_dims=(None, 0, 0)))(params, x, y)
    return torch.stack([g.flatten(2).norm(dim=-1) for g in grads.values()], -1).norm(dim=-1)


class _SharedLinear(nn.Module):
    """A Linear over several positions of each example (``(L, T, in)`` inputs) and a Conv1d
    with stride and dilation: the closed forms' general branches."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3, stride=2, dilation=2, padding=1)
        self.per_position = nn.Linear(3, 4)
        self.out = nn.Linear(4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x)).transpose(1, 2)  # (L, T=4, 3)
        return self.out(torch.tanh(self.per_position(h)).flatten(1))


CASES = [(name, shape) for name in MODEL_NAMES for shape in [(1, 8, 8), (1, 40)]] + [
    ("cnn_small", (1, 28, 28)),  # per-example conv gradients materialised (P large)
]


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize(("name", "shape"), [*CASES, ("shared_linear", (2, 10))])
def test_norms_and_clipped_sums_equal_torch_func(name, shape, batched):
    torch.manual_seed(0)
    model = _SharedLinear() if name == "shared_linear" else build_model(name, shape, 10)
    classes = 5 if name == "shared_linear" else 10
    assert layer_grads.supports(model)
    params = _stacked(model, seed=1)
    x = torch.randn(K, L, *shape)
    y = torch.randint(0, classes, (K, L))
    mask = torch.ones(K, L, dtype=torch.bool)
    mask[1, 4:] = False
    norms = _reference_norms(model, params, x, y)
    clip = float(norms.median())  # clipping bites on about half of the examples
    ours = layer_grads.clipped_sums(model, params, x, y, mask, clip, vdp.CLIP_EPS, batched=batched)
    torch.testing.assert_close(ours.norms, norms, rtol=1e-4, atol=1e-6)
    grads, losses = vdp.per_sample_grads(model, params, x, y)
    expected = vdp.clip_and_sum(grads, mask, clip)
    assert list(ours.sums) == list(expected)  # the order noise is drawn in
    for n, value in expected.items():
        torch.testing.assert_close(ours.sums[n], value, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours.losses, losses, rtol=1e-5, atol=1e-6)


def test_unknown_layers_keep_nested_vmap(monkeypatch):
    torch.manual_seed(0)
    grouped = nn.Sequential(nn.Conv1d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(4 * 8, 3))
    embedded = nn.Sequential(nn.Embedding(5, 2), nn.Flatten(), nn.Linear(2 * 10, 3))
    assert not layer_grads.supports(grouped) and not layer_grads.supports(embedded)
    assert layer_grads.supports(nn.Sequential(nn.Flatten(), nn.ReLU(), nn.Linear(20, 3)))
    params = _stacked(grouped, seed=0)
    x, y = torch.randn(K, L, 2, 10), torch.randint(0, 3, (K, L))
    mask = torch.ones(K, L, dtype=torch.bool)
    ref = vdp.clip_and_sum(vdp.per_sample_grads(grouped, params, x, y)[0], mask, 1.0)

    def refused(*_):
        raise AssertionError("closed forms used on a grouped convolution")

    monkeypatch.setattr(layer_grads, "clipped_sums", refused)
    auto, _ = vdp.clipped_sum_and_losses(grouped, params, x, y, mask, 1.0)
    assert all(torch.equal(auto[n], ref[n]) for n in ref)
    with pytest.raises(ValueError, match="method"):
        vdp.clipped_sum_and_losses(grouped, params, x, y, mask, 1.0, method="hooks")


def test_a_layer_run_twice_is_refused():
    layer = nn.Linear(4, 4)
    twice = nn.Sequential(layer, nn.Tanh(), layer)
    params = _stacked(twice, seed=0)
    x, y = torch.randn(K, L, 4), torch.randint(0, 4, (K, L))
    with pytest.raises(ValueError, match="ran twice"):
        layer_grads.clipped_sums(twice, params, x, y, torch.ones(K, L, dtype=torch.bool), 1.0, 1e-6)
