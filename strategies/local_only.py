"""Local-only: every client trains on its own data and nothing is exchanged.

The lower bound every comparison needs: what clients reach without federation.
"""

from __future__ import annotations

from strategies.base import Strategy
from strategies.params import Capabilities


class LocalOnly(Strategy):
    """No exchange; clients are evaluated as they are."""

    name = "local_only"
    capabilities = Capabilities(server_student="unused")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.server_student = None
