"""Ray started in a thread while the driver gets a simulation ready (`fedkd run`).

Flower's Ray backend (``RayBackend.init_ray``, flwr 1.41 and 1.42) calls ``ray.init`` only
when Ray is not running yet, with the backend config's ``init_args``,
``include_dashboard=False`` and the driver's ``sys.path`` as the workers' ``PYTHONPATH``.
Starting Ray first, with exactly those arguments (`ray_init_kwargs`), lets Ray's start-up
(its GCS server, raylet, agents and prestarted workers: other processes, which the starting
thread mostly waits for) overlap the driver's own work before the engine runs: importing
Flower's simulation engine and fedkd's apps and building the ServerApp. The run is the same
Ray the engine would have started; only its start moves earlier.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Mapping
from typing import Any

__all__ = ["RayStart", "ray_init_kwargs"]


def ray_init_kwargs(init_args: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments Flower's Ray backend passes to ``ray.init`` for `init_args`.

    Like Flower, sets ``os.environ["PYTHONPATH"]`` to the driver's ``sys.path`` (then the
    previous ``PYTHONPATH``), which processes started later inherit.

    Parameters
    ----------
    init_args : mapping
        The backend config's ``"init_args"`` (what ``run_simulation`` is given).

    Returns
    -------
    dict
        ``init_args`` with ``include_dashboard`` (False unless given) and ``runtime_env``.
    """
    kwargs = dict(init_args)
    kwargs.setdefault("include_dashboard", False)
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    return {"runtime_env": {"env_vars": {"PYTHONPATH": pythonpath}}, **kwargs}


class RayStart:
    """``ray.init`` in a background thread that lives as long as the run's Ray.

    `wait` before handing over to the engine, `release` once the engine has shut Ray down.

    Parameters
    ----------
    init_args : mapping
        The backend config's ``"init_args"``, as given to ``run_simulation``.

    Notes
    -----
    Ray starts its GCS server and raylet with ``PR_SET_PDEATHSIG`` (they die with their
    parent), and on Linux the parent is the *thread* that started them: the starting thread
    must outlive the run, so it waits for `release` after ``ray.init``. It is a daemon, so a
    driver that exits without releasing it is not held up (Ray's processes then go with it).
    ``ray.init`` outside the main thread installs no signal handler (Ray checks), so fedkd's
    stop signals (`fedkd.run.stops`) stay in charge.
    """

    def __init__(self, init_args: Mapping[str, Any]) -> None:
        self.kwargs = ray_init_kwargs(init_args)
        self.error: Exception | None = None
        self._ready = threading.Event()
        self._release = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fedkd-ray-start", daemon=True)

    def _run(self) -> None:
        try:
            self._init()
        except Exception as err:  # handed to the main thread by `wait`
            self.error = err
        finally:
            self._ready.set()
        self._release.wait()  # Ray's GCS server and raylet die with this thread

    def _init(self) -> None:
        import ray

        if not ray.is_initialized():
            ray.init(**self.kwargs)

    def start(self) -> RayStart:
        """Start Ray in the background; returns self."""
        self._thread.start()
        return self

    def wait(self) -> None:
        """Block until Ray has started; re-raise what stopped it from starting."""
        self._ready.wait()
        if self.error is not None:
            raise self.error

    def release(self) -> None:
        """Let the starting thread end (after the engine has shut Ray down)."""
        self._release.set()
