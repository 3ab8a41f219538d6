"""How the round loop ends a run that cannot go on, and how it records lost clients (no Ray)."""

import json
import threading

import numpy as np
import pytest
import torch
from flwr.app import Error, Message

from fedkd.apps.client_app import make_client_app
from fedkd.apps.server_app import FederationError, RunStopped, run_rounds
from fedkd.apps.wire import MSG_ROUND
from fedkd.results import LOCK_NAME, RunDirError, RunRecorder, claim_run_dir
from fedkd.spec import load_spec
from strategies.base import Strategy
from tests.inprocess import InProcessGrid
from tests.test_engine import SMALL


def _rows(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def _summary(path):
    return json.loads((path / "summary.json").read_text())


def test_a_round_in_which_every_client_fails_stops_the_run_as_failed(tmp_path, monkeypatch):
    """train.lr=inf used to make every upload non-finite and still end "completed"."""
    original = Strategy.client_round.__func__

    def diverges_from_round_2(cls, params, learner, round_num, client_ids, payload):
        results = original(cls, params, learner, round_num, client_ids, payload)
        if round_num >= 2:
            for res in results.values():
                res.arrays["logits"][:] = np.nan
        return results

    monkeypatch.setattr(Strategy, "client_round", classmethod(diverges_from_round_2))
    spec = load_spec(None, [*SMALL, "rounds=4"])
    grid = InProcessGrid(make_client_app(spec), spec.num_nodes)
    with pytest.raises(FederationError, match="round 2: all 4 sampled clients failed.*lower"):
        run_rounds(grid, spec, RunRecorder(tmp_path / "run", spec))
    summary = _summary(tmp_path / "run")
    assert summary["status"] == "failed" and "non-finite" in summary["error"]
    assert [r["round"] for r in _rows(tmp_path / "run")] == [1]  # the finished round is kept
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_a_client_whose_private_training_diverges_misses_one_round_not_the_rest(
    tmp_path, monkeypatch
):
    """One client's student turns NaN in round 2's private training: that round's reply is
    ignored, and its learner keeps its student from before, so it takes part again in round 3
    (a NaN student kept would fail every round to the end)."""
    from fedkd.learner import cohort

    original, calls = cohort.train_supervised, []

    def diverges_once(model, *args, **kwargs):
        stats = original(model, *args, **kwargs)
        calls.append(1)
        if len(calls) == 6:  # round 2 (4 clients a round), its second client
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(float("nan"))
        return stats

    monkeypatch.setattr(cohort, "train_supervised", diverges_once)
    spec = load_spec(None, [*SMALL, "rounds=3", "resources.learner=loop"])
    grid = InProcessGrid(make_client_app(spec), spec.num_nodes)
    run_rounds(grid, spec, RunRecorder(tmp_path / "run", spec))
    rows = _rows(tmp_path / "run")
    assert len(calls) == 12
    assert [r["clients_failed"] for r in rows] == [0, 1, 0]
    assert [r["clients_ok"] for r in rows] == [4, 3, 4]
    lost = [entry for r in rows for entry in r["clients_lost"]]
    assert [(e["round"], e["cause"]) for e in lost] == [
        (2, "private training diverged (non-finite student)")
    ]
    assert _summary(tmp_path / "run")["status"] == "completed"


def test_a_dead_simulation_worker_fails_the_run_clearly(tmp_path):
    """A killed Ray actor is not replaced by Flower: the run stops instead of going on without
    the clients it served."""

    class DeadActorGrid(InProcessGrid):
        def send_and_receive(self, messages, *, timeout=None):
            alive, replies = [], []
            for msg in messages:
                if (msg.metadata.dst_node_id - 1000) // 7 == 1 and msg.metadata.group_id == "2":
                    reason = (
                        "<class 'ray.exceptions.ActorDiedError'>:<'The actor died unexpectedly "
                        "before finishing this task.\n\tclass_name: ClientAppActor"
                    )
                    replies.append(Message(error=Error(code=1, reason=reason), reply_to=msg))
                else:
                    alive.append(msg)
            return replies + list(super().send_and_receive(alive, timeout=timeout))

    spec = load_spec(None, [*SMALL, "rounds=3"])
    grid = DeadActorGrid(make_client_app(spec), spec.num_nodes)
    with pytest.raises(FederationError, match=r"round 2: the simulation worker .* \[1\] died"):
        run_rounds(grid, spec, RunRecorder(tmp_path / "run", spec))
    assert _summary(tmp_path / "run")["status"] == "failed"
    assert len(_rows(tmp_path / "run")) == 1


def test_a_lost_client_is_recorded_once_with_round_and_cause(tmp_path):
    def dead_from_round_2(node_index, msg):
        return (
            node_index == 3
            and msg.metadata.message_type == MSG_ROUND
            and msg.metadata.group_id >= "2"
        )

    spec = load_spec(None, [*SMALL, "rounds=4"])
    grid = InProcessGrid(make_client_app(spec), spec.num_nodes, crash=dead_from_round_2)
    run_rounds(grid, spec, RunRecorder(tmp_path / "run", spec))
    rows = _rows(tmp_path / "run")
    assert [r["clients_failed"] for r in rows] == [0, 1, 1, 1]
    assert [r["clients_ok"] for r in rows] == [4, 3, 3, 3]
    # Round 1's upload was used: it counts as ok there, its lost digest apart.
    assert [r["clients_digest_failed"] for r in rows] == [1, 0, 0, 0]
    lost = [entry for r in rows for entry in r["clients_lost"]]
    assert lost == [{"client": 3, "round": 2, "cause": "node error: node crashed"}]
    for row in rows:
        assert row["bytes_up"] == row["clients_ok"] * row["bytes_up_per_client"]


def test_a_set_stop_event_ends_the_run_as_interrupted_and_keeps_its_rounds(tmp_path):
    stop = threading.Event()
    spec = load_spec(None, [*SMALL, "rounds=5"])
    grid = InProcessGrid(make_client_app(spec), spec.num_nodes)

    def stop_after_round_2(rnd, row):
        if rnd == 2:
            stop.set()

    with pytest.raises(RunStopped):
        run_rounds(grid, spec, RunRecorder(tmp_path / "run", spec), stop_after_round_2, stop)
    summary = _summary(tmp_path / "run")
    assert summary["status"] == "interrupted" and summary["rounds"] == 2
    assert [r["round"] for r in _rows(tmp_path / "run")] == [1, 2]


def test_a_folder_is_claimed_by_one_run_at_a_time(tmp_path):
    lock = claim_run_dir(tmp_path / "run")
    with pytest.raises(RunDirError, match="in use by fedkd run pid"):
        claim_run_dir(tmp_path / "run")
    lock.unlink()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="not empty and holds no run"):
        claim_run_dir(tmp_path / "run")
    # What a sweep writes before its point runs is allowed.
    (tmp_path / "point").mkdir()
    (tmp_path / "point" / "run.log").write_text("fedkd run ...")
    assert claim_run_dir(tmp_path / "point").is_file()
