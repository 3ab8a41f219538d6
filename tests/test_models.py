"""Tests for the student zoo: shapes, parameter counts, determinism, Opacus and torch.func."""

from __future__ import annotations

import copy

import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn
from torch.func import functional_call, grad, vmap

from fedkd.models import MODEL_NAMES, ModelError, build_model, count_parameters
from fedkd.models.zoo import SimpleCNN

MNIST = (1, 28, 28)
DIGITS = (1, 8, 8)
MNIST1D = (1, 40)
SHAPES = [MNIST, DIGITS, MNIST1D]
SHAPE_IDS = ["mnist", "digits", "mnist1d"]

# Same numbers as the table in fedkd/models/zoo.py's docstring, 10 classes.
EXPECTED_COUNTS = {
    "mlp": {MNIST: 199_210, DIGITS: 55_210, MNIST1D: 50_410},
    "cnn_small": {MNIST: 52_138, DIGITS: 6_058, MNIST1D: 11_386},
    "cnn_small_tanh": {MNIST: 52_138, DIGITS: 6_058, MNIST1D: 11_386},
    "cnn_large": {MNIST: 611_146, DIGITS: 58_186, MNIST1D: 128_746},
    "resnet_gn": {MNIST: 77_754, DIGITS: 77_754, MNIST1D: 28_506},
}


def _model(name: str, shape: tuple[int, ...], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name, shape, 10)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_shape_and_counts(name: str, shape: tuple[int, ...]) -> None:
    model = _model(name, shape)
    out = model(torch.randn(5, *shape))
    assert out.shape == (5, 10)
    assert torch.isfinite(out).all()
    assert count_parameters(model) == EXPECTED_COUNTS[name][shape]


def test_cnn_counts_on_mnist() -> None:
    small = count_parameters(build_model("cnn_small", MNIST, 10))
    large = count_parameters(build_model("cnn_large", MNIST, 10))
    # conv 1->8 (80) + conv 8->16 (1,168) + 784->64 (50,240) + 64->10 (650)
    assert small == 52_138
    # conv 1->16 (160) + conv 16->32 (4,640) + 1568->384 (602,496) + 384->10 (3,850)
    assert large == 611_146
    # FedAvg baseline upload must dwarf a 1000x10 logit matrix by far.
    assert large >= 550_000


def test_cnn_small_tanh_is_cnn_small_with_tanh() -> None:
    relu, tanh = _model("cnn_small", MNIST), _model("cnn_small_tanh", MNIST)
    # Same layers and, from the same seed, the same weights: only the activations differ.
    for (name_r, p_r), (name_t, p_t) in zip(
        relu.named_parameters(), tanh.named_parameters(), strict=True
    ):
        assert name_r == name_t
        assert torch.equal(p_r, p_t)
    acts = [type(m) for m in tanh.modules() if isinstance(m, (nn.ReLU, nn.Tanh))]
    assert acts == [nn.Tanh] * 3
    x = torch.randn(4, *MNIST)
    assert not torch.allclose(relu(x), tanh(x))


def test_unknown_activation() -> None:
    with pytest.raises(ModelError, match="unknown activation 'gelu'; choose one of relu, tanh"):
        SimpleCNN(MNIST, 10, widths=(8, 16), hidden=64, activation="gelu")


def test_count_parameters_ignores_frozen() -> None:
    model = build_model("mlp", DIGITS, 10)
    total = count_parameters(model)
    model.net[1].weight.requires_grad_(False)
    assert count_parameters(model) == total - 64 * 200


def test_unknown_model_name() -> None:
    with pytest.raises(ModelError) as info:
        build_model("vgg", DIGITS, 10)
    assert str(info.value) == (
        "unknown model 'vgg'; choose one of mlp, cnn_small, cnn_small_tanh, cnn_large, resnet_gn"
    )
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("shape", [(64,), (1, 1, 8, 8), (0, 8, 8)])
def test_bad_input_shape(shape: tuple[int, ...]) -> None:
    with pytest.raises(ModelError, match="input_shape"):
        build_model("mlp", shape, 10)


def test_input_too_small_for_cnn() -> None:
    with pytest.raises(ModelError, match="too small"):
        build_model("cnn_small", (1, 2, 2), 10)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_deterministic_init(name: str) -> None:
    a = _model(name, DIGITS, seed=3).state_dict()
    b = _model(name, DIGITS, seed=3).state_dict()
    c = _model(name, DIGITS, seed=4).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_dp_compatible(name: str, shape: tuple[int, ...]) -> None:
    model = _model(name, shape)
    assert ModuleValidator.validate(model, strict=True) == []
    for module in model.modules():
        assert not isinstance(module, nn.modules.batchnorm._BatchNorm)
        assert not getattr(module, "inplace", False), f"in-place module {module}"
    assert list(model.buffers()) == []


# Opacus' full backward hooks warn when the input does not require grad; harmless here.
@pytest.mark.filterwarnings("ignore:Full backward hook")
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_opacus_per_sample_grads(name: str, shape: tuple[int, ...]) -> None:
    # Shapes, and values against one backward pass per example: GroupNorm and residual adds are
    # where per-sample hooks would go wrong.
    batch = 3
    model = _model(name, shape)
    reference = copy.deepcopy(model)
    gsm = GradSampleModule(model, loss_reduction="sum")
    x = torch.randn(batch, *shape)
    y = torch.tensor([0, 3, 7])
    nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    samples = {}
    for pname, p in gsm.named_parameters():
        assert p.grad_sample is not None, pname
        assert p.grad_sample.shape == (batch, *p.shape), pname
        samples[pname.removeprefix("_module.")] = p.grad_sample
    for i in range(batch):
        reference.zero_grad()
        nn.functional.cross_entropy(reference(x[i : i + 1]), y[i : i + 1]).backward()
        for pname, p in reference.named_parameters():
            torch.testing.assert_close(samples[pname][i], p.grad, atol=1e-5, rtol=1e-4)


def test_vmap_functional_call_matches_separate_forwards() -> None:
    copies = [_model("cnn_small", DIGITS, seed=s) for s in range(3)]
    stacked = {
        name: torch.stack([dict(m.named_parameters())[name].detach() for m in copies])
        for name, _ in copies[0].named_parameters()
    }
    x = torch.randn(3, 6, *DIGITS)
    base = copies[0]

    def forward(params: dict[str, torch.Tensor], xb: torch.Tensor) -> torch.Tensor:
        return functional_call(base, params, (xb,))

    out = vmap(forward)(stacked, x)
    assert out.shape == (3, 6, 10)
    with torch.no_grad():
        for i, m in enumerate(copies):
            torch.testing.assert_close(out[i], m(x[i]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_vmap_per_sample_grad(name: str) -> None:
    # The vectorised learner takes per-sample grads as vmap(grad(functional_call)).
    model = _model(name, MNIST1D)
    params = {n: p.detach() for n, p in model.named_parameters()}
    x = torch.randn(4, *MNIST1D)
    y = torch.tensor([0, 1, 2, 3])

    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yi.unsqueeze(0))

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    model.zero_grad()
    nn.functional.cross_entropy(model(x[1:2]), y[1:2]).backward()
    for n, p in model.named_parameters():
        assert per_sample[n].shape == (4, *p.shape)
        torch.testing.assert_close(per_sample[n][1], p.grad, atol=1e-5, rtol=1e-4)
