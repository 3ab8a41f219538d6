"""Centralized: one model trained on the pooled private data of all clients.

The upper bound every comparison needs. It runs through the same engine, data, rounds and
metrics (one round = the local epochs over the pooled data), with no client messages.
"""

from __future__ import annotations

from fedkd.learner.cohort import ClientResult
from strategies.base import Strategy
from strategies.params import Capabilities


class Centralized(Strategy):
    """Supervised training of the server model on the union of the clients' private pools.

    Parameters
    ----------
    **kwargs
        See `strategies.base.Strategy`; ``server_student`` is the centralized model and its
        step configuration should be the clients' local-training one.
    """

    name = "centralized"
    # The upper bound trains outside DP-SGD, like a client would, on the pooled private data.
    capabilities = Capabilities(
        uses_clients=False,
        client_students=False,
        server_student="own",
        supports_dpsgd=False,
    )
    # The pooled private data is rebuilt from the run's data, not checkpointed.
    run_inputs = (*Strategy.run_inputs, "_x", "_y")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.server_student is None:
            raise ValueError("centralized needs a model (spec: server.student)")
        self._x, self._y = self.data.pooled_train()

    def aggregate(self, round_num: int, updates: dict[int, ClientResult]) -> None:
        self.server_student.fit_labels(round_num, self._x, self._y)
