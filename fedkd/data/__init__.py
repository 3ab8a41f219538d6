"""Data layer: sources to arrays, flwr-datasets partitions, proxy and test splits, proxy sources.

``partition_indices`` is imported on first use: flwr-datasets takes seconds to import, and the
spec layer and a ClientApp that reads a cached partition need none of it.
"""

from typing import Any

from fedkd.data.proxy import PROXY_SOURCES, ProxySource
from fedkd.data.sources import SOURCES, ArrayDataset, DataError, load_source
from fedkd.data.splits import (
    ClientData,
    FederatedData,
    build_federated_data,
    load_federated_data,
)

PARTITION_SCHEMES = ("iid", "dirichlet", "shards")

__all__ = [
    "PARTITION_SCHEMES",
    "PROXY_SOURCES",
    "SOURCES",
    "ArrayDataset",
    "ClientData",
    "DataError",
    "FederatedData",
    "ProxySource",
    "build_federated_data",
    "load_federated_data",
    "load_source",
    "partition_indices",
]


def __getattr__(name: str) -> Any:
    if name == "partition_indices":
        from fedkd.data.partition import partition_indices

        return partition_indices
    raise AttributeError(f"module 'fedkd.data' has no attribute {name!r}")
