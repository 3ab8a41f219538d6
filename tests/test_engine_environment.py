"""What `fedkd run` hands Flower's simulation engine (Ray), checked without starting Ray."""

import os

import flwr.simulation
import pytest
import typer

from fedkd.run import cli
from fedkd.spec import load_spec


def test_ray_workers_run_at_the_priority_the_run_was_started_with(tmp_path, monkeypatch):
    """Ray renices its workers by 15 unless RAY_worker_niceness says otherwise; the engine
    must see 0 when it starts Ray, since the workers do the run's training."""
    monkeypatch.delenv("RAY_worker_niceness", raising=False)
    seen = {}

    def engine(**kwargs):  # stands in for run_simulation: records, runs nothing
        seen["niceness"] = os.environ.get("RAY_worker_niceness")
        seen["backend_config"] = kwargs["backend_config"]

    monkeypatch.setattr(flwr.simulation, "run_simulation", engine)
    spec = load_spec(None, [])
    with pytest.raises(typer.Exit):  # the stand-in ran no round: the run ends as failed
        cli.simulate(spec, tmp_path / "run", show_progress=False)
    assert seen["niceness"] == "0"
    assert seen["backend_config"]["init_args"]["log_to_driver"] is False


def test_a_worker_niceness_set_by_the_user_is_kept(monkeypatch):
    monkeypatch.setenv("RAY_worker_niceness", "7")
    cli._engine_environment()
    assert os.environ["RAY_worker_niceness"] == "7"
