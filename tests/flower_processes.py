"""Start, watch and stop Flower's own processes (SuperLink, SuperNodes) from tests.

Flower 1.41 reads SuperLink connections from ``$FLWR_HOME/config.toml``; every test gives each
component its own FLWR_HOME in a temporary folder. Processes are found and stopped by pid
through /proc (never by name): a SuperLink or SuperNode starts SuperExec, which starts
ServerApp/ClientApp processes, and all of them must go when a test ends, also when it fails.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def flower_env(home: Path) -> dict[str, str]:
    """This process's environment for a Flower component whose FLWR_HOME is `home`."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # a simulation must start its own Ray, not join another
    env.update(
        FLWR_HOME=str(home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        # SuperLinks and SuperNodes start `flower-superexec`, `flwr-serverapp`, ... by name.
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    return env


def _proc_stat(pid: int | str) -> tuple[str, int, str] | None:
    """(state, parent pid, start time) of a live process, from /proc; None if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1]), fields[19]


def descendants(root: int) -> dict[int, str]:
    """Pid -> start time of every process below `root` (empty where there is no /proc)."""
    children: dict[int, list[tuple[int, str]]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        if (stat := _proc_stat(entry.name)) is not None:
            children.setdefault(stat[1], []).append((int(entry.name), stat[2]))
    found: dict[int, str] = {}
    todo = [root]
    while todo:
        for pid, start in children.get(todo.pop(), []):
            found[pid] = start
            todo.append(pid)
    return found


def _alive(pid: int, start: str) -> bool:
    stat = _proc_stat(pid)
    return stat is not None and stat[2] == start and stat[0] != "Z"


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Stop `proc` and whatever it started, each by its own pid (SIGKILL after a grace time).

    The descendants are listed first, before they are orphaned and reparented; a pid is only
    signalled while its start time still matches, so a recycled pid is never hit.
    """
    below = descendants(proc.pid)
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    for signum, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        left = [pid for pid, start in below.items() if _alive(pid, start)]
        for pid in left:
            try:
                os.kill(pid, signum)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + grace
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = [pid for pid in left if _alive(pid, below[pid])]


def wait_until_up(
    proc: subprocess.Popen,
    url: str,
    log_file: Path,
    timeout: float,
    cafile: Path | None = None,
) -> None:
    """Wait until `url` (a SuperLink's /health) answers 200; fail with the log otherwise."""
    context = ssl.create_default_context(cafile=str(cafile)) if cafile else None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args[0]} exited ({proc.returncode}):\n{log_file.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=1, context=context) as res:
                if res.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    pytest.fail(f"{proc.args[0]} not up after {timeout} s:\n{log_file.read_text()}")


def flwr_json(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 60) -> dict:
    """Run ``flwr ARGS --format json`` and return its JSON answer (``success`` checked)."""
    res = subprocess.run(
        [str(BIN / "flwr"), *args, "--format", "json"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    payload = json.loads(res.stdout[res.stdout.index("{") :])
    assert payload.get("success"), payload
    return payload


def run_status(connection: str, run_id: str, env: dict[str, str], cwd: Path) -> str:
    """The run's status as `flwr ls` reports it, e.g. "finished:completed"."""
    return flwr_json(["ls", connection, "--run-id", run_id], env, cwd)["runs"][0]["status"]
