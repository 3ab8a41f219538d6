"""Clean stops of a simulation: Ctrl-C (SIGINT) and SIGTERM end the run, not the process.

The first signal sets an event that the ServerApp's round loop watches (it ends at its next
wait for replies, writes ``"status": "interrupted"`` and returns); Flower then stops its engine
and shuts Ray down, which ends every process the run started. A second signal stops at once.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any

__all__ = ["StopSignals"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """While active, SIGINT and SIGTERM ask the run to stop instead of killing the process.

    Ray's ``ray.init`` installs its own SIGTERM handler in the calling thread (it exits the
    process, leaving the ServerApp thread and the results folder behind); while this object
    is active Ray is kept from replacing fedkd's handler.

    Parameters
    ----------
    on_first : callable, optional
        Called with the signal's name when the first signal arrives (e.g. to say so).

    Attributes
    ----------
    stop : threading.Event
        Set by the first signal.
    signum : int or None
        The first signal's number.
    """

    def __init__(self, on_first: Callable[[str], None] | None = None) -> None:
        self.stop = threading.Event()
        self.signum: int | None = None
        self.on_first = on_first
        self._previous: dict[int, Any] = {}
        self._ray_setter: Any = None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    @property
    def exit_code(self) -> int:
        """The shell's code for death by the signal: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + (self.signum or 0)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # the user insists: unwind the main thread now
            raise KeyboardInterrupt
        self.signum = signum
        self.stop.set()
        if self.on_first is not None:
            self.on_first(self.name)

    def __enter__(self) -> StopSignals:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        try:
            import ray._private.utils as ray_utils
        except ImportError:  # no Ray: nothing replaces the handler
            return self
        self._ray_setter = ray_utils.set_sigterm_handler
        ray_utils.set_sigterm_handler = _keep_handler
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        if self._ray_setter is not None:
            import ray._private.utils as ray_utils

            ray_utils.set_sigterm_handler = self._ray_setter


def _keep_handler(handler: Callable[..., Any]) -> None:
    """Stands in for Ray's ``set_sigterm_handler`` while fedkd handles the signal."""
