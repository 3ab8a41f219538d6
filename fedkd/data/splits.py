"""Federated splits: public proxy set, per-client private data and local held-out slices.

The training split of a source is divided, reproducibly from one seed, into

- the proxy set: ``proxy_size`` examples drawn at random and removed from the pool, so that the
  public proxy inputs and the clients' private data are disjoint;
- one partition of the remaining pool per client (see :func:`fedkd.data.partition_indices`),
  each divided into a private training part, a validation slice (``validation_fraction``) and
  a local held-out slice (``local_test_fraction``), pairwise disjoint;
- optionally, a labelled validation slice of the proxy set (``proxy_validation_size``), taken
  out of the proxy inputs: the server student is selected on it and never trains on it.

With a proxy source other than in-domain (:mod:`fedkd.data.proxy`), ``proxy_size`` examples are
still set aside, unused, so that the clients' data are the same whatever the proxy; the proxy
inputs are the source's, and have no labels.

The source's test split is the global test set.

The split computes index arrays only: a client's arrays are taken from the source's when read
(:class:`ClientRows`, which keeps the recently used ones in a bounded cache), so that a process
pays for the clients it uses, not for the whole federation.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from fedkd.data.cache import cached_arrays
from fedkd.data.proxy import ProxySource, proxy_inputs
from fedkd.data.sources import ArrayDataset, DataError, load_source

# Distinct streams of one seed, so that changing e.g. proxy_size leaves client shuffles alone.
_PROXY_STREAM = 0
_CLIENT_STREAM = 1
_PROXY_VALIDATION_STREAM = 3  # (site.py uses 2)


def _cached_partition(labels: np.ndarray, num_clients: int, scheme: str, **kwargs) -> list:
    """:func:`fedkd.data.partition.partition_indices`, through the on-disk cache: a fresh
    process (a deployed ClientApp, one per message) then never imports flwr-datasets."""

    def compute() -> dict[str, np.ndarray]:
        from fedkd.data.partition import partition_indices  # the costly import, only on a miss

        parts = partition_indices(labels, num_clients, scheme, **kwargs)
        return {f"p{i}": part for i, part in enumerate(parts)}

    key = [
        np.ascontiguousarray(labels).astype(np.int64).tobytes(),
        repr((num_clients, scheme, sorted(kwargs.items()))),
    ]
    saved = cached_arrays("partition", key, compute, library="flwr-datasets")
    return [saved[f"p{i}"] for i in range(num_clients)]


def _empty_index() -> np.ndarray:
    return np.zeros(0, dtype=np.int64)


# How many bytes of materialised client arrays one federation's `ClientRows` keeps (least
# recently used first out): a round's sampled clients are used several times (train, logits,
# distill, evaluate), but a node need not keep every hosted client's arrays between rounds.
CLIENT_ROWS_CACHE_BYTES = 256 * 2**20

# Which index array each per-client array is taken at.
_INDICES_OF = {
    "x_train": "train_indices",
    "y_train": "train_indices",
    "x_val": "val_indices",
    "y_val": "val_indices",
    "x_local_test": "local_test_indices",
    "y_local_test": "local_test_indices",
}


class ClientRows:
    """The source arrays that lazily built clients take their rows from, and a bounded cache.

    A client's array is ``x[indices]`` (or ``y[indices]``), computed when first asked for and
    kept in a least-recently-used cache of at most `max_bytes` (beyond it, the oldest arrays
    are dropped and computed again when asked for: the same values, since the source does not
    change).

    Parameters
    ----------
    x, y : np.ndarray
        The source's training inputs and labels (shared, never copied as a whole).
    max_bytes : int, optional
        Most bytes of taken arrays kept; the newest array is kept whatever its size.

    Attributes
    ----------
    taken : int
        How many arrays were computed so far (cache misses): what a test counts.
    """

    def __init__(
        self, x: np.ndarray, y: np.ndarray, max_bytes: int = CLIENT_ROWS_CACHE_BYTES
    ) -> None:
        self.x, self.y = x, y
        self.max_bytes = max_bytes
        self.taken = 0
        self._cache: OrderedDict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # the server's thread and sweep points share clients

    def take(self, client_id: int, name: str, indices: np.ndarray) -> np.ndarray:
        """Client `client_id`'s array `name` (``x_train``, ``y_val``, ...) at `indices`.

        Parameters
        ----------
        client_id : int
            The client.
        name : str
            Which of its arrays; names starting with ``x`` are inputs, others labels.
        indices : np.ndarray
            Its rows in the source (a cached array is reused only for the same object).

        Returns
        -------
        np.ndarray
            ``x[indices]`` or ``y[indices]``: a new C-contiguous array, as fancy indexing gives.
        """
        key = (client_id, name)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] is indices:
                self._cache.move_to_end(key)
                return hit[1]
        rows = (self.x if name.startswith("x") else self.y)[indices]
        with self._lock:
            self.taken += 1
            old = self._cache.pop(key, None)
            if old is not None:
                self._bytes -= old[1].nbytes
            self._cache[key] = (indices, rows)
            self._bytes += rows.nbytes
            while self._bytes > self.max_bytes and len(self._cache) > 1:
                _, (_, dropped) = self._cache.popitem(last=False)
                self._bytes -= dropped.nbytes
        return rows

    def __getstate__(self) -> dict[str, Any]:  # pickled without its lock and cache
        state = dict(self.__dict__, _cache=OrderedDict(), _bytes=0)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def cached_clients(self) -> set[int]:
        """The clients with at least one array in the cache now."""
        with self._lock:
            return {cid for cid, _ in self._cache}


class _ClientArray:
    """A `ClientData` array field: the array it was given, else (a lazily built client) the
    client's rows taken from its `ClientRows` at the matching indices, on every access."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name, self.indices = name, _INDICES_OF[name]

    def __get__(self, obj: ClientData | None, owner: type | None = None) -> np.ndarray | None:
        if obj is None:
            return None  # the dataclass field's default
        value = obj.__dict__.get(self.name)
        if value is None and obj.rows is not None:
            return obj.rows.take(obj.client_id, self.name, getattr(obj, self.indices))
        return value

    def __set__(self, obj: ClientData, value: np.ndarray | None) -> None:
        obj.__dict__[self.name] = value


@dataclass
class ClientData:
    """One client's private data.

    Built either with its arrays, or lazily (`rows`): then it holds only its index arrays, and
    each array is taken from the source when read (`ClientRows`), with the values and dtype the
    eager arrays would have. ``dataclasses.replace`` gives a client with its arrays.

    Attributes
    ----------
    client_id : int
        Partition id, ``0 .. num_clients - 1``.
    x_train, y_train : np.ndarray
        Private training inputs and labels.
    x_local_test, y_local_test : np.ndarray
        The client's own held-out inputs and labels.
    train_indices, local_test_indices : np.ndarray
        Positions of these examples in the source's ``x_train`` (bookkeeping; what a lazily
        built client takes its rows at).
    x_val, y_val : np.ndarray or None
        The client's validation slice, for selecting rounds and hyperparameters; None (the
        default) means none, and becomes an empty slice shaped like ``x_train``.
    val_indices : np.ndarray
        Positions of the validation examples in the source's ``x_train`` (bookkeeping).
    rows : ClientRows or None
        Where a lazily built client's arrays come from; None when they were given.
    """

    client_id: int
    # Descriptor fields (default None): given arrays, else taken from `rows` when read.
    x_train: np.ndarray = _ClientArray()  # type: ignore[assignment]
    y_train: np.ndarray = _ClientArray()  # type: ignore[assignment]
    x_local_test: np.ndarray = _ClientArray()  # type: ignore[assignment]
    y_local_test: np.ndarray = _ClientArray()  # type: ignore[assignment]
    train_indices: np.ndarray = field(default_factory=_empty_index)
    local_test_indices: np.ndarray = field(default_factory=_empty_index)
    x_val: np.ndarray | None = _ClientArray()
    y_val: np.ndarray | None = _ClientArray()
    val_indices: np.ndarray = field(default_factory=_empty_index)
    rows: ClientRows | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.rows is not None:
            return
        missing = [
            k
            for k in ("x_train", "y_train", "x_local_test", "y_local_test")
            if self.__dict__.get(k) is None
        ]
        if missing:
            raise TypeError(f"ClientData: give {', '.join(missing)}, or rows to take them from")
        if self.x_val is None:
            self.x_val, self.y_val = self.x_train[:0], self.y_train[:0]

    def __repr__(self) -> str:  # the dataclass's would read (and so take) every array
        lazy = ", lazy" if self.rows is not None else ""
        return f"ClientData(client_id={self.client_id}, num_examples={self.num_examples}{lazy})"

    def replaced(self, **changes: Any) -> ClientData:
        """A copy with `changes` (as ``dataclasses.replace``), whose other arrays stay lazy.

        Parameters
        ----------
        **changes
            Fields to change, e.g. ``y_train``.

        Returns
        -------
        ClientData
            The copy; arrays not in `changes` are taken from `rows` when read, as here.
        """
        stored = {f.name: self.__dict__.get(f.name) for f in fields(self)}
        return ClientData(**{**stored, **changes})

    @property
    def num_examples(self) -> int:
        """Number of private training examples (a lazily built client's without its arrays)."""
        y = self.__dict__.get("y_train")
        return len(self.train_indices) if y is None else len(y)


@dataclass
class FederatedData:
    """A data set split for a federated run.

    Attributes
    ----------
    dataset_name : str
        Name of the source data set.
    num_classes : int
        Number of classes.
    input_shape : tuple of int
        Shape of one input, channels first.
    proxy_x : np.ndarray
        Unlabeled public proxy inputs, shape ``(proxy_size, *input_shape)``.
    proxy_y : np.ndarray or None
        Labels of the proxy inputs: for diagnostics only; never sent to clients. None for a
        proxy that is not in-domain, which has no labels.
    test_x, test_y : np.ndarray
        Global test set (the source's test split).
    clients : list of ClientData
        Per-client data, indexed by client id.
    proxy_indices : np.ndarray
        Positions of the proxy examples in the source's ``x_train`` (bookkeeping).
    input_mean, input_std : float
        The source's standardisation statistics (see :class:`fedkd.data.sources.ArrayDataset`).
    proxy_val_x, proxy_val_y : np.ndarray or None
        The proxy set's labelled validation slice, disjoint from ``proxy_x``: the server
        student is evaluated on it, never trained on it. None (the default) means none, and
        becomes an empty slice shaped like ``proxy_x``.
    proxy_val_indices : np.ndarray
        Positions of the validation slice in the source's ``x_train`` (bookkeeping).
    """

    dataset_name: str
    num_classes: int
    input_shape: tuple[int, ...]
    proxy_x: np.ndarray
    proxy_y: np.ndarray | None
    test_x: np.ndarray
    test_y: np.ndarray
    clients: list[ClientData]
    proxy_indices: np.ndarray = field(default_factory=_empty_index)
    input_mean: float = 0.0
    input_std: float = 1.0
    proxy_val_x: np.ndarray | None = None
    proxy_val_y: np.ndarray | None = None
    proxy_val_indices: np.ndarray = field(default_factory=_empty_index)

    def __post_init__(self) -> None:
        if self.proxy_val_x is None:
            self.proxy_val_x, self.proxy_val_y = self.proxy_x[:0], _empty_index()

    def pooled_train(self) -> tuple[np.ndarray, np.ndarray]:
        """All clients' private training data together (the centralised baseline).

        Returns
        -------
        tuple of np.ndarray
            Inputs and labels, concatenated in client order.
        """
        return (
            np.concatenate([c.x_train for c in self.clients]),
            np.concatenate([c.y_train for c in self.clients]),
        )


def build_federated_data(
    dataset: ArrayDataset,
    *,
    num_clients: int,
    partition: str = "dirichlet",
    alpha: float = 0.5,
    classes_per_client: int = 2,
    proxy_size: int = 500,
    local_test_fraction: float = 0.1,
    seed: int = 0,
    validation_fraction: float = 0.0,
    proxy_validation_size: int = 0,
    proxy: ProxySource | None = None,
) -> FederatedData:
    """Split a data set into a proxy set and per-client private data.

    Parameters
    ----------
    dataset : ArrayDataset
        The source data set.
    num_clients : int
        Number of clients.
    partition : str, optional
        Partition scheme, one of :data:`fedkd.data.PARTITION_SCHEMES`.
    alpha : float, optional
        Dirichlet concentration (``partition="dirichlet"``).
    classes_per_client : int, optional
        Classes per client (``partition="shards"``).
    proxy_size : int, optional
        Number of training examples set aside as the public proxy set; 0 for none.
    local_test_fraction : float, optional
        Fraction of each client's partition held out as its local test slice, in ``[0, 1)``;
        a client with at least 2 examples keeps at least one for testing and one for training.
    seed : int, optional
        Seed of the proxy draw, the partition and the local splits.
    validation_fraction : float, optional
        Fraction of each client's partition held out as its validation slice, in ``[0, 1)``
        with ``local_test_fraction + validation_fraction < 1``; a client keeps at least one
        training example. Taken from the training part: the local test slice stays the same
        examples whatever this fraction is.
    proxy_validation_size : int, optional
        Proxy examples (with labels) set aside as the server's validation slice and removed
        from the proxy inputs; 0 for none, else less than ``proxy_size``. The rest of the
        proxy set is the same whatever this size is. In-domain proxies only.
    proxy : ProxySource, optional
        Where the proxy inputs come from; None (the default) is in-domain. Another source
        gives ``proxy.size`` inputs (0: ``proxy_size``) and no labels; ``proxy_size``
        examples are still set aside.

    Returns
    -------
    FederatedData
        The split data; the same arguments give identical arrays.

    Raises
    ------
    DataError
        If a parameter is out of range for this data set.
    """
    if not _is_int(seed) or seed < 0:
        raise DataError(f"seed: expected a non-negative integer, got {seed!r}")
    pool_size = len(dataset.y_train)
    if not _is_int(proxy_size) or proxy_size < 0:
        raise DataError(f"data.proxy_size: expected a non-negative integer, got {proxy_size!r}")
    if proxy_size >= pool_size:
        raise DataError(
            f"data.proxy_size: {proxy_size} proxy examples would use up the training pool of "
            f"'{dataset.name}' ({pool_size} examples); use fewer than {pool_size}, leaving "
            "enough for the clients"
        )
    _check_fraction("data.local_test_fraction", local_test_fraction)
    _check_fraction("data.validation_fraction", validation_fraction)
    if local_test_fraction + validation_fraction >= 1:
        raise DataError(
            f"data.validation_fraction: with data.local_test_fraction it holds out "
            f"{local_test_fraction + validation_fraction:g} of each client's data; together "
            "they must stay below 1"
        )
    if not _is_int(proxy_validation_size) or not (
        proxy_validation_size == 0 or 0 < proxy_validation_size < proxy_size
    ):
        raise DataError(
            f"data.proxy_validation_size: expected 0 (none) or an integer below data.proxy_size "
            f"({proxy_size}), got {proxy_validation_size!r}"
        )
    external = proxy is not None and not proxy.in_domain
    if external and proxy_validation_size:
        raise DataError(
            f"data.proxy_validation_size: a proxy from proxy.source '{proxy.source}' has no "
            "labels to validate the server student on; set it to 0, or use the in_domain proxy"
        )

    proxy_rng = np.random.default_rng((seed, _PROXY_STREAM))
    proxy_idx = np.sort(proxy_rng.choice(pool_size, size=proxy_size, replace=False))
    pool_idx = np.setdiff1d(np.arange(pool_size), proxy_idx)
    # Drawn from a stream of its own, so that the pool and the partition stay the same.
    val_rng = np.random.default_rng((seed, _PROXY_VALIDATION_STREAM))
    proxy_val_idx = np.sort(val_rng.choice(proxy_idx, size=proxy_validation_size, replace=False))
    proxy_idx = np.setdiff1d(proxy_idx, proxy_val_idx)
    parts = _cached_partition(
        dataset.y_train[pool_idx],
        num_clients,
        partition,
        alpha=alpha,
        classes_per_client=classes_per_client,
        seed=seed,
    )

    # Index arrays only: a client's arrays are taken from the source when it is used.
    rows = ClientRows(dataset.x_train, dataset.y_train)
    clients = []
    for cid, part in enumerate(parts):
        idx = pool_idx[part]
        idx = idx[np.random.default_rng((seed, _CLIENT_STREAM, cid)).permutation(len(idx))]
        n_train, n_val, _ = held_out_counts(len(idx), local_test_fraction, validation_fraction)
        train_idx, val_idx, test_idx = np.split(idx, [n_train, n_train + n_val])
        clients.append(
            ClientData(
                client_id=cid,
                train_indices=train_idx,
                local_test_indices=test_idx,
                val_indices=val_idx,
                rows=rows,
            )
        )
    proxy_x, proxy_y = dataset.x_train[proxy_idx], dataset.y_train[proxy_idx]
    if external:
        proxy_x = proxy_inputs(proxy, dataset.input_shape, proxy.size or proxy_size, seed)
        proxy_y, proxy_idx = None, _empty_index()
    return FederatedData(
        dataset_name=dataset.name,
        num_classes=dataset.num_classes,
        input_shape=dataset.input_shape,
        proxy_x=proxy_x,
        proxy_y=proxy_y,
        test_x=dataset.x_test,
        test_y=dataset.y_test,
        clients=clients,
        proxy_indices=proxy_idx,
        input_mean=dataset.input_mean,
        input_std=dataset.input_std,
        proxy_val_x=dataset.x_train[proxy_val_idx],
        proxy_val_y=dataset.y_train[proxy_val_idx],
        proxy_val_indices=proxy_val_idx,
    )


def load_federated_data(
    *,
    source: str,
    path: str | None = None,
    hf_name: str | None = None,
    image_key: str | None = None,
    label_key: str | None = None,
    **split: Any,
) -> FederatedData:
    """Load a source and split it, cached per process.

    Client processes (Ray actors) call this every round; the first call computes, later calls
    with the same arguments return the same object. Treat the result as read-only: it is
    shared by every caller in the process.

    Parameters
    ----------
    source, path, hf_name, image_key, label_key
        As in :func:`fedkd.data.load_source`.
    **split
        The keyword arguments of :func:`build_federated_data` (``num_clients``, ``partition``,
        ...); ``seed`` also seeds the source.

    Returns
    -------
    FederatedData
        The split data.

    Raises
    ------
    DataError
        If the configuration is invalid.
    """
    # Sorted items: lru_cache keys on argument order, and keyword order varies by caller.
    return _load_federated_data_cached(
        source, path, hf_name, image_key, label_key, tuple(sorted(split.items()))
    )


@functools.lru_cache(maxsize=4)
def _load_federated_data_cached(
    source: str,
    path: str | None,
    hf_name: str | None,
    image_key: str | None,
    label_key: str | None,
    split: tuple[tuple[str, Any], ...],
) -> FederatedData:
    kwargs = dict(split)
    dataset = load_source(
        source,
        path=path,
        hf_name=hf_name,
        image_key=image_key,
        label_key=label_key,
        seed=kwargs.get("seed", 0),
    )
    return build_federated_data(dataset, **kwargs)


def held_out_counts(
    n: int, test_fraction: float, validation_fraction: float
) -> tuple[int, int, int]:
    """How a client's ``n`` shuffled examples divide into training, validation and local test.

    Parameters
    ----------
    n : int
        The client's examples.
    test_fraction, validation_fraction : float
        Fractions of ``n`` held out for the local test slice and the validation slice.

    Returns
    -------
    tuple of int
        ``(n_train, n_val, n_test)``, summing to ``n``: each slice asked for gets at least one
        example while at least one is left for training; the test slice's size does not depend
        on ``validation_fraction``.
    """
    n_test = _held_out(n, test_fraction)
    n_val = _held_out(n - n_test, validation_fraction, of=n)
    return n - n_test - n_val, n_val, n_test


def _held_out(available: int, fraction: float, of: int | None = None) -> int:
    """``fraction`` of ``of`` (default: ``available``), at least 1, leaving one of `available`."""
    if fraction <= 0 or available < 2:
        return 0
    return min(max(1, round(fraction * (available if of is None else of))), available - 1)


def _check_fraction(key: str, value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float | np.floating)
        or not 0 <= value < 1
    ):
        raise DataError(f"{key}: expected a number in [0, 1), got {value!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)
