"""Split a labelled pool among clients with flwr-datasets partitioners.

The labels are wrapped in a ``datasets.Dataset`` (a ``label`` column and the position of each
example), handed to the partitioner the way ``FederatedDataset`` would, and each partition is
read back as positions into the labels.
"""

from __future__ import annotations

import warnings

import datasets
import numpy as np
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    Partitioner,
    PathologicalPartitioner,
)

from fedkd.data import PARTITION_SCHEMES
from fedkd.data.sources import DataError

_LABEL = "label"
_INDEX = "index"


class _CoveringPathologicalPartitioner(PathologicalPartitioner):
    """``PathologicalPartitioner`` whose class assignment uses every class when it can.

    flwr-datasets' own assignment modes use every class only when ``num_partitions >=
    num_classes`` ("first-deterministic") or ``num_partitions + k - 1 >= num_classes``
    ("deterministic"); 5 clients with 2 classes each on 10 classes would leave data out. Here
    partition ``p`` gets ``k`` consecutive classes of a seeded random cyclic order of the classes,
    the windows' starts spread evenly around the cycle, so every class is used whenever
    ``num_partitions * k >= num_classes``. How each class's examples are divided among the
    partitions that hold it is flwr-datasets' own code.
    """

    def _determine_partition_id_to_unique_labels(self) -> None:
        self._unique_labels = sorted(self.dataset.unique(self._partition_by))
        num_unique = len(self._unique_labels)
        k = self._num_classes_per_partition
        if k > num_unique:
            raise ValueError(
                f"num_classes_per_partition={k} exceeds the {num_unique} classes present"
            )
        order = self._rng.permutation(num_unique)
        for pid in range(self._num_partitions):
            start = pid * num_unique // self._num_partitions
            self._partition_id_to_unique_labels[pid] = [
                self._unique_labels[order[(start + i) % num_unique]] for i in range(k)
            ]


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    scheme: str,
    *,
    alpha: float = 0.5,
    classes_per_client: int = 2,
    seed: int = 0,
) -> list[np.ndarray]:
    """Partition examples among clients.

    Parameters
    ----------
    labels : np.ndarray
        Integer labels of the pool, shape ``(N,)``.
    num_partitions : int
        Number of partitions (clients), at most ``N``.
    scheme : str
        One of :data:`PARTITION_SCHEMES`:

        - ``"iid"``: equal-size random partitions (``IidPartitioner`` on the shuffled pool).
        - ``"dirichlet"``: per-class proportions drawn from ``Dir(alpha)``
          (``DirichletPartitioner``); every partition gets at least
          ``max(1, min(10, N // (2 * num_partitions)))`` examples.
        - ``"shards"``: each partition holds exactly ``classes_per_client`` classes
          (``PathologicalPartitioner`` with a class assignment that uses every class whenever
          ``num_partitions * classes_per_client >= num_classes``; otherwise the examples of the
          unused classes are left out, with a warning).
    alpha : float, optional
        Dirichlet concentration (``"dirichlet"`` only); smaller is more heterogeneous.
    classes_per_client : int, optional
        Classes per partition (``"shards"`` only).
    seed : int, optional
        Seed of the shuffle and of the partitioner; the same seed gives the same partitions.

    Returns
    -------
    list of np.ndarray
        ``num_partitions`` sorted ``int64`` arrays of positions into ``labels``; disjoint.

    Raises
    ------
    DataError
        If the scheme is unknown or its parameters are impossible for these labels.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(
            f"labels: expected a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}"
        )
    n = len(labels)
    if scheme not in PARTITION_SCHEMES:
        raise DataError(
            f"data.partition: unknown scheme {scheme!r}; choose one of "
            f"{', '.join(PARTITION_SCHEMES)}"
        )
    if not _is_int(num_partitions) or num_partitions < 1:
        raise DataError(f"clients.num_clients: expected a positive integer, got {num_partitions!r}")
    if num_partitions > n:
        raise DataError(
            f"clients.num_clients: {num_partitions} clients but only {n} examples to share; use at "
            f"most {n} clients"
        )
    if not _is_int(seed) or seed < 0:
        raise DataError(f"seed: expected a non-negative integer, got {seed!r}")

    num_classes = len(np.unique(labels))
    if scheme == "iid":
        partitioner: Partitioner = IidPartitioner(num_partitions=num_partitions)
    elif scheme == "dirichlet":
        if isinstance(alpha, bool) or not isinstance(alpha, int | float | np.number):
            raise DataError(f"data.alpha: expected a positive number, got {alpha!r}")
        if not np.isfinite(alpha) or alpha <= 0:
            raise DataError(
                f"data.alpha: must be a positive finite number, got {alpha!r} (0.1 is very "
                "heterogeneous, 100 nearly IID)"
            )
        min_size = max(1, min(10, n // (2 * num_partitions)))
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by=_LABEL,
            alpha=float(alpha),
            min_partition_size=min_size,
            seed=seed,
        )
    else:
        if not _is_int(classes_per_client) or not 1 <= classes_per_client <= num_classes:
            raise DataError(
                f"data.classes_per_client: must be an integer in [1, {num_classes}] (the "
                f"number of classes in the pool), got {classes_per_client!r}"
            )
        if num_partitions * classes_per_client < num_classes:
            warnings.warn(
                f"data.classes_per_client: {num_partitions} clients x {classes_per_client} "
                f"classes use only {num_partitions * classes_per_client} of {num_classes} "
                "classes; the examples of the other classes go to no client",
                UserWarning,
                stacklevel=2,
            )
        partitioner = _CoveringPathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by=_LABEL,
            num_classes_per_partition=int(classes_per_client),
            seed=seed,
        )

    # Shuffled first, as FederatedDataset(shuffle=True) does: IidPartitioner takes contiguous
    # shards. Permuting the arrays rather than calling Dataset.shuffle avoids an indices mapping,
    # under which datasets 4 reads a column row by row (partitioners call np.array on columns).
    order = np.random.default_rng(seed).permutation(n)
    partitioner.dataset = datasets.Dataset.from_dict(
        {_LABEL: labels[order].astype(np.int64), _INDEX: order.astype(np.int64)}
    )
    with warnings.catch_warnings():
        # DirichletPartitioner warns on every resampling towards min_partition_size; running out
        # of tries raises, and is reported below.
        warnings.filterwarnings("ignore", message="The specified min_partition_size")
        # Covered by the clearer warning above.
        warnings.filterwarnings("ignore", message=r"Classes: .* will NOT be used")
        try:
            parts = [
                partitioner.load_partition(pid).with_format("numpy")[:][_INDEX]
                for pid in range(num_partitions)
            ]
        except ValueError as err:
            raise _explain(err, scheme, n, num_partitions, alpha, classes_per_client) from err
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _explain(
    err: ValueError, scheme: str, n: int, num_partitions: int, alpha: float, k: int
) -> DataError:
    if scheme == "dirichlet":
        return DataError(
            f"data.alpha: Dirichlet partitioning of {n} examples into {num_partitions} clients "
            f"with alpha={alpha} left a client (nearly) empty in every try; increase data.alpha "
            f"or use fewer clients ({err})"
        )
    if scheme == "shards":
        return DataError(
            f"data.classes_per_client: cannot give {num_partitions} clients {k} classes each "
            f"from {n} examples; use fewer clients or fewer classes per client ({err})"
        )
    return DataError(f"data.partition: {scheme} partitioning failed ({err})")


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)
