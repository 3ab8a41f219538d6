"""What `fedkd run` hands Flower's simulation engine (Ray), checked without starting Ray, and how
its processes set up torch."""

import os
import sys

import flwr.simulation
import pytest
import torch
import typer

from fedkd.run import cli
from fedkd.spec import load_spec


def _simulate_without_ray(tmp_path, monkeypatch, ray_address: str | None = None) -> dict:
    """`cli.simulate` of the quickstart with `ray.init` and `run_simulation` replaced by
    recorders: what they were handed, and the environment when Ray would have started."""
    import ray

    if ray_address is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", ray_address)

    seen: dict = {}

    def start(**kwargs):  # stands in for ray.init: records, starts nothing
        seen["niceness"] = os.environ.get("RAY_worker_niceness")
        seen["pythonpath"] = os.environ.get("PYTHONPATH", "")
        seen["init"] = kwargs

    def engine(**kwargs):  # stands in for run_simulation: records, runs nothing
        seen["backend_config"] = kwargs["backend_config"]

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", start)
    monkeypatch.setattr(flwr.simulation, "run_simulation", engine)
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    with pytest.raises(typer.Exit):  # the stand-in ran no round: the run ends as failed
        cli.simulate(load_spec(None, []), tmp_path / "run", show_progress=False)
    return seen


def test_ray_workers_run_at_the_priority_the_run_was_started_with(tmp_path, monkeypatch):
    """Ray renices its workers by 15 unless RAY_worker_niceness says otherwise; Ray must see 0
    when it starts, since the workers do the run's training."""
    monkeypatch.delenv("RAY_worker_niceness", raising=False)
    seen = _simulate_without_ray(tmp_path, monkeypatch)
    assert seen["niceness"] == "0"
    assert seen["backend_config"]["init_args"]["log_to_driver"] is False


def test_ray_starts_with_no_job_runtime_env_and_the_workers_get_the_driver_path(
    tmp_path, monkeypatch
):
    """fedkd starts Ray itself, as Flower's backend would but without a job runtime env (which
    would make the raylet replace its prestarted workers); the module path reaches the
    workers through the environment instead."""
    seen = _simulate_without_ray(tmp_path, monkeypatch)
    assert "runtime_env" not in seen["init"]
    assert seen["init"]["include_dashboard"] is False
    assert seen["init"]["log_to_driver"] is False
    path = seen["pythonpath"].split(os.pathsep)
    assert path[-1] == "/elsewhere"
    assert all(entry in path for entry in sys.path)


def test_ray_workers_preload_the_client_app_and_every_preloaded_module_imports(
    tmp_path, monkeypatch
):
    """Ray's workers import the ClientApp before they accept work; Ray only logs a module it
    cannot import, so a renamed module would silently undo the preload."""
    import importlib

    seen = _simulate_without_ray(tmp_path, monkeypatch)
    preload = seen["init"]["_system_config"]["preload_python_modules"]
    assert "fedkd.apps.client_app" in preload
    for name in preload:
        importlib.import_module(name)


_RAY_STARTED = r"""
import sys
import ray
from fedkd.run import cli

cli._start_ray(cli.RAY_INIT_ARGS)
assert ray.get(ray.remote(lambda: 41 + 1).remote()) == 42
print("ready", flush=True)
sys.stdin.readline()  # the test reads this process's descendants meanwhile
ray.shutdown()
"""


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process tree from /proc")
def test_ray_started_by_a_run_has_no_log_monitor_and_no_autoscaler_monitor():
    """The log monitor only forwards worker output (off in fedkd) and the autoscaler monitor
    scales clusters; each is a Python process importing Ray at every run's start. Ray still
    runs tasks without them."""
    import subprocess
    from pathlib import Path

    from tests.flower_processes import descendants, stop

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _RAY_STARTED],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        commands = []
        for pid in descendants(proc.pid):
            try:
                commands.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" "))
            except OSError:  # gone meanwhile
                pass
        _, err = proc.communicate("\n", timeout=120)
        assert proc.returncode == 0, err
    finally:
        stop(proc)
    assert any(b"gcs_server" in c for c in commands) and any(b"raylet" in c for c in commands)
    assert not any(b"log_monitor.py" in c for c in commands)
    assert not any(b"autoscaler/_private/monitor.py" in c for c in commands)


def test_joining_a_ray_cluster_is_left_to_flower(tmp_path, monkeypatch):
    """With RAY_ADDRESS the workers on other machines get the module path only through the job
    runtime env Flower's backend sets: fedkd does not start (or join) Ray itself."""
    seen = _simulate_without_ray(tmp_path, monkeypatch, ray_address="127.0.0.1:6379")
    assert "init" not in seen


def test_a_worker_niceness_set_by_the_user_is_kept(monkeypatch):
    monkeypatch.setenv("RAY_worker_niceness", "7")
    cli._engine_environment()
    assert os.environ["RAY_worker_niceness"] == "7"


def test_set_up_torch_flushes_a_decaying_momentum_to_zero_and_keeps_the_weights():
    """A unit's momentum whose gradient stays zero decays by the momentum factor each step:
    without flushing it passes through the subnormal range (slow on the CPU); set up, it
    reaches zero instead, and the weights come out the same as without."""
    from fedkd.learner.device import set_up_torch
    from fedkd.learner.functional_optim import ParamSGD

    tiny = torch.finfo(torch.float32).tiny

    def decay() -> tuple[torch.Tensor, list[torch.Tensor]]:
        weight = torch.nn.Parameter(torch.tensor([0.5, -0.25]))
        opt = ParamSGD([weight], lr=0.05, momentum=0.9)
        buffers = []
        for step in range(900):  # 0.9**900 * 1e-3 is far below the smallest normal float
            weight.grad = torch.tensor([1e-3, 0.0]) if step == 0 else torch.zeros(2)
            opt.step()
            buffers.append(opt.state[weight]["momentum_buffer"].clone())
        return weight.detach().clone(), buffers

    try:
        torch.set_flush_denormal(False)
        plain_weight, plain_buffers = decay()
        set_up_torch(1)
        assert torch.get_num_threads() == 1
        weight, buffers = decay()
    finally:
        torch.set_flush_denormal(False)
    assert any(((b > 0) & (b < tiny)).any() for b in plain_buffers)  # the slow case exists
    assert not any(((b > 0) & (b < tiny)).any() for b in buffers)
    assert buffers[-1].eq(0).all()
    assert torch.equal(weight, plain_weight)


def test_every_node_message_sets_torch_up(monkeypatch):
    """The node's learner is built with torch set up (threads, subnormals flushed) in the
    thread that handles the message."""
    from flwr.app import Context, RecordDict

    from fedkd.apps import client_app

    calls = []
    monkeypatch.setattr(client_app, "set_up_torch", calls.append)
    spec = load_spec(None, ["resources.num_threads=1"])
    context = Context(
        run_id=1,
        node_id=7,
        node_config={"partition-id": 0, "num-partitions": spec.num_nodes},
        state=RecordDict(),
        run_config={},
    )
    client_app._learner(spec, context, {}, simulated=True)
    assert calls == [1]
