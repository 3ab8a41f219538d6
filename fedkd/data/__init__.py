"""Data layer: sources to arrays, flwr-datasets partitions, proxy and test splits."""

from fedkd.data.partition import PARTITION_SCHEMES, partition_indices
from fedkd.data.sources import SOURCES, ArrayDataset, DataError, load_source
from fedkd.data.splits import (
    ClientData,
    FederatedData,
    build_federated_data,
    load_federated_data,
)

__all__ = [
    "PARTITION_SCHEMES",
    "SOURCES",
    "ArrayDataset",
    "ClientData",
    "DataError",
    "FederatedData",
    "build_federated_data",
    "load_federated_data",
    "load_source",
    "partition_indices",
]
