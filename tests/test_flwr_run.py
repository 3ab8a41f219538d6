"""The Flower CLI path: `flwr run` against a SuperLink started in simulation mode.

Flower 1.41 reads SuperLink connections from ``$FLWR_HOME/config.toml``, so the test points
FLWR_HOME at a temporary folder and writes one connection there, to a SuperLink on a free port.
It runs a copy of the project: the first `flwr run` on a project with ``[tool.flwr.federations]``
rewrites its pyproject.toml (Flower's one-time migration of those tables to the Flower config).
`flwr run --stream` exits 0 even when the run fails, so the run's status comes from `flwr ls`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONNECTION = "fedkd-pytest"  # must not name a folder in the cwd of `flwr ls` (migration check)
OVERRIDES = "rounds=2;clients.num_clients=4;clients.min_clients=2"
FEDERATION_CONFIG = "num-supernodes=4 client-resources-num-cpus=1 client-resources-num-gpus=0.0"
RUN_TIMEOUT_S = 300
COPY_IGNORE = shutil.ignore_patterns(
    ".git", "runs", "__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info", ".venv", "*.fab"
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _proc_stat(pid: int | str) -> tuple[str, int, str] | None:
    """(state, parent pid, start time) of a live process, from /proc; None if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1]), fields[19]


def _descendants(root: int) -> dict[int, str]:
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


def _stop(proc: subprocess.Popen) -> None:
    """Stop the SuperLink and whatever it started (SuperExec, the simulation, its Ray)."""
    below = _descendants(proc.pid)  # now, before they are orphaned and reparented
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        left = [pid for pid, start in below.items() if _alive(pid, start)]
        for pid in left:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + grace
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = [pid for pid in left if _alive(pid, below[pid])]


def _wait_until_up(proc: subprocess.Popen, port: int, log_file: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"flower-superlink exited ({proc.returncode}):\n{log_file.read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as res:
                if res.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    pytest.fail(f"flower-superlink not up after {timeout} s:\n{log_file.read_text()}")


def _run_status(env: dict[str, str], cwd: Path, run_id: str) -> str:
    """The run's status as `flwr ls` reports it, e.g. "finished:completed"."""
    res = subprocess.run(
        [str(BIN / "flwr"), "ls", CONNECTION, "--run-id", run_id, "--format", "json"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    payload = json.loads(res.stdout[res.stdout.index("{") :])
    assert payload.get("success"), payload
    return payload["runs"][0]["status"]


def test_flwr_run_against_simulation_superlink(tmp_path: Path) -> None:
    if not (BIN / "flower-superlink").is_file() or not (BIN / "flwr").is_file():
        pytest.skip(f"flower-superlink / flwr not installed next to {sys.executable}")

    app = tmp_path / "app"
    shutil.copytree(REPO, app, ignore=COPY_IGNORE)
    home = tmp_path / "flwr-home"
    home.mkdir()
    port = _free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    out_dir = tmp_path / "run"
    pyproject = (REPO / "pyproject.toml").read_bytes()

    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # the simulation must start its own Ray, not join another
    env.update(
        FLWR_HOME=str(home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        # The SuperLink starts `flower-superexec`, which starts `flwr-simulation`, by name.
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    )

    log_file = tmp_path / "superlink.log"
    with log_file.open("w") as log:
        superlink = subprocess.Popen(
            [
                str(BIN / "flower-superlink"),
                "--insecure",
                "--simulation",
                "--disable-runtime-dependency-installation",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env=env,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_until_up(superlink, port, log_file, timeout=60)

        started = time.monotonic()
        try:
            res = subprocess.run(
                [
                    str(BIN / "flwr"),
                    "run",
                    str(app),
                    CONNECTION,
                    "--run-config",
                    f'overrides="{OVERRIDES}" out-dir="{out_dir}"',
                    "--federation-config",
                    FEDERATION_CONFIG,
                    "--stream",
                ],
                env=env,
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=RUN_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired as err:
            pytest.fail(f"flwr run took over {RUN_TIMEOUT_S} s:\n{err.stdout}\n{err.stderr}")
        output = res.stdout + res.stderr
        print(f"flwr run --stream took {time.monotonic() - started:.1f} s")
        assert res.returncode == 0, output
        match = re.search(r"Successfully started run (\d+)", output)
        assert match, output

        # The stream ends when the run does; allow the state a moment to say so.
        status = _run_status(env, tmp_path, match.group(1))
        for _ in range(20):
            if status.startswith("finished"):
                break
            time.sleep(1)
            status = _run_status(env, tmp_path, match.group(1))
        assert status == "finished:completed", (
            f"run {match.group(1)}: {status}\n--- flwr run ---\n{output[-6000:]}"
            f"\n--- superlink ---\n{log_file.read_text()[-4000:]}"
        )
    finally:
        _stop(superlink)

    rows = (out_dir / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert (REPO / "pyproject.toml").read_bytes() == pyproject  # the run used a copy
