"""Checkpoints after every round, and resuming a run from the last one (docs/errors-and-stops.md).

A run stopped after round r and resumed must write the same metrics as a run that never
stopped (timings aside): the strategy, the server student, the ledgers, the clients' states
and the round loop's bookkeeping all come back from the checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from typer.testing import CliRunner

from fedkd.apps.client_app import _checkpoint_folder, make_client_app
from fedkd.apps.server_app import NODE_STATES, run_rounds
from fedkd.learner.state_store import DiskStateStore
from fedkd.results import LOCK_NAME, RunRecorder
from fedkd.rounds.checkpoint import (
    CHECKPOINTS,
    SERVER_FILE,
    checkpoint_info,
    complete_rounds,
    last_checkpoint,
    read_server_checkpoint,
    round_dir,
    write_server_checkpoint,
)
from fedkd.run import cli
from fedkd.spec import load_spec
from tests.conftest import REPO
from tests.inprocess import InProcessGrid
from tests.test_algorithm_fingerprints import CASES as ALGORITHM_CASES
from tests.test_algorithm_fingerprints import TINY
from tests.test_engine import TIMINGS
from tests.test_stops import process_tree, still_running, wait_for

# The fingerprints' tiny quickstart (mixed students, 3 of 5 clients a round), for 4 rounds.
SMALL = [*TINY, "rounds=4"]

# For the Ray test: short rounds, 6 of them.
RAY_RUN = ["clients.num_clients=4", "data.proxy_size=300", "rounds=6", "train.epochs=1"]

# Every algorithm and privacy spec of the fingerprints (the strategy's default state_dict
# must carry each), and the other learner, DP with it, cohort nodes with the audit.
CASES = {
    **ALGORITHM_CASES,
    "vectorised": ["resources.learner=vectorised", "clients.students=cnn_small"],
    "vectorised_dp": [
        "resources.learner=vectorised",
        "clients.students=cnn_small",
        "privacy.dpsgd=true",
        "privacy.noise_multiplier=1.0",
        "privacy.noise_rng=seeded",
    ],
    "cohort_audit": ["clients.clients_per_node=2", "audit.enabled=true", "audit.client=1"],
    # Every client state in the nodes' spill files: the checkpoints and the export read them.
    "spilled_audit": [
        "resources.state_memory_mb=0",
        "clients.clients_per_node=2",
        "audit.enabled=true",
        "audit.client=1",
    ],
    # Each client keeps its earlier logits for its digest: the checkpoint must keep them.
    "self_distill": ["algorithm.self_distill_weight=0.5"],
    # Each client's meme model lives beside its student: the checkpoint must keep it.
    "mutual": ["algorithm.mutual_weight=1"],
    # The defence's scores carry over rounds: the checkpoint must keep them.
    "faults_defence": [
        "faults.byzantine_fraction=0.4",
        "faults.attack=invert",
        "faults.defence=history",
        "faults.crash_rate=0.2",
    ],
}


class Killed(Exception):
    """Stands for a kill: the run stops without any of its own clean-up."""


def rows_of(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in lines]


def straight_run(spec, run_dir: Path) -> list[dict]:
    grid = InProcessGrid(make_client_app(spec), spec.num_nodes)
    run_rounds(grid, spec, RunRecorder(run_dir, spec))
    return rows_of(run_dir)


def stop_after_row(spec, run_dir: Path, row: int) -> None:
    """Run until round `row`'s metrics row is on disk, then stop as a kill would."""

    def kill(rnd: int, _row: dict) -> None:
        if rnd == row:
            raise Killed

    grid = InProcessGrid(make_client_app(spec), spec.num_nodes)
    with pytest.raises(Killed):
        run_rounds(grid, spec, RunRecorder(run_dir, spec), on_round=kill)
    (run_dir / "summary.json").unlink()  # a kill writes none


def resume(spec, run_dir: Path) -> list[dict]:
    """Resume `run_dir` from its last checkpoint with fresh nodes (empty node state)."""
    checkpoint = last_checkpoint(run_dir)
    assert checkpoint is not None
    recorder = RunRecorder(run_dir, spec, keep_rows=checkpoint_info(checkpoint)["rows"])
    grid = InProcessGrid(make_client_app(spec), spec.num_nodes)
    run_rounds(grid, spec, recorder, resume=checkpoint)
    return rows_of(run_dir)


@pytest.mark.parametrize("case", list(CASES))
def test_a_resumed_run_writes_the_straight_runs_metrics(tmp_path, case):
    spec = load_spec(None, SMALL + CASES[case])
    expected = straight_run(spec, tmp_path / "straight")
    stop_after_row(spec, tmp_path / "resumed", 2)
    assert len(rows_of(tmp_path / "resumed")) == 2
    assert resume(spec, tmp_path / "resumed") == expected
    summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == spec.rounds
    if (tmp_path / "straight" / "ledgers.json").exists():
        ledgers = [
            json.loads((tmp_path / d / "ledgers.json").read_text()) for d in ("straight", "resumed")
        ]
        assert ledgers[0] == ledgers[1]


def test_a_resumed_run_ignores_the_spill_files_a_killed_run_left(tmp_path):
    spec = load_spec(None, [*SMALL, "resources.state_memory_mb=0"])
    expected = straight_run(spec, tmp_path / "straight")
    stop_after_row(spec, tmp_path / "resumed", 2)
    # A SIGKILL leaves the nodes' files (here stale states, as garbage): the resumed run must
    # take its clients from the checkpoints, not from them.
    left = tmp_path / "resumed" / NODE_STATES
    stale = DiskStateStore(left / "node-0.states", spec.clients.num_clients)
    for cid in range(spec.clients.num_clients):
        stale[cid] = b"a state of a killed run"
    stale.close()
    assert resume(spec, tmp_path / "resumed") == expected
    assert not left.exists()


def test_a_half_written_checkpoint_is_ignored_and_only_the_last_two_are_kept(tmp_path):
    spec = load_spec(None, SMALL)
    expected = straight_run(spec, tmp_path / "straight")
    assert complete_rounds(tmp_path / "straight" / CHECKPOINTS) == [3, 4]
    run_dir = tmp_path / "resumed"
    stop_after_row(spec, run_dir, 2)
    root = run_dir / CHECKPOINTS
    assert complete_rounds(root) == [1, 2]
    # A kill during the write of round 3's checkpoint: its folder holds a cut-off file and
    # no COMPLETE marker (or is still the temporary folder).
    (round_dir(root, 3)).mkdir()
    (round_dir(root, 3) / "server.pt").write_bytes(b"cut off")
    (root / ".round-0004.tmp").mkdir()
    assert last_checkpoint(run_dir) == round_dir(root, 2)
    assert resume(spec, run_dir) == expected
    assert complete_rounds(root) == [3, 4]


def test_a_server_checkpoint_round_trips_tensors_and_arrays_and_reads_torch_save_files(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3), "a": np.arange(4), "n": {"x": [1, 2]}}

    def same(back: dict) -> bool:
        return (
            torch.equal(back["w"], state["w"])
            and np.array_equal(back["a"], state["a"])
            and back["n"] == state["n"]
        )

    path = write_server_checkpoint(tmp_path, 1, 1, state)
    assert not zipfile.is_zipfile(path / SERVER_FILE)  # plain pickle
    assert same(read_server_checkpoint(path))
    torch.save(state, path / SERVER_FILE)  # the format of checkpoints before plain pickle
    assert same(read_server_checkpoint(path))


# -- fedkd run --resume: what the command line refuses, and what it hands the engine ----------


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> Path:
    """A 4-round run stopped (as by a kill) once round 2's row was written."""
    run_dir = tmp_path_factory.mktemp("stopped") / "run"
    stop_after_row(load_spec(None, SMALL), run_dir, 2)
    return run_dir


@pytest.fixture
def engine(monkeypatch):
    """Stands in for the simulation: records what it was asked to resume."""
    calls = []

    def simulate(spec, out_dir, show_progress, recorder, resume):
        calls.append((spec, out_dir, recorder, resume))
        recorder.release()
        return {"final": {}, "best_server_test_acc": None, "wall_s": 0.0}

    monkeypatch.setattr(cli, "simulate", simulate)
    return calls


def one_line_error(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, (result.exit_code, result.stderr, result.exception)
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return lines[0]


def test_resume_continues_from_the_last_checkpoint_with_the_runs_spec(stopped_run, engine):
    result = CliRunner().invoke(cli.app, ["run", "--resume", str(stopped_run), "--quiet"])
    assert result.exit_code == 0, result.stderr
    ((spec, out_dir, recorder, checkpoint),) = engine
    assert checkpoint == round_dir(stopped_run / CHECKPOINTS, 2) and out_dir == stopped_run
    assert spec == load_spec(stopped_run / "spec.toml") and spec.rounds == 4
    assert [r["round"] for r in recorder.rounds] == [1]  # round 2's row is written again
    assert len(rows_of(stopped_run)) == 1


def test_resume_with_a_changed_spec_is_refused_naming_the_key(stopped_run, engine):
    args = ["run", "--resume", str(stopped_run), "--set", "rounds=6"]
    assert "spec key rounds differs" in one_line_error(CliRunner().invoke(cli.app, args))
    args = ["run", "--set", "train.lr=0.5", "--resume", str(stopped_run)]
    assert "train.lr" in one_line_error(CliRunner().invoke(cli.app, args))
    assert not engine


def test_resume_without_a_checkpoint_or_a_run_is_refused(tmp_path, engine):
    run_dir = tmp_path / "no_checkpoint"
    run_dir.mkdir()
    (run_dir / "spec.toml").write_text("rounds = 2\n")
    (run_dir / "metrics.jsonl").write_text("")
    args = ["run", "--resume", str(run_dir)]
    assert "no complete checkpoint" in one_line_error(CliRunner().invoke(cli.app, args))
    args = ["run", "--resume", str(tmp_path / "nowhere")]
    assert "no spec.toml" in one_line_error(CliRunner().invoke(cli.app, args))
    assert not engine


def test_resuming_a_completed_run_says_so_and_exits_0(tmp_path, engine):
    spec = load_spec(None, [*SMALL, "rounds=1"])
    straight_run(spec, tmp_path / "done")
    result = CliRunner().invoke(cli.app, ["run", "--resume", str(tmp_path / "done")])
    assert result.exit_code == 0 and "has completed" in result.stderr + result.stdout
    assert not engine


def test_a_killed_runs_lock_does_not_block_resume_but_a_live_one_does(stopped_run, engine):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (stopped_run / LOCK_NAME).write_text(f"{dead.pid}\n{socket.gethostname()}\n")
    result = CliRunner().invoke(cli.app, ["run", "--resume", str(stopped_run), "--quiet"])
    assert result.exit_code == 0, result.stderr
    # A live process holds it.
    (stopped_run / LOCK_NAME).write_text(f"{os.getpid()}\n{socket.gethostname()}\n")
    try:
        args = ["run", "--resume", str(stopped_run)]
        assert "in use" in one_line_error(CliRunner().invoke(cli.app, args))
    finally:
        (stopped_run / LOCK_NAME).unlink()


# -- the real thing: fedkd run on Ray, killed with SIGKILL, resumed ----------------------------


def fedkd_run(*args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fedkd.run.cli", "run", "--quiet", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_to_the_straight_runs_metrics(tmp_path):
    sets = [f"--set={item}" for item in RAY_RUN]
    straight = fedkd_run(*sets, "--out", str(tmp_path / "straight"))
    _, stderr = straight.communicate(timeout=600)
    assert straight.returncode == 0, stderr[-3000:]

    run_dir = tmp_path / "killed"
    proc = fedkd_run(*sets, "--out", str(run_dir))
    tree: dict[int, int] = {}
    try:
        metrics = run_dir / "metrics.jsonl"
        wait_for(
            lambda: (
                proc.poll() is not None
                or (metrics.is_file() and metrics.read_text().count("\n") >= 2)
            ),
            300,
            "round 2's metrics row",
        )
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        tree = process_tree(proc.pid)
        proc.kill()  # kill -9: no clean-up of its own, its lock stays
        proc.wait(timeout=60)
    finally:
        for pid in still_running(tree):  # Ray's processes, orphaned by the kill
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
    assert (run_dir / LOCK_NAME).exists() and not (run_dir / "summary.json").exists()
    assert 2 <= len(rows_of(run_dir)) < 6

    resumed = fedkd_run("--resume", str(run_dir))
    _, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr[-3000:]
    assert "resuming from" in stderr
    assert rows_of(run_dir) == rows_of(tmp_path / "straight")
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


def test_a_deployed_site_keeps_client_states_only_in_its_own_folder(tmp_path):
    """A simulated node writes where the server says (beside the run); a deployed one never
    does, and keeps its clients' states only in its node config's ``checkpoint-dir``."""
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    config = {"checkpoint_dir": str(tmp_path / "server-says")}
    assert _checkpoint_folder(config, context, simulated=True) == tmp_path / "server-says"
    assert _checkpoint_folder(config, context, simulated=False) is None
    context.node_config["checkpoint-dir"] = str(tmp_path / "site")
    assert _checkpoint_folder(config, context, simulated=False) == tmp_path / "site"
