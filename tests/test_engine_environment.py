"""What `fedkd run` hands Flower's simulation engine (Ray), checked without starting Ray."""

import os

import flwr.simulation
import pytest
import typer

from fedkd.run import cli, ray_start
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
    monkeypatch.setattr(ray_start.RayStart, "_init", lambda self: seen.update(early=self.kwargs))
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # restored afterwards
    spec = load_spec(None, [])
    with pytest.raises(typer.Exit):  # the stand-in ran no round: the run ends as failed
        cli.simulate(spec, tmp_path / "run", show_progress=False)
    assert seen["niceness"] == "0"
    assert seen["backend_config"]["init_args"]["log_to_driver"] is False
    # Ray was started early with the engine's own init_args
    early = dict(seen["early"])
    assert early.pop("include_dashboard") is False
    assert early.pop("runtime_env")["env_vars"]["PYTHONPATH"] == os.environ["PYTHONPATH"]
    assert early.items() <= seen["backend_config"]["init_args"].items()


def test_ray_is_started_early_with_the_arguments_flowers_backend_would_use(monkeypatch):
    """`RayStart` must pass ``ray.init`` what Flower's RayBackend would, or the engine's Ray
    would differ from the one it finds running (Flower starts none when one is)."""
    import ray
    from flwr.server.superlink.fleet.vce.backend import raybackend

    init_args = {"logging_level": 40, "log_to_driver": False}
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(raybackend.ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setenv("PYTHONPATH", "/somewhere")
    backend = object.__new__(raybackend.RayBackend)
    backend.init_args_key = "init_args"
    backend.init_ray({"init_args": init_args})
    monkeypatch.setenv("PYTHONPATH", "/somewhere")  # as before Flower's call
    started = ray_start.RayStart(init_args).start()
    started.wait()
    started.release()
    assert calls[0] == calls[1]
    assert calls[1]["runtime_env"]["env_vars"]["PYTHONPATH"].endswith("/somewhere")


def test_an_early_ray_start_that_fails_is_raised_where_the_engine_would_start(monkeypatch):
    import ray

    def broken(**kwargs):
        raise RuntimeError("no raylet")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", broken)
    started = ray_start.RayStart({}).start()
    with pytest.raises(RuntimeError, match="no raylet"):
        started.wait()
    started.release()


def test_a_worker_niceness_set_by_the_user_is_kept(monkeypatch):
    monkeypatch.setenv("RAY_worker_niceness", "7")
    cli._engine_environment()
    assert os.environ["RAY_worker_niceness"] == "7"
