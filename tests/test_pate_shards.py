"""PATE teacher shards: one example more or fewer changes exactly one teacher's data."""

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

import fedkd.learner.cohort as cohort
from fedkd.data import load_federated_data
from fedkd.learner.cohort import CohortConfig, CohortLearner
from fedkd.learner.loop import OptimConfig, StepConfig
from fedkd.privacy.teacher_shards import teacher_assignment

TEACHERS = 5


@pytest.fixture(scope="module")
def data():
    return load_federated_data(source="digits", num_clients=2, proxy_size=50, seed=0)


def trained_shards(data, monkeypatch) -> list[Counter]:
    """The examples each of client 0's teachers trains on (as a multiset of example bytes),
    read off the real PATE path of the learner."""
    seen: list[Counter] = []

    def record(model, opt, x, y, step, gen, *args, **kwargs):
        seen.append(Counter(xi.tobytes() + bytes([int(yi)]) for xi, yi in zip(x, y, strict=True)))
        return {"loss": 0.0}

    monkeypatch.setattr(cohort, "train_supervised", record)
    step = StepConfig(epochs=1, batch_size=32, optim=OptimConfig())
    config = CohortConfig(seed=0, arch_of=lambda cid: "mlp", private=step, distill=step)
    CohortLearner(data, config, {}).shard_teacher_votes(1, [0], TEACHERS, data.proxy_x[:4])
    assert len(seen) == TEACHERS  # every teacher has examples
    return seen


def with_client0(data, x, y):
    client = replace(data.clients[0], x_train=x, y_train=y)
    return replace(data, clients=[client, *data.clients[1:]])


def changed(a: list[Counter], b: list[Counter]) -> list[int]:
    return [t for t in range(TEACHERS) if a[t] != b[t]]


def test_removing_or_adding_one_example_changes_exactly_one_teachers_shard(data, monkeypatch):
    client = data.clients[0]
    before = trained_shards(data, monkeypatch)
    for k in (0, 17, client.num_examples - 1):
        keep = np.delete(np.arange(client.num_examples), k)
        after = trained_shards(
            with_client0(data, client.x_train[keep], client.y_train[keep]), monkeypatch
        )
        [t] = changed(before, after)
        assert sum((before[t] - after[t]).values()) == 1 and not after[t] - before[t]
    # Adding one (a held-out example of the same client) likewise.
    x = np.concatenate([client.x_train, client.x_local_test[:1]])
    y = np.concatenate([client.y_train, client.y_local_test[:1]])
    after = trained_shards(with_client0(data, x, y), monkeypatch)
    [t] = changed(before, after)
    assert sum((after[t] - before[t]).values()) == 1 and not before[t] - after[t]


def test_assignment_is_per_example_and_roughly_balanced():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 8)).astype(np.float32)
    y = rng.integers(0, 10, 4000)
    teachers = teacher_assignment(x, y, 10, key=3)
    # An example's teacher does not depend on the others or on their order.
    order = rng.permutation(4000)
    assert np.array_equal(teacher_assignment(x[order], y[order], 10, key=3), teachers[order])
    assert np.array_equal(teacher_assignment(x[5:6], y[5:6], 10, key=3), teachers[5:6])
    # Balanced in expectation: 400 each, sd about 19.
    assert np.all(np.abs(np.bincount(teachers, minlength=10) - 400) < 100)
    # The key changes the split.
    assert not np.array_equal(teacher_assignment(x, y, 10, key=4), teachers)
