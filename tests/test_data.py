"""Tests of the data layer: sources, flwr-datasets partitions, proxy and client splits."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from fedkd.data import (
    PARTITION_SCHEMES,
    SOURCES,
    ArrayDataset,
    DataError,
    FederatedData,
    build_federated_data,
    load_federated_data,
    load_source,
    partition_indices,
)
from fedkd.data.cache import MMAP_MIN_BYTES, _write_entry, cached_arrays
from tests.hf_folder import write_hf_split

MNIST_NPZ = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist.npz"


@pytest.fixture(scope="module")
def digits() -> ArrayDataset:
    return load_source("digits", seed=0)


@pytest.fixture(scope="module")
def mnist1d() -> ArrayDataset:
    return load_source("mnist1d", seed=0)


def _assert_normalised(ds: ArrayDataset, input_shape: tuple[int, ...], num_classes: int) -> None:
    assert ds.input_shape == input_shape
    assert ds.x_test.shape[1:] == input_shape
    assert ds.x_train.dtype == np.float32 and ds.x_test.dtype == np.float32
    assert ds.y_train.dtype == np.int64 and ds.y_test.dtype == np.int64
    assert ds.y_train.shape == (len(ds.x_train),) and ds.y_test.shape == (len(ds.x_test),)
    assert ds.num_classes == num_classes
    assert set(np.unique(ds.y_train)) == set(range(num_classes))
    assert abs(float(ds.x_train.mean())) < 1e-4
    assert abs(float(ds.x_train.std()) - 1.0) < 1e-4
    # The test split uses the training statistics, so it is only roughly standardised.
    assert abs(float(ds.x_test.mean())) < 0.2


# --------------------------------------------------------------------------------- sources


def test_sources_constant() -> None:
    assert SOURCES == ("digits", "mnist1d", "npz", "hf")


def test_digits(digits: ArrayDataset) -> None:
    _assert_normalised(digits, (1, 8, 8), 10)
    assert len(digits.y_train) + len(digits.y_test) == 1797
    assert len(digits.y_test) == 360
    # Stratified: every class keeps about 20 % of its examples for testing.
    counts_test = np.bincount(digits.y_test, minlength=10)
    counts_all = counts_test + np.bincount(digits.y_train, minlength=10)
    np.testing.assert_allclose(counts_test / counts_all, 0.2, atol=0.01)


def test_digits_split_follows_seed(digits: ArrayDataset) -> None:
    again = load_source("digits", seed=0)
    np.testing.assert_array_equal(again.x_train, digits.x_train)
    other = load_source("digits", seed=1)
    assert not np.array_equal(other.y_train, digits.y_train)


def test_mnist1d(mnist1d: ArrayDataset) -> None:
    _assert_normalised(mnist1d, (1, 40), 10)
    assert mnist1d.x_train.shape == (4000, 1, 40)
    assert mnist1d.x_test.shape == (1000, 1, 40)


def test_mnist1d_follows_seed_and_spares_global_rngs(monkeypatch: pytest.MonkeyPatch) -> None:
    import mnist1d.data

    seeds = []

    def fake_make_dataset(args: object) -> dict:
        # Like the real one: reseeds the global generators, then draws from them.
        seeds.append(args.seed)
        np.random.seed(args.seed)
        random.seed(args.seed)
        x = np.random.normal(size=(20, 40))
        return {"x": x[:15], "y": np.arange(15) % 10, "x_test": x[15:], "y_test": np.arange(5)}

    monkeypatch.setattr(mnist1d.data, "make_dataset", fake_make_dataset)
    np.random.seed(123)
    random.seed(123)
    expected = (np.random.random(), random.random())
    np.random.seed(123)
    random.seed(123)
    ds = load_source("mnist1d", seed=7)
    assert seeds == [7]
    assert (np.random.random(), random.random()) == expected
    assert ds.input_shape == (1, 40)


def test_npz_grayscale(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 256, size=(50, 6, 5), dtype=np.uint8)
    x_test = rng.integers(0, 256, size=(20, 6, 5), dtype=np.uint8)
    y_train = np.arange(50, dtype=np.uint8) % 4
    y_test = np.arange(20, dtype=np.uint8) % 4
    file = tmp_path / "tiny.npz"
    np.savez(file, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)

    ds = load_source("npz", path=str(file))
    _assert_normalised(ds, (1, 6, 5), 4)
    assert ds.name == "tiny"
    scaled = x_train / 255.0
    expected = (scaled - scaled.mean()) / scaled.std()
    np.testing.assert_allclose(ds.x_train[:, 0], expected, atol=1e-5)
    np.testing.assert_array_equal(ds.y_test, y_test)


def test_cache_maps_large_arrays_copy_on_write(tmp_path, monkeypatch) -> None:
    """Large arrays come back memory-mapped: equal, writable, and a write stays in the process
    (the entry on disk is unchanged); small arrays are read whole; an entry another process
    wrote first is kept; a damaged one is computed again and replaced."""
    monkeypatch.setenv("FEDKD_CACHE_DIR", str(tmp_path / "cache"))
    big = np.arange(MMAP_MIN_BYTES // 4 + 3, dtype=np.float32)
    small = np.array([1, 2, 3])
    calls = []

    def compute() -> dict[str, np.ndarray]:
        calls.append(1)
        return {"big": big, "small": small, "scalar": np.asarray(7)}

    first = cached_arrays("test", ["k"], compute, library="numpy")
    again = cached_arrays("test", ["k"], compute, library="numpy")
    assert len(calls) == 1
    assert isinstance(again["big"], np.memmap) and not isinstance(again["small"], np.memmap)
    for name in first:
        np.testing.assert_array_equal(again[name], first[name])
    again["big"][0] = -1.0
    assert cached_arrays("test", ["k"], compute, library="numpy")["big"][0] == 0.0
    # A second writer (the rename finds the entry there) neither fails nor replaces it.
    (entry,) = (tmp_path / "cache").iterdir()
    _write_entry(entry, {"other": small})
    assert sorted(p.name for p in entry.iterdir()) == ["big.npy", "scalar.npy", "small.npy"]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [entry.name]
    # A damaged entry is computed again and replaced.
    (entry / "small.npy").write_bytes(b"not an array")
    assert cached_arrays("test", ["k"], compute, library="numpy")["small"].tolist() == [1, 2, 3]
    assert len(calls) == 2
    cached_arrays("test", ["k"], compute, library="numpy")
    assert len(calls) == 2


def test_npz_is_standardised_once_and_reread_from_the_cache(tmp_path, monkeypatch) -> None:
    """Every process of a run loads the file: the standardised arrays come back from the
    cache, identical; a rewritten file is read again, never served stale."""
    monkeypatch.setenv("FEDKD_CACHE_DIR", str(tmp_path / "cache"))
    rng = np.random.default_rng(1)
    file = tmp_path / "tiny.npz"

    def write(high: int, n: int) -> None:
        x = rng.integers(0, high, size=(n, 6, 5), dtype=np.uint8)
        y = np.arange(n) % 3
        np.savez(file, x_train=x[:30], y_train=y[:30], x_test=x[30:], y_test=y[30:])

    write(256, 40)
    first = load_source("npz", path=str(file))
    assert [p.is_dir() for p in (tmp_path / "cache").glob("npz-*")] == [True]
    again = load_source("npz", path=str(file))
    for key in ("x_train", "y_train", "x_test", "y_test", "num_classes", "input_mean"):
        np.testing.assert_array_equal(getattr(again, key), getattr(first, key))
    assert again.x_train.dtype == np.float32 and again.y_train.dtype == np.int64
    write(16, 41)
    changed = load_source("npz", path=str(file))
    assert changed.input_mean != first.input_mean


def test_npz_channels_last_becomes_channels_first(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x_train = rng.normal(size=(30, 4, 5, 3)).astype(np.float32)
    x_test = rng.normal(size=(10, 4, 5, 3)).astype(np.float32)
    file = tmp_path / "rgb.npz"
    np.savez(
        file, x_train=x_train, y_train=np.arange(30) % 3, x_test=x_test, y_test=np.arange(10) % 3
    )
    ds = load_source("npz", path=str(file))
    assert ds.input_shape == (3, 4, 5)
    expected = (x_train - x_train.mean(dtype=np.float64)) / x_train.std(dtype=np.float64)
    np.testing.assert_allclose(ds.x_train, np.moveaxis(expected, -1, 1), atol=1e-5)


def test_npz_missing_file_names_data_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.npz"
    with pytest.raises(DataError, match=r"data\.path") as info:
        load_source("npz", path=str(missing))
    assert str(missing) in str(info.value)
    assert "x_train, y_train, x_test, y_test" in str(info.value)
    with pytest.raises(DataError, match=r"data\.path"):
        load_source("npz")


def test_npz_missing_keys_are_named(tmp_path: Path) -> None:
    file = tmp_path / "partial.npz"
    np.savez(file, x_train=np.zeros((4, 2, 2)), y_train=np.zeros(4, dtype=int))
    with pytest.raises(DataError, match=r"x_test, y_test"):
        load_source("npz", path=str(file))


@pytest.mark.skipif(not MNIST_NPZ.is_file(), reason=f"MNIST not found at {MNIST_NPZ}")
def test_mnist_npz() -> None:
    ds = load_source("npz", path=str(MNIST_NPZ))
    _assert_normalised(ds, (1, 28, 28), 10)
    assert ds.x_train.shape == (60000, 1, 28, 28)
    assert ds.x_test.shape == (10000, 1, 28, 28)


def test_unknown_source_lists_sources() -> None:
    with pytest.raises(DataError, match="digits, mnist1d, npz, hf"):
        load_source("cifar")


# ------------------------------------------------------------------------------ hf source


def test_hf_local_folder(hf_offline: Path) -> None:
    train_images = write_hf_split(hf_offline, "train", 300, seed=0)
    write_hf_split(hf_offline, "test", 60, seed=1)

    ds = load_source("hf", hf_name=str(hf_offline))
    _assert_normalised(ds, (1, 8, 8), 3)
    assert ds.x_train.shape == (300, 1, 8, 8) and ds.x_test.shape == (60, 1, 8, 8)
    # Order is kept and PIL images decode to the written pixels.
    scaled = train_images / 255.0
    np.testing.assert_allclose(ds.x_train[:, 0], (scaled - scaled.mean()) / scaled.std(), atol=1e-5)
    np.testing.assert_array_equal(ds.y_train, np.arange(300) % 3)


def test_hf_errors(hf_offline: Path) -> None:
    write_hf_split(hf_offline, "train", 40, seed=0)
    with pytest.raises(DataError, match=r"data\.hf_name.*'test'"):
        load_source("hf", hf_name=str(hf_offline))
    write_hf_split(hf_offline, "test", 10, seed=1)
    with pytest.raises(DataError, match=r"data\.image_key.*'pixels'"):
        load_source("hf", hf_name=str(hf_offline), image_key="pixels")
    with pytest.raises(DataError, match=r"data\.hf_name"):
        load_source("hf")


# ----------------------------------------------------------------------------- partitions


def _labels(n: int = 2000, num_classes: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, num_classes, size=n)


def _assert_disjoint_cover(parts: list[np.ndarray], n: int) -> None:
    everything = np.concatenate(parts)
    assert len(everything) == n
    np.testing.assert_array_equal(np.sort(everything), np.arange(n))


@pytest.mark.parametrize("scheme", PARTITION_SCHEMES)
def test_partition_reproducible_sorted_disjoint(scheme: str) -> None:
    labels = _labels()
    parts = partition_indices(labels, 8, scheme, seed=3)
    again = partition_indices(labels, 8, scheme, seed=3)
    assert len(parts) == 8
    for a, b in zip(parts, again, strict=True):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == np.int64 and len(a) > 0
        assert np.all(np.diff(a) > 0)  # sorted, no duplicates
    everything = np.concatenate(parts)
    assert len(np.unique(everything)) == len(everything)


def test_iid_covers_pool_evenly() -> None:
    labels = _labels(1003)
    parts = partition_indices(labels, 10, "iid", seed=0)
    _assert_disjoint_cover(parts, 1003)
    assert {len(p) for p in parts} <= {100, 101}
    # Random, not contiguous blocks.
    assert not np.array_equal(parts[0], np.arange(len(parts[0])))


def test_dirichlet_covers_pool_and_follows_seed() -> None:
    labels = _labels()
    parts = partition_indices(labels, 10, "dirichlet", alpha=0.5, seed=0)
    _assert_disjoint_cover(parts, len(labels))
    other = partition_indices(labels, 10, "dirichlet", alpha=0.5, seed=1)
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_dirichlet_alpha_controls_heterogeneity() -> None:
    labels = _labels(5000)

    def mean_tv(alpha: float) -> float:
        parts = partition_indices(labels, 10, "dirichlet", alpha=alpha, seed=0)
        overall = np.bincount(labels, minlength=10) / len(labels)
        dists = [np.bincount(labels[p], minlength=10) / len(p) for p in parts]
        return float(np.mean([0.5 * np.abs(d - overall).sum() for d in dists]))

    assert mean_tv(0.1) > 0.4
    assert mean_tv(100.0) < 0.1


def test_dirichlet_small_alpha_many_clients_on_mnist_sized_pool() -> None:
    labels = _labels(55000, seed=5)
    parts = partition_indices(labels, 20, "dirichlet", alpha=0.1, seed=0)
    _assert_disjoint_cover(parts, 55000)
    assert min(len(p) for p in parts) >= 10


# (50, 2): simulations/mnist_shards.toml's partition.
@pytest.mark.parametrize(("num_clients", "k"), [(5, 2), (10, 2), (3, 4), (20, 1), (4, 10), (50, 2)])
def test_shards_have_k_classes_and_use_every_class(num_clients: int, k: int) -> None:
    labels = _labels()
    parts = partition_indices(labels, num_clients, "shards", classes_per_client=k, seed=0)
    for p in parts:
        assert len(np.unique(labels[p])) == k
    # num_clients * k >= 10 in every case, so no class (and no example) is left out.
    _assert_disjoint_cover(parts, len(labels))


def test_shards_follow_seed() -> None:
    labels = _labels()
    a = partition_indices(labels, 5, "shards", classes_per_client=2, seed=0)
    b = partition_indices(labels, 5, "shards", classes_per_client=2, seed=1)
    classes_a = [tuple(np.unique(labels[p])) for p in a]
    classes_b = [tuple(np.unique(labels[p])) for p in b]
    assert classes_a != classes_b


def test_shards_warn_when_classes_are_left_out() -> None:
    labels = _labels()
    with pytest.warns(UserWarning, match="classes_per_client"):
        parts = partition_indices(labels, 2, "shards", classes_per_client=2, seed=0)
    assert len(np.unique(labels[np.concatenate(parts)])) == 4


def test_partition_errors() -> None:
    labels = _labels(100)
    with pytest.raises(DataError, match=r"data\.partition.*iid, dirichlet, shards"):
        partition_indices(labels, 4, "quantity")
    for alpha in (0.0, -1.0, float("nan")):
        with pytest.raises(DataError, match=r"data\.alpha"):
            partition_indices(labels, 4, "dirichlet", alpha=alpha)
    for k in (0, 11):
        with pytest.raises(DataError, match=r"data\.classes_per_client"):
            partition_indices(labels, 4, "shards", classes_per_client=k)
    with pytest.raises(DataError, match="num_clients"):
        partition_indices(labels, 101, "iid")
    with pytest.raises(DataError, match="num_clients"):
        partition_indices(labels, 0, "iid")


# --------------------------------------------------------------------------------- splits


def _build(ds: ArrayDataset, **overrides: object) -> FederatedData:
    kwargs: dict = {"num_clients": 6, "partition": "dirichlet", "proxy_size": 200, "seed": 0}
    kwargs.update(overrides)
    return build_federated_data(ds, **kwargs)


def test_splits_bookkeeping(digits: ArrayDataset) -> None:
    fd = _build(digits)
    n = len(digits.y_train)
    assert fd.dataset_name == "digits" and fd.num_classes == 10 and fd.input_shape == (1, 8, 8)
    assert fd.proxy_x.shape == (200, 1, 8, 8) and fd.proxy_y.shape == (200,)
    np.testing.assert_array_equal(fd.proxy_x, digits.x_train[fd.proxy_indices])
    np.testing.assert_array_equal(fd.proxy_y, digits.y_train[fd.proxy_indices])
    np.testing.assert_array_equal(fd.test_x, digits.x_test)

    assert len(fd.clients) == 6
    client_idx = []
    for cid, c in enumerate(fd.clients):
        assert c.client_id == cid
        assert len(c.y_local_test) >= 1
        assert c.num_examples == len(c.y_train) == len(c.x_train)
        np.testing.assert_array_equal(c.x_train, digits.x_train[c.train_indices])
        np.testing.assert_array_equal(c.y_local_test, digits.y_train[c.local_test_indices])
        assert abs(len(c.y_local_test) - 0.1 * (c.num_examples + len(c.y_local_test))) <= 1
        client_idx += [c.train_indices, c.local_test_indices]
    client_idx = np.concatenate(client_idx)
    # Proxy and clients are disjoint and together are the whole training split.
    assert len(np.intersect1d(client_idx, fd.proxy_indices)) == 0
    assert len(np.unique(client_idx)) == len(client_idx) == n - 200

    x, y = fd.pooled_train()
    local = sum(len(c.y_local_test) for c in fd.clients)
    assert len(x) == len(y) == n - 200 - local
    assert x.shape[1:] == (1, 8, 8)


def test_splits_proxy_rows_absent_from_clients(digits: ArrayDataset) -> None:
    # digits has no duplicate images, so equal rows mean the same example.
    assert len(np.unique(digits.x_train.reshape(len(digits.x_train), -1), axis=0)) == len(
        digits.x_train
    )
    fd = _build(digits, partition="iid", proxy_size=300)
    proxy_rows = {row.tobytes() for row in fd.proxy_x}
    x, _ = fd.pooled_train()
    client_rows = [row.tobytes() for c in fd.clients for row in (*c.x_train, *c.x_local_test)]
    assert len(client_rows) == len(x) + sum(len(c.y_local_test) for c in fd.clients)
    assert proxy_rows.isdisjoint(client_rows)


def test_splits_reproducible(digits: ArrayDataset) -> None:
    a, b = _build(digits, seed=4), _build(digits, seed=4)
    np.testing.assert_array_equal(a.proxy_x, b.proxy_x)
    for ca, cb in zip(a.clients, b.clients, strict=True):
        np.testing.assert_array_equal(ca.x_train, cb.x_train)
        np.testing.assert_array_equal(ca.y_local_test, cb.y_local_test)
    c = _build(digits, seed=5)
    assert not np.array_equal(a.proxy_indices, c.proxy_indices)


def test_splits_edge_sizes(digits: ArrayDataset) -> None:
    fd = _build(digits, proxy_size=0, local_test_fraction=0.0, partition="shards")
    assert fd.proxy_x.shape == (0, 1, 8, 8) and fd.proxy_y.shape == (0,)
    assert all(len(c.y_local_test) == 0 for c in fd.clients)
    assert len(fd.pooled_train()[1]) == len(digits.y_train)


def test_splits_errors(digits: ArrayDataset) -> None:
    n = len(digits.y_train)
    with pytest.raises(DataError, match=rf"data\.proxy_size.*{n}"):
        _build(digits, proxy_size=n)
    with pytest.raises(DataError, match=r"data\.proxy_size"):
        _build(digits, proxy_size=-1)
    with pytest.raises(DataError, match=r"data\.local_test_fraction"):
        _build(digits, local_test_fraction=1.0)
    with pytest.raises(DataError, match=r"data\.partition"):
        _build(digits, partition="random")


def test_load_federated_data_is_cached() -> None:
    kwargs = {"source": "digits", "num_clients": 3, "partition": "iid", "proxy_size": 50}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = load_federated_data(**kwargs)
    again = load_federated_data(proxy_size=50, partition="iid", num_clients=3, source="digits")
    assert again is first
    other = load_federated_data(**{**kwargs, "seed": 1})
    assert other is not first
    assert not np.array_equal(other.proxy_y, first.proxy_y) or not np.array_equal(
        other.proxy_x, first.proxy_x
    )


_LOAD_DIGITS = """
import sys
from fedkd.data import load_federated_data
data = load_federated_data(
    source="digits", num_clients=6, partition="dirichlet", alpha=0.3, seed=4
)
imported = "flwr_datasets" in sys.modules or "sklearn" in sys.modules
print(int(imported), ",".join(str(c.num_examples) for c in data.clients))
"""


def test_partitions_are_cached_across_processes(tmp_path: Path) -> None:
    """A second process (a ClientApp per message in deployment) reads the data set and the
    partition back without importing scikit-learn or flwr-datasets, and gets the same clients."""
    env = {**os.environ, "FEDKD_CACHE_DIR": str(tmp_path / "cache")}

    def load() -> tuple[str, str]:
        proc = subprocess.run(
            [sys.executable, "-c", _LOAD_DIGITS], env=env, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        imported, sizes = proc.stdout.split()
        return imported, sizes

    first, second = load(), load()
    assert first[0] == "1" and second[0] == "0"
    assert first[1] == second[1]
    cached = sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir())
    assert cached == ["digits", "partition"]
    # Identical to the partition this process computes (its cache folder is another one).
    fresh = load_federated_data(
        source="digits", num_clients=6, partition="dirichlet", alpha=0.3, seed=4
    )
    assert ",".join(str(c.num_examples) for c in fresh.clients) == first[1]
