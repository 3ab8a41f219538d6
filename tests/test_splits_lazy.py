"""Lazily built clients: the split keeps index arrays, a client's arrays are taken when used."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from fedkd.assembly import cohort_config, eval_test_indices, node_clients, node_data
from fedkd.data import ArrayDataset, build_federated_data, load_source
from fedkd.data.proxy import ProxySource
from fedkd.data.splits import ClientRows
from fedkd.faults import with_flipped_labels
from fedkd.learner.cohort import CohortLearner
from fedkd.spec import load_spec

PARTS = ("x_train", "y_train", "x_val", "y_val", "x_local_test", "y_local_test")

# Split settings, and the digest of every client's arrays (bytes, dtype, shape, contiguity) as
# the eager split of commit b280a6f gave them: the lazy arrays must be bit-identical.
CASES = {
    "dirichlet": (
        dict(num_clients=10, partition="dirichlet", alpha=0.3, proxy_size=200),
        "3e6eb6ee9493a193",
    ),
    "shards": (
        dict(num_clients=8, partition="shards", classes_per_client=2, proxy_size=100),
        "e4194b69b49d1f90",
    ),
    "validation": (
        dict(
            num_clients=6,
            partition="iid",
            proxy_size=100,
            validation_fraction=0.2,
            local_test_fraction=0.15,
            seed=3,
        ),
        "8f77c4b4525b5b2b",
    ),
    "proxy_validation": (
        dict(num_clients=5, alpha=1.0, proxy_size=300, proxy_validation_size=60, seed=1),
        "708f01d220b45e2b",
    ),
    "synthetic_proxy": (
        dict(
            num_clients=7,
            partition="iid",
            proxy_size=150,
            proxy=ProxySource(source="synthetic", synthetic="noise", size=64),
        ),
        "5d2c65a26700cff1",
    ),
}


def _digest(clients) -> str:
    h = hashlib.sha256()
    for c in clients:
        for part in PARTS:
            a = getattr(c, part)
            h.update(f"{part}{a.dtype}{a.shape}{a.flags.c_contiguous}".encode())
            h.update(a.tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("case", list(CASES))
def test_lazy_arrays_are_the_eager_ones(case: str) -> None:
    kwargs, eager_digest = CASES[case]
    ds = load_source("digits", seed=kwargs.get("seed", 0))
    data = build_federated_data(ds, **kwargs)
    rows = data.clients[0].rows
    assert rows is not None and rows.taken == 0  # nothing taken by the split itself
    assert _digest(data.clients) == eager_digest
    for c in data.clients:
        np.testing.assert_array_equal(c.x_train, ds.x_train[c.train_indices])
        np.testing.assert_array_equal(c.y_local_test, ds.y_train[c.local_test_indices])
        assert c.num_examples == len(c.y_train) == len(c.train_indices)


def test_cache_is_bounded_and_gives_the_same_values_again() -> None:
    x = np.arange(400, dtype=np.float32).reshape(100, 4)
    y = np.arange(100, dtype=np.int64)
    idx = [np.arange(i, 100, 10) for i in range(10)]  # 10 clients of 10 rows (160 bytes of x)
    rows = ClientRows(x, y, max_bytes=3 * 160)
    first = [rows.take(i, "x_train", idx[i]) for i in range(10)]
    assert rows.taken == 10 and rows.cached_clients() == {7, 8, 9}
    assert rows.take(9, "x_train", idx[9]) is first[9] and rows.taken == 10  # a hit
    again = rows.take(0, "x_train", idx[0])  # dropped: taken again, same values
    assert rows.taken == 11 and again is not first[0]
    np.testing.assert_array_equal(again, first[0])
    assert rows.take(0, "y_train", idx[0]).dtype == np.int64


class CountingArray(np.ndarray):
    """An array that counts how often rows are taken from it by an index array."""

    takes = 0

    def __getitem__(self, key):
        if isinstance(key, np.ndarray):
            CountingArray.takes += 1
        return np.asarray(super().__getitem__(key))


def test_ten_thousand_clients_take_no_arrays_until_used(monkeypatch) -> None:
    n, per_client = 10_000, 4
    # flwr-datasets' partitioners take minutes for 10,000 partitions: an IID split of our own.
    monkeypatch.setattr(
        "fedkd.data.splits._cached_partition",
        lambda labels, k, *a, **kw: np.array_split(
            np.random.default_rng(0).permutation(len(labels)), k
        ),
    )
    rng = np.random.default_rng(0)
    total = n * per_client + 100
    ds = ArrayDataset(
        name="tiny",
        x_train=rng.normal(size=(total, 1, 2, 2)).astype(np.float32).view(CountingArray),
        y_train=rng.integers(0, 3, total).astype(np.int64).view(CountingArray),
        x_test=np.zeros((5, 1, 2, 2), np.float32),
        y_test=np.zeros(5, np.int64),
        num_classes=3,
    )
    CountingArray.takes = 0
    data = build_federated_data(
        ds, num_clients=n, partition="iid", proxy_size=100, validation_fraction=0.25
    )
    sizes = [c.num_examples for c in data.clients]  # what placement reads: no arrays
    assert sizes == [len(c.train_indices) for c in data.clients] and min(sizes) == 2
    # The split takes the pool's labels (to partition them), the proxy set and its (empty)
    # validation slice, and no client's rows.
    assert CountingArray.takes == 5
    rows = data.clients[0].rows
    assert rows is not None and all(c.rows is rows for c in data.clients)
    assert rows.taken == 0 and rows.cached_clients() == set()
    client = data.clients[4321]
    np.testing.assert_array_equal(client.x_val, np.asarray(ds.x_train)[client.val_indices])
    assert CountingArray.takes == 6 and rows.cached_clients() == {4321}
    flipped = with_flipped_labels(data, [3, 5])  # only their training labels are taken
    assert CountingArray.takes == 8 and rows.cached_clients() == {3, 4321, 5}
    np.testing.assert_array_equal(flipped.clients[3].x_train, data.clients[3].x_train)
    np.testing.assert_array_equal(flipped.clients[3].y_train, (data.clients[3].y_train + 1) % 3)


def test_a_node_takes_only_its_hosted_clients_arrays() -> None:
    # A seed of its own: the per-process data cache holds a federation no other test touched.
    spec = load_spec(
        None,
        [
            "seed=20271",
            "clients.num_clients=12",
            "clients.clients_per_node=4",
            "data.validation_fraction=0.2",
        ],
    )
    node = {"partition-id": 1, "num-partitions": 3}
    hosted = node_clients(spec, node)
    data = node_data(spec, node)
    rows = data.clients[0].rows
    assert len(hosted) == 4 and rows is not None and rows.taken == 0
    learner = CohortLearner(data, cohort_config(spec), {})
    learner.train_private(1, hosted)
    learner.evaluate(hosted, eval_test_indices(spec, len(data.test_y)))
    assert rows.cached_clients() == set(hosted)
