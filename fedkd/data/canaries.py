"""Canaries for the one-run privacy audit, drawn and inserted into a client's private data.

The canaries are synthetic: uniform noise inputs within the client's input range with uniform
random labels. They touch no real example, so no other client, proxy or test metric is
contaminated, and a non-private student memorises them readily. Each is included in the audited
client's data independently with probability 1/2; `fedkd.audit.canary` scores them after the run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from fedkd.data.splits import ClientData, FederatedData

__all__ = ["CanarySet", "make_canaries", "real_examples", "with_canaries"]

# Seed stream of the canaries, apart from the data's own streams (0, 1).
_CANARY_STREAM = 101


@dataclass(frozen=True)
class CanarySet:
    """The canaries of one audited client.

    Attributes
    ----------
    x : np.ndarray
        Inputs, ``(m, *input_shape)`` float32.
    y : np.ndarray
        Labels, ``(m,)`` int64.
    included : np.ndarray
        ``(m,)`` bool: the canaries inserted into the client's private data.
    """

    x: np.ndarray
    y: np.ndarray
    included: np.ndarray

    @property
    def m(self) -> int:
        """Number of canaries."""
        return len(self.y)


def make_canaries(data: FederatedData, client_id: int, m: int, seed: int) -> CanarySet:
    """Draw ``m`` canaries for one client, reproducibly from the run seed.

    Parameters
    ----------
    data : FederatedData
        The run's data, with or without the canaries inserted (the same canaries either way).
    client_id : int
        The audited client.
    m : int
        Number of canaries.
    seed : int
        The run seed.

    Returns
    -------
    CanarySet
        Uniform-noise inputs within the client's input range, uniform labels, and the
        inclusion draw (each canary independently with probability 1/2).
    """
    client = data.clients[client_id]
    rng = np.random.default_rng((seed, _CANARY_STREAM, client_id))
    # The range of the real examples only, so the draw is the same with canaries inserted.
    real = client.x_train[real_examples(client)]
    lo, hi = float(real.min()), float(real.max())
    x = rng.uniform(lo, hi, size=(m, *data.input_shape)).astype(np.float32)
    y = rng.integers(0, data.num_classes, size=m).astype(np.int64)
    included = rng.random(m) < 0.5
    return CanarySet(x=x, y=y, included=included)


def real_examples(client: ClientData) -> np.ndarray:
    """Bool mask of the client's real private examples (canaries have train index -1)."""
    if len(client.train_indices) != client.num_examples:  # built without bookkeeping
        return np.ones(client.num_examples, dtype=bool)
    return client.train_indices >= 0


_WITH_CANARIES: dict[tuple[int, int, int, int], tuple[FederatedData, FederatedData]] = {}


def with_canaries(data: FederatedData, client_id: int, m: int, seed: int) -> FederatedData:
    """The run's data with the included canaries appended to one client's private data.

    Cached per process (clients call this every round); the canaries' ``train_indices`` are
    -1, which tells them apart from real examples.

    Parameters
    ----------
    data : FederatedData
        The run's data, without canaries (treated as read-only).
    client_id : int
        The audited client.
    m : int
        Number of canaries drawn (about half are inserted).
    seed : int
        The run seed.

    Returns
    -------
    FederatedData
        A copy sharing every array except the audited client's.
    """
    key = (id(data), client_id, m, seed)
    hit = _WITH_CANARIES.get(key)
    if hit is not None and hit[0] is data:
        return hit[1]
    canaries = make_canaries(data, client_id, m, seed)
    client = data.clients[client_id]
    inc = canaries.included
    audited = client.replaced(
        x_train=np.concatenate([client.x_train, canaries.x[inc].astype(client.x_train.dtype)]),
        y_train=np.concatenate([client.y_train, canaries.y[inc].astype(client.y_train.dtype)]),
        train_indices=np.concatenate(
            [
                client.train_indices
                if len(client.train_indices) == client.num_examples
                else np.zeros(client.num_examples, dtype=np.int64),  # no bookkeeping: mark real
                np.full(int(inc.sum()), -1, dtype=np.int64),
            ]
        ),
    )
    clients: list[ClientData] = list(data.clients)
    clients[client_id] = audited
    out = dataclasses.replace(data, clients=clients)
    # Keep `data` referenced so its id cannot be reused by another object.
    _WITH_CANARIES[key] = (data, out)
    return out
