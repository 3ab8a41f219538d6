"""`ParamSGD`, the loop learner's SGD: torch.optim.SGD's numbers and state format, no dynamo."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from fedkd.learner.functional_optim import ParamSGD
from fedkd.learner.loop import (
    OptimConfig,
    StepConfig,
    fit_batches,
    init_student,
    make_optimizer,
)
from fedkd.privacy.dpsgd import DpSgdSettings, train_dpsgd

ROOT = Path(__file__).resolve().parents[1]


def _model(seed: int = 0) -> nn.Module:
    return init_student("cnn_small", (1, 8, 8), 10, seed, 0, 0)


def _step(model: nn.Module, opt, x: torch.Tensor, y: torch.Tensor, skip: int | None) -> None:
    """One step on (x, y); parameter number `skip` gets no gradient (None) in it."""
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    if skip is not None:
        list(model.parameters())[skip].grad = None
    opt.step()


def _data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(16, 1, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)


def _saved(state_dict: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    return buf.getvalue()


def _assert_same(model_a, opt_a, model_b, opt_b) -> None:
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert list(sa["state"]) == list(sb["state"])  # same parameters, in the same order
    for i, entry in sa["state"].items():
        assert entry.keys() == sb["state"][i].keys()
        for key, value in entry.items():
            assert torch.equal(value, sb["state"][i][key])
    assert _saved(sa) == _saved(sb)


SETTINGS = [(0.0, 0.0), (0.9, 0.0), (0.0, 5e-4), (0.9, 5e-4)]


@pytest.mark.parametrize(("momentum", "weight_decay"), SETTINGS)
def test_param_sgd_is_torch_sgd_bit_for_bit(momentum, weight_decay):
    cfg = dict(lr=0.05, momentum=momentum, weight_decay=weight_decay)
    theirs, ours = _model(), _model()
    torch_opt = torch.optim.SGD(theirs.parameters(), **cfg)
    our_opt = ParamSGD(ours.parameters(), **cfg)
    # The first parameter has no gradient at the first step (its momentum buffer starts a step
    # late, after the others'), and the last none at the fourth.
    for t, skip in enumerate([0, None, None, 5, None]):
        x, y = _data(t)
        _step(theirs, torch_opt, x, y, skip)
        _step(ours, our_opt, x, y, skip)
        _assert_same(theirs, torch_opt, ours, our_opt)
    assert (len(our_opt.state_dict()["state"]) > 0) == (momentum != 0)


@pytest.mark.parametrize(("momentum", "weight_decay"), SETTINGS)
def test_states_load_both_ways_between_param_sgd_and_torch_sgd(momentum, weight_decay):
    cfg = dict(lr=0.05, momentum=momentum, weight_decay=weight_decay)
    for first, second in ((torch.optim.SGD, ParamSGD), (ParamSGD, torch.optim.SGD)):
        a = _model()
        opt_a = first(a.parameters(), **cfg)
        for t in range(2):
            _step(a, opt_a, *_data(t), skip=0 if t == 0 else None)
        # A fresh pair of each kind from `a`'s saved state (as a client's bytes are loaded).
        saved = _saved({"model": a.state_dict(), "opt": opt_a.state_dict()})
        loaded = torch.load(io.BytesIO(saved), weights_only=True)
        b, c = _model(1), _model(1)
        b.load_state_dict(loaded["model"])
        c.load_state_dict(loaded["model"])
        opt_b, opt_c = second(b.parameters(), **cfg), first(c.parameters(), **cfg)
        opt_b.load_state_dict(loaded["opt"])
        opt_c.load_state_dict(
            torch.load(io.BytesIO(saved), weights_only=True)["opt"]  # its own tensors
        )
        _assert_same(b, opt_b, c, opt_c)
        for t in range(2, 4):
            _step(b, opt_b, *_data(t), skip=None)
            _step(c, opt_c, *_data(t), skip=None)
            _assert_same(b, opt_b, c, opt_c)


def test_zero_grad_without_set_to_none_zeroes_as_torch_does():
    theirs, ours = _model(), _model()
    opts = torch.optim.SGD(theirs.parameters(), lr=0.1), ParamSGD(ours.parameters(), lr=0.1)
    for model, opt in zip((theirs, ours), opts, strict=True):
        nn.functional.cross_entropy(model(_data(0)[0]), _data(0)[1]).backward()
        opt.zero_grad(set_to_none=False)
    for pa, pb in zip(theirs.parameters(), ours.parameters(), strict=True):
        assert torch.equal(pa.grad, pb.grad) and not pb.grad.any() and not pb.grad.requires_grad


def test_param_sgd_refuses_a_state_it_cannot_step():
    model = _model()
    nesterov = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    with pytest.raises(ValueError, match="Nesterov"):
        ParamSGD(model.parameters(), lr=0.1, momentum=0.9).load_state_dict(nesterov.state_dict())


def test_make_optimizer_takes_param_sgd_only_where_it_is_exact_and_allowed():
    cpu = list(_model().parameters())
    assert isinstance(make_optimizer(cpu, OptimConfig()), ParamSGD)
    assert type(make_optimizer(cpu, OptimConfig(), torch_optimizer=True)) is torch.optim.SGD
    assert type(make_optimizer(cpu, OptimConfig(optimizer="adam"))) is torch.optim.Adam
    # Off the CPU, torch steps with its multi-tensor kernels: torch's own SGD there.
    meta = [torch.zeros(3, device="meta", requires_grad=True)]
    assert type(make_optimizer(meta, OptimConfig())) is torch.optim.SGD


def test_what_needs_a_torch_optimizer_says_so():
    model = _model()
    opt = make_optimizer(model.parameters(), OptimConfig())
    x, y = _data(0)
    cosine = StepConfig(batch_size=8, lr_schedule="cosine")
    with pytest.raises(TypeError, match="torch_optimizer=True"):
        fit_batches(
            model,
            opt,
            len(y),
            cosine,
            torch.Generator(),
            lambda idx: nn.functional.cross_entropy(model(x[idx]), y[idx]),
        )
    with pytest.raises(TypeError, match="torch_optimizer=True"):
        train_dpsgd(
            model,
            opt,
            x,
            y,
            epochs=1,
            batch_size=8,
            settings=DpSgdSettings(max_grad_norm=1.0, delta=1e-5, noise_multiplier=1.0),
            generator=torch.Generator(),
        )


# A loop client's first private training step, in a fresh interpreter.
FIRST_STEP = """
import sys
import numpy as np
from fedkd.learner.cohort import CohortLearner  # noqa: F401  (what a worker imports)
from fedkd.learner.loop import ClientState, OptimConfig, StepConfig, seeded_generator
from fedkd.learner.loop import train_supervised
state = ClientState.create(0, "cnn_small", (1, 28, 28), 10, 0, OptimConfig(), OptimConfig())
x = np.zeros((8, 1, 28, 28), dtype=np.float32)
y = np.zeros(8, dtype=np.int64)
train_supervised(state.model, state.private_opt, x, y, StepConfig(batch_size=8),
                 seeded_generator(0))
state.load_bytes(state.to_bytes())
print("torch._dynamo" in sys.modules)
"""


def test_a_loop_clients_training_step_does_not_import_dynamo():
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run(
        [sys.executable, "-c", FIRST_STEP], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["False"]
