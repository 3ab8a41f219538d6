"""Local-only: every client trains on its own data and nothing is exchanged.

The lower bound every comparison needs: what clients reach without federation.
"""

from __future__ import annotations

from strategies.base import Strategy


class LocalOnly(Strategy):
    """No exchange; clients are evaluated as they are."""

    name = "local_only"
    upload = "none"
    has_teacher = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.server_student = None
