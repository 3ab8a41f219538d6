"""The results folder's lock: who holds it, and a stale one left by a killed run."""

import logging
import os
import socket
import subprocess
import sys

import pytest

from fedkd.results import LOCK_NAME, RunDirError, claim_run_dir


def _dead_pid() -> int:
    """The pid of a process of this host that has ended (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_the_lock_names_its_pid_and_host(tmp_path):
    lock = claim_run_dir(tmp_path / "run")
    assert lock.read_text().split() == [str(os.getpid()), socket.gethostname()]


def test_a_stale_lock_of_this_host_is_taken_over_with_a_warning(tmp_path, caplog):
    """A run killed by kill -9 leaves its lock: the next run into the folder used to be refused."""
    run = tmp_path / "run"
    run.mkdir()
    pid = _dead_pid()
    (run / LOCK_NAME).write_text(f"{pid}\n{socket.gethostname()}\n")
    with caplog.at_level(logging.WARNING, logger="fedkd"):
        lock = claim_run_dir(run)
    assert f"took over the lock of fedkd run pid {pid}, which no longer runs" in caplog.text
    assert lock.read_text().split() == [str(os.getpid()), socket.gethostname()]
    assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]


def test_a_stale_lock_over_a_killed_run_still_refuses_to_overwrite_it(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).write_text(f"{_dead_pid()}\n{socket.gethostname()}\n")
    (run / "metrics.jsonl").write_text('{"round": 1}\n')
    with pytest.raises(RunDirError, match="already holds a run"):
        claim_run_dir(run)
    assert not (run / LOCK_NAME).exists()


@pytest.mark.parametrize(
    "owner",
    [
        pytest.param(lambda: f"{os.getpid()}\n{socket.gethostname()}\n", id="live-pid"),
        pytest.param(lambda: f"{_dead_pid()}\nanother-host.example\n", id="other-host"),
        pytest.param(lambda: f"{_dead_pid()}\n", id="no-host"),
    ],
)
def test_a_lock_that_may_be_live_is_never_taken_over(tmp_path, owner):
    run = tmp_path / "run"
    run.mkdir()
    text = owner()
    (run / LOCK_NAME).write_text(text)
    with pytest.raises(RunDirError, match="in use by fedkd run pid"):
        claim_run_dir(run)
    assert (run / LOCK_NAME).read_text() == text
