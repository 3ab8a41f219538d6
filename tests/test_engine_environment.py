"""What `fedkd run` hands Flower's simulation engine (Ray), checked without starting Ray, and how
its processes set up torch."""

import os

import flwr.simulation
import pytest
import torch
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
