"""Ctrl-C and SIGTERM stop `fedkd run` cleanly: rounds kept, status interrupted, no process left."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

# Short rounds, many of them: the signal always lands while the run goes on.
SMALL = ["clients.num_clients=4", "data.proxy_size=300", "rounds=40", "train.epochs=1"]


def _proc_stat(pid: int) -> tuple[int, str, int] | None:
    """(ppid, state, start time) of a live process, None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the name may hold spaces and parentheses
    return int(fields[1]), fields[0], int(fields[19])


def process_tree(root: int) -> dict[int, int]:
    """Every descendant of `root` now ({pid: start time}), by the ppid links in /proc."""
    children: dict[int, list[int]] = {}
    started: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _proc_stat(int(entry))) is not None:
            children.setdefault(stat[0], []).append(int(entry))
            started[int(entry)] = stat[2]
    tree, todo = {}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            tree[child] = started[child]
            todo.append(child)
    return tree


def still_running(tree: dict[int, int]) -> list[int]:
    """The processes of `tree` that run yet (zombies and reused pids do not count)."""
    alive = []
    for pid, start in tree.items():
        stat = _proc_stat(pid)
        if stat is not None and stat[2] == start and stat[1] != "Z":
            alive.append(pid)
    return alive


def wait_for(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_the_run_keeps_its_rounds_and_leaves_no_process(tmp_path, sig, code):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fedkd.run.cli", "run", "--quiet", "--out", str(out)]
    for item in SMALL:
        cmd += ["--set", item]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        metrics = out / "metrics.jsonl"
        wait_for(
            lambda: proc.poll() is not None or (metrics.is_file() and metrics.read_text()),
            300,
            "the first metrics row",
        )
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        tree = process_tree(proc.pid)
        assert tree, "the run started no process (no Ray?)"
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert "interrupted" in stderr.splitlines()[-1]
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert summary["status"] == "interrupted"
    assert 1 <= len(rows) < 40 and summary["rounds"] == len(rows)
    assert [r["round"] for r in rows] == list(range(1, len(rows) + 1))
    assert not (out / ".fedkd.lock").exists()
    # Ray's processes (gcs, raylet, workers, agents) go within a short, bounded wait.
    try:
        wait_for(lambda: not still_running(tree), 30, "the run's processes to end")
    except AssertionError:
        left = still_running(tree)
        names = [Path(f"/proc/{p}/cmdline").read_bytes()[:80] for p in left]
        raise AssertionError(f"processes left: {names}") from None
