"""`fedkd.learner.stacked_cnn`: the zoo's CNNs written out for stacked clients compute what
``vmap`` over ``functional_call`` computes, values and gradients, on full-size MNIST inputs."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, vmap

from fedkd.learner.stacked_cnn import stacked_forward, stacked_grad_and_value, supports
from fedkd.models.zoo import build_model

SHAPE = (1, 28, 28)


def stacked_clients(arch, k, batch=5):
    """`arch`, K clients' different weights stacked, and their inputs, targets, row weights."""
    gen = torch.Generator().manual_seed(0)
    models = []
    for j in range(k):
        torch.manual_seed(j)
        models.append(build_model(arch, SHAPE, 10))
    params = {
        n: torch.stack([dict(m.named_parameters())[n].detach() for m in models])
        for n, _ in models[0].named_parameters()
    }
    x = torch.randn(k, batch, *SHAPE, generator=gen)
    y = torch.randint(0, 10, (k, batch), generator=gen)
    w = torch.rand(k, batch, generator=gen)
    return models[0], params, x, y, w


@pytest.mark.parametrize("arch", ["cnn_small", "cnn_small_tanh", "cnn_large"])
def test_logits_and_embeddings_are_vmaps(arch):
    model, params, x, _, _ = stacked_clients(arch, 3)
    got = stacked_forward(model, params, x, embed=True)  # draws the cached fixed projection
    want = vmap(lambda p, xb: functional_call(model, p, (xb,), {"embed": True}))(params, x)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stacked_forward(model, params, x), want[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("arch", "embed"), [("cnn_small", False), ("cnn_large", True)])
def test_gradients_and_losses_are_vmaps(arch, embed):
    """Each client's gradient of its own loss (weighted rows, and an embedding term)."""
    model, params, x, y, w = stacked_clients(arch, 4)

    def loss(out, embedding, yb, wb):
        value = (F.cross_entropy(out, yb, reduction="none") * wb).sum()
        return value + embedding.square().mean() if embed else value

    def reference(p, xb, yb, wb):
        if not embed:
            return loss(functional_call(model, p, (xb,)), None, yb, wb)
        out, embedding = functional_call(model, p, (xb,), {"embed": True})
        return loss(out, embedding, yb, wb)

    want_grads, want_losses = vmap(grad_and_value(reference))(params, x, y, w)
    grads, losses = stacked_grad_and_value(model, loss, embed)(params, x, y, w)
    torch.testing.assert_close(losses, want_losses, rtol=1e-5, atol=1e-6)
    assert grads.keys() == want_grads.keys()
    for n, g in want_grads.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-4, atol=1e-6)


def test_passes_of_a_few_clients_give_the_same_gradients():
    """`rows`: passes of 3 clients and then 1 (of 4), gradients in reused buffers; then the
    first 2 clients alone (as a step where the others have no batch left)."""
    model, params, x, y, w = stacked_clients("cnn_large", 4)

    def loss(out, embedding, yb, wb):
        return (F.cross_entropy(out, yb, reduction="none") * wb).sum()

    whole = stacked_grad_and_value(model, loss)
    in_passes = stacked_grad_and_value(model, loss, rows=3 * x.shape[1])
    for k in (4, 2):
        part = {n: p[:k] for n, p in params.items()}
        want_grads, want_losses = whole(part, x[:k], y[:k], w[:k])
        grads, losses = in_passes(part, x[:k], y[:k], w[:k])
        torch.testing.assert_close(losses, want_losses, rtol=1e-5, atol=1e-6)
        for n, g in want_grads.items():
            assert grads[n].shape == g.shape
            torch.testing.assert_close(grads[n], g, rtol=1e-4, atol=1e-6)


def test_pooling_before_the_relu_routes_gradients_as_the_model_does():
    """Windows of equal values (constant first-layer outputs: positive for client 0, negative
    for client 1): the gradients still reach the elements the model's own order picks."""
    model, params, x, y, w = stacked_clients("cnn_small", 2)
    params["features.0.weight"] = torch.zeros_like(params["features.0.weight"])
    params["features.0.bias"] = torch.stack([torch.full((8,), 0.5), torch.full((8,), -0.5)]).to(
        params["features.0.bias"].dtype
    )

    def loss(out, embedding, yb, wb):
        return (F.cross_entropy(out, yb, reduction="none") * wb).sum()

    def reference(p, xb, yb, wb):
        return loss(functional_call(model, p, (xb,)), None, yb, wb)

    want_grads, _ = vmap(grad_and_value(reference))(params, x, y, w)
    grads, _ = stacked_grad_and_value(model, loss)(params, x, y, w)
    for n, g in want_grads.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-4, atol=1e-6)
    assert want_grads["features.3.weight"][0].abs().sum() > 0


def test_supports_the_image_cnns_only():
    assert supports(build_model("cnn_large", SHAPE, 10))
    assert not supports(build_model("cnn_small", (1, 40), 10))  # 1-D convolutions
    assert not supports(build_model("mlp", SHAPE, 10))
    assert not supports(build_model("resnet_gn", SHAPE, 10))
