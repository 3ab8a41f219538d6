"""The generator proxy (``proxy.synthetic = "generator"``, fedkd.learner.generator): clients
remake the server's inputs from the shipped weights, the generator's training moves its data-free
terms the expected way, and a run with it completes and records it."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from fedkd.apps import wire
from fedkd.data import ProxySource
from fedkd.learner.generator import (
    GENERATOR_PREFIX,
    LATENTS,
    ProxyGenerator,
    generated_inputs,
    generator_losses,
    payload_proxy_inputs,
)
from fedkd.learner.loop import init_student, seeded_generator
from fedkd.spec import SpecError, load_spec

SHAPE = (1, 8, 8)
GENERATOR = ProxySource(source="synthetic", synthetic="generator", generator_steps=30)


def _generator(proxy: ProxySource = GENERATOR, size: int = 40) -> ProxyGenerator:
    return ProxyGenerator(proxy, SHAPE, 3, size, init_student("mlp", SHAPE, 10, 3, -1))


def test_clients_remake_the_servers_inputs_bit_for_bit_from_the_shipped_weights() -> None:
    server = _generator()
    payload = server.payload(2)
    x = server.inputs(payload)
    assert x.shape == (40, *SHAPE) and x.dtype == np.float32 and np.isfinite(x).all()
    # Each input is standardised over its own elements.
    np.testing.assert_allclose(x.reshape(40, -1).mean(axis=1), 0, atol=1e-5)
    np.testing.assert_allclose(x.reshape(40, -1).std(axis=1), 1, atol=1e-4)
    # Through the wire, as a node receives the round's payload.
    received = wire.from_array_record(wire.to_array_record(payload))
    np.testing.assert_array_equal(generated_inputs(received, SHAPE), x)
    idx = np.array([3, 0, 17], dtype=np.int32)
    data = type("Data", (), {"input_shape": SHAPE, "proxy_x": np.empty((0, *SHAPE))})()
    np.testing.assert_array_equal(
        payload_proxy_inputs(data, {**received, "proxy_idx": idx}), x[idx]
    )
    # Another round draws other latents; a fresh server of the same seed the same weights.
    assert not np.array_equal(server.inputs(server.payload(3)), x)
    np.testing.assert_array_equal(_generator().inputs(payload), x)
    weights = [k for k in payload if k.startswith(GENERATOR_PREFIX)]
    assert weights and set(payload) == {*weights, LATENTS}


def _biased_student() -> torch.nn.Module:
    """A toy student that calls almost every input class 0."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    with torch.no_grad():
        student[1].bias[0] += 4
    return student


def _terms(server: ProxyGenerator, student: torch.nn.Module) -> dict[str, float]:
    z = torch.randn(256, GENERATOR.latent_dim, generator=seeded_generator(7))
    with torch.no_grad():
        x = server.model(z)
        return {k: float(v) for k, v in generator_losses(student(x), server._earlier(x)).items()}


def test_training_changes_the_generator_and_balances_the_students_predictions() -> None:
    student = _biased_student()
    server = ProxyGenerator(GENERATOR, SHAPE, 3, 40, student)
    before_weights, before = server.payload(1), _terms(server, student)
    reported = server.train(1, student)
    after_weights, after = server.payload(2), _terms(server, student)
    moved = [k for k in before_weights if k.startswith(GENERATOR_PREFIX)]
    assert any(not np.array_equal(before_weights[k], after_weights[k]) for k in moved)
    # The batch-mean prediction's entropy rises: the inputs now cover other classes too.
    assert after["balance"] > before["balance"] + 0.5
    assert set(reported) == {"generator_confidence", "generator_balance", "generator_disagreement"}
    # The student itself is untouched, and the next call's earlier student is a copy of it.
    assert all(p.grad is None for p in student.parameters())
    for mine, kept in zip(student.parameters(), server._earlier.parameters(), strict=True):
        assert torch.equal(mine, kept) and not kept.requires_grad
    # With the confidence term alone, the student grows surer on the generated inputs.
    alone = dataclasses.replace(GENERATOR, generator_balance=0.0, generator_disagreement=0.0)
    server = ProxyGenerator(dataclasses.replace(alone, generator_batch=16), SHAPE, 3, 40, student)
    unbalanced = _biased_student()
    with torch.no_grad():
        unbalanced[1].bias[0] -= 4  # a student unsure everywhere
    before = _terms(server, unbalanced)
    server.train(1, unbalanced)
    assert _terms(server, unbalanced)["confidence"] < before["confidence"]


def test_without_steps_the_generator_stays_at_its_seeded_initialisation() -> None:
    server = _generator(dataclasses.replace(GENERATOR, generator_steps=0))
    before = server.payload(1)
    assert server.train(1, init_student("mlp", SHAPE, 10, 4, 0)) == {}
    after = server.payload(1)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def _refusal(overrides: list[str]) -> str:
    with pytest.raises(SpecError) as err:
        load_spec(None, ["proxy.source=synthetic", "proxy.synthetic=generator", *overrides])
    return str(err.value)


def test_spec_refuses_what_the_generator_cannot_serve() -> None:
    assert _refusal(["algorithm.name=fd"]).startswith("proxy.synthetic: 'generator' feeds")
    assert _refusal(["algorithm.name=pate"]).startswith("proxy.synthetic: 'generator' feeds")
    assert _refusal(["server.student=''"]).startswith("proxy.synthetic: 'generator' trains")
    assert _refusal(["server.distill_on=seen"]).startswith("server.distill_on: 'seen'")
    assert _refusal(["server.confident_fraction=0.3"]).startswith("server.confident_fraction")
    assert _refusal(["audit.enabled=true"]).startswith("audit.enabled: the audit replays")
    assert _refusal(["proxy.latent_dim=0"]).startswith("proxy.latent_dim: must be > 0")
    for algorithm in ("dsfl", "fedmd", "feddf", "relation"):
        load_spec(
            None,
            ["proxy.source=synthetic", "proxy.synthetic=generator", f"algorithm.name={algorithm}"],
        )


@pytest.mark.parametrize("algorithm", ["feddf", "dsfl"])
def test_a_run_with_the_generator_proxy_completes_and_records_it(tmp_path, algorithm) -> None:
    from fedkd.apps.client_app import make_client_app
    from fedkd.apps.server_app import run_rounds
    from fedkd.results import RunRecorder
    from tests.inprocess import InProcessGrid

    tiny = ["rounds=2", "clients.num_clients=3", "data.proxy_size=100", "train.epochs=1"]
    generator = [
        "proxy.source=synthetic",
        "proxy.synthetic=generator",
        "proxy.size=60",
        "proxy.generator_steps=5",
        "distill.proxy_per_round=40",
    ]
    spec = load_spec(None, [*tiny, *generator, "distill.epochs=1", f"algorithm.name={algorithm}"])
    grid = InProcessGrid(make_client_app(spec), spec.num_nodes)
    run_rounds(grid, spec, RunRecorder(tmp_path / "run", spec))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["proxy"] == {
        "source": "synthetic",
        "synthetic": "generator",
        "latent_dim": 64,
        "generator_hidden": 128,
        "generator_steps": 5,
        "generator_lr": 0.001,
        "generator_batch": 64,
        "generator_balance": 5.0,
        "generator_disagreement": 1.0,
        "size": 60,
    }
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        for key in ("server_test_acc", "client_test_acc_mean", "generator_balance"):
            assert math.isfinite(row[key]), (key, row[key])
        assert row["teacher_proxy_acc"] is None
    # The generator's weights travel with every training request and every digest, counted.
    student = init_student("mlp", SHAPE, 10, 0, 0)  # the generator's init does not depend on it
    weights = ProxyGenerator(spec.proxy, SHAPE, spec.seed, 60, student).payload(1)
    g_bytes = wire.payload_bytes(weights)
    sent = [wire.parse_request(m.content)[1] for m in grid.sent if "payload" in m.content]
    plans = [a for a in sent if LATENTS in a]
    digests = [a for a in sent if wire.DIGEST_PREFIX + LATENTS in a]
    assert plans and digests
    first = next(a for a in plans if a[LATENTS][0] == weights[LATENTS][0])
    for key in weights:
        np.testing.assert_array_equal(first[key], weights[key])  # round 1: the seeded init
    assert rows[0]["bytes_down"] >= 2 * 3 * g_bytes  # plan and digest, to 3 clients
