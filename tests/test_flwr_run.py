"""The Flower CLI path: `flwr run` against a SuperLink started in simulation mode.

Flower 1.41 reads SuperLink connections from ``$FLWR_HOME/config.toml``, so the test points
FLWR_HOME at a temporary folder and writes one connection there, to a SuperLink on a free port.
It runs a copy of the project: the first `flwr run` on a project with ``[tool.flwr.federations]``
rewrites its pyproject.toml (Flower's one-time migration of those tables to the Flower config).
`flwr run --stream` exits 0 even when the run fails, so the run's status comes from `flwr ls`.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.flower_processes import BIN, flower_env, free_port, run_status, stop, wait_until_up

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CONNECTION = "fedkd-pytest"  # must not name a folder in the cwd of `flwr ls` (migration check)
OVERRIDES = "rounds=2;clients.num_clients=4;clients.min_clients=2"
FEDERATION_CONFIG = "num-supernodes=4 client-resources-num-cpus=1 client-resources-num-gpus=0.0"
RUN_TIMEOUT_S = 300
COPY_IGNORE = shutil.ignore_patterns(
    ".git", "runs", "__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info", ".venv", "*.fab"
)


def test_flwr_run_against_simulation_superlink(tmp_path: Path) -> None:
    if not (BIN / "flower-superlink").is_file() or not (BIN / "flwr").is_file():
        pytest.skip(f"flower-superlink / flwr not installed next to {sys.executable}")

    app = tmp_path / "app"
    shutil.copytree(REPO, app, ignore=COPY_IGNORE)
    home = tmp_path / "flwr-home"
    home.mkdir()
    port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    out_dir = tmp_path / "run"
    pyproject = (REPO / "pyproject.toml").read_bytes()

    env = flower_env(home)

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
        wait_until_up(superlink, f"http://127.0.0.1:{port}/health", log_file, timeout=60)

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
        status = run_status(CONNECTION, match.group(1), env, tmp_path)
        for _ in range(20):
            if status.startswith("finished"):
                break
            time.sleep(1)
            status = run_status(CONNECTION, match.group(1), env, tmp_path)
        assert status == "finished:completed", (
            f"run {match.group(1)}: {status}\n--- flwr run ---\n{output[-6000:]}"
            f"\n--- superlink ---\n{log_file.read_text()[-4000:]}"
        )
    finally:
        stop(superlink)

    rows = (out_dir / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert (REPO / "pyproject.toml").read_bytes() == pyproject  # the run used a copy
