"""The ServerApp round loop, wire format and ClientApp handlers, without Ray.

Uses the in-process Grid so that these tests are fast and deterministic; the same apps run on
the Ray-backed simulation engine in test_e2e.py.
"""

import json

import numpy as np
import pytest
import torch

from fedkd.apps.client_app import make_client_app
from fedkd.apps.server_app import Exchange, _learner_phases, run_rounds, sample_clients
from fedkd.apps.wire import MSG_HELLO, MSG_ROUND, NODE_PHASES, PHASE_CLOCKS
from fedkd.assembly import federated_data, hosted_clients
from fedkd.models.zoo import build_model
from fedkd.results import ROUND_KEYS, SUMMARY_KEYS, RunDirError, RunRecorder
from fedkd.spec import ALGORITHMS, load_spec
from strategies.base import Strategy, surest_per_class
from tests.inprocess import InProcessGrid

SMALL = [
    "clients.num_clients=4",
    "clients.min_clients=2",
    "rounds=2",
    "data.proxy_size=200",
    "train.epochs=2",
    "distill.epochs=1",
    "server.epochs=1",
]


def run_inprocess(tmp_path, overrides, crash=None, name="run", late=None):
    spec = load_spec(None, SMALL + overrides)
    grid = InProcessGrid(make_client_app(spec), spec.num_nodes, crash=crash, late=late)
    recorder = RunRecorder(tmp_path / name, spec)
    summary = run_rounds(grid, spec, recorder)
    rows = [
        json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    ]
    return spec, summary, rows, grid


def test_server_student_learns_confident_teacher_labels_and_self_trains(tmp_path):
    _, _, rows, _ = run_inprocess(
        tmp_path,
        [
            "server.confident_fraction=0.3",
            "server.epochs=30",
            "algorithm.self_training_confidence=0.3",
            "algorithm.self_training_iterations=2",
        ],
    )
    for row in rows:
        # 30% of the 200 proxy inputs (all of them are sent every round) within each of the
        # (at most 10) predicted classes, each rounded; the student labels some of the rest.
        assert abs(row["server_labels"] - 60) <= 10
        assert 0.0 <= row["server_label_acc"] <= 1.0
        assert 0 < row["server_pseudo_labelled"] <= 200 - row["server_labels"]
        assert 0.0 <= row["server_test_acc"] <= 1.0


def test_surest_inputs_are_taken_within_each_predicted_class():
    # Class 0 is predicted with probability ~0.99 (4 inputs), class 1 with ~0.6-0.7 (6
    # inputs): a global top half would be all of class 0 and one of class 1.
    probs = torch.tensor(
        [[0.99, 0.01]] * 4 + [[p, 1 - p] for p in (0.40, 0.35, 0.30, 0.38, 0.33, 0.36)]
    )
    sure = surest_per_class(torch.log(probs), 0.5)
    assert sure.tolist() == [True, True, False, False] + [False, True, True, False, True, False]
    # At least one per predicted class, and every input at fraction 1.
    assert surest_per_class(torch.log(probs), 0.01).sum() == 2
    assert surest_per_class(torch.log(probs), 1.0).all()


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_runs_and_writes_the_contract(tmp_path, algorithm):
    extra = ["clients.students=cnn_small"] if algorithm == "fedavg" else []
    spec, summary, rows, _ = run_inprocess(tmp_path, [f"algorithm.name={algorithm}", *extra])
    assert len(rows) == 2
    for row in rows:
        assert set(ROUND_KEYS) <= set(row)
        assert row["clients_failed"] == 0
    assert set(SUMMARY_KEYS) <= set(summary)
    assert summary["status"] == "completed" and summary["rounds"] == 2
    assert (tmp_path / "run" / "spec.toml").is_file()
    assert (tmp_path / "run" / "accuracy.png").stat().st_size > 0
    final = rows[-1]
    if algorithm in ("dsfl", "fedmd", "feddf", "relation", "fedavg", "centralized", "pate"):
        assert 0.0 <= final["server_test_acc"] <= 1.0
    else:
        assert final["server_test_acc"] is None
    if algorithm == "centralized":
        assert final["clients_ok"] == 0 and final["bytes_up"] == 0
    elif algorithm == "pate":
        # Clients hold teacher ensembles: they vote, they are not evaluated as students.
        assert final["clients_ok"] == 4 and final["client_test_acc_mean"] is None
        assert final["bytes_up_per_client"] == 200 * 10 * 4  # vote counts per proxy query
        assert final["pate_queries"] == 400 and final["epsilon_max"] > 0
    else:
        assert final["clients_ok"] == 4 and 0 <= final["client_test_acc_mean"] <= 1
    if algorithm in ("dsfl", "fedmd", "feddf"):
        # Proxy logits: 200 x 10 float32 per client; the proxy travels as int32 indices.
        assert final["bytes_up_per_client"] == 200 * 10 * 4
        assert final["teacher_test_acc"] is not None
        assert 0.2 < final["teacher_proxy_acc"] <= 1.0  # chance is 0.1
    elif algorithm == "relation":  # the logits, and 10 batches x 190 similarities
        assert final["bytes_up_per_client"] == (200 * 10 + 10 * 190) * 4
        assert 0.2 < final["teacher_proxy_acc"] <= 1.0
    else:
        assert "teacher_proxy_acc" not in final
    if algorithm == "fd":
        assert final["bytes_up_per_client"] == (10 * 10 + 10) * 4
    if algorithm == "local_only":
        assert final["bytes_up"] == 0 and final["bytes_down"] == 0


# Measurements of the machine, not of the run: they differ between layouts and repeats.
TIMINGS = ("wall_s", "learner_s", "learner_max_s", "peak_rss_mb", "peak_gpu_mb", *PHASE_CLOCKS)


def _comparable(rows):
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in rows]


def test_cohorts_give_the_same_metrics_as_one_client_per_node(tmp_path):
    _, _, single, g1 = run_inprocess(tmp_path, ["clients.clients_per_node=1"], name="single")
    _, _, cohort, g2 = run_inprocess(tmp_path, ["clients.clients_per_node=3"], name="cohort")
    assert len(g1.contexts) == 4 and len(g2.contexts) == 2
    assert _comparable(single) == _comparable(cohort)


def test_rows_split_learner_seconds_into_the_nodes_phases(tmp_path):
    _, _, rows, _ = run_inprocess(tmp_path, ["clients.clients_per_node=2"])
    assert len(rows) == 2
    for row in rows:
        for clock in PHASE_CLOCKS:
            assert list(row[clock]) == list(NODE_PHASES), clock
            assert all(s >= 0.0 for s in row[clock].values())
        wall, cpu = row["learner_phases_s"], row["learner_phases_cpu_s"]
        # The phases lie inside each node's learner_s, one after another, in one thread.
        assert sum(wall.values()) <= row["learner_s"] + 1e-3
        assert sum(cpu.values()) <= sum(wall.values()) + 1e-2
        assert wall["train"] > 0 and wall["build"] > 0 and wall["checkpoint"] > 0
    # Round 1's exchange digests nothing; the last row holds the final digest and evaluation.
    assert rows[0]["learner_phases_s"]["digest"] == 0.0
    assert rows[1]["learner_phases_s"]["digest"] > 0 and rows[1]["learner_phases_s"]["evaluate"] > 0
    assert _learner_phases([Exchange()]) == {}  # no node timed anything: no phase keys


def test_cohort_nodes_are_balanced_by_example_count():
    """8 clients of 38 to 167 examples on 2 nodes: by id parity one node would train on
    251 examples and the other on 496; balanced, they differ by less than the smallest client."""
    spec = load_spec(
        None, ["clients.num_clients=8", "clients.clients_per_node=4", "data.alpha=0.2"]
    )
    sizes = [c.num_examples for c in federated_data(spec).clients]
    nodes = [hosted_clients(spec, p, 2) for p in range(2)]
    assert sorted(nodes[0] + nodes[1]) == list(range(8))
    assert [len(n) for n in nodes] == [4, 4]
    totals = [sum(sizes[c] for c in n) for n in nodes]
    assert abs(totals[0] - totals[1]) < min(sizes)
    # One client per node: node i hosts client i (a deployment's site i is client i).
    assert [hosted_clients(spec, p, 8) for p in range(8)] == [[p] for p in range(8)]


def test_proxy_travels_as_indices_never_inputs(tmp_path):
    *_, grid = run_inprocess(tmp_path, [])
    local = [m for m in grid.sent if m.metadata.message_type == MSG_ROUND]
    payload = local[0].content["payload"]
    assert list(payload.keys()) == ["proxy_idx"]
    idx = payload["proxy_idx"].numpy()
    assert idx.dtype == np.int32 and idx.ndim == 1


def test_crashed_node_is_counted_and_round_goes_on(tmp_path):
    def crash(node_index, msg):
        return node_index == 1 and msg.metadata.message_type == MSG_ROUND

    _, summary, rows, _ = run_inprocess(tmp_path, [], crash=crash)
    assert summary["status"] == "completed"
    assert [r["clients_failed"] for r in rows] == [1, 1]
    assert summary["total_clients_failed"] == 2
    assert [r["clients_ok"] for r in rows] == [3, 3]
    assert rows[-1]["server_test_acc"] is not None


def test_nan_logits_are_rejected_not_averaged(tmp_path, monkeypatch):
    original = Strategy.client_round.__func__

    def poisoned(cls, params, learner, round_num, client_ids, payload):
        results = original(cls, params, learner, round_num, client_ids, payload)
        if 2 in results:
            results[2].arrays["logits"][:] = np.nan
        return results

    monkeypatch.setattr(Strategy, "client_round", classmethod(poisoned))
    _, summary, rows, _ = run_inprocess(tmp_path, [])
    assert [r["clients_failed"] for r in rows] == [1, 1]
    assert all(np.isfinite(r["server_test_acc"]) for r in rows)


def test_too_few_clients_skip_aggregation_but_keep_running(tmp_path):
    def crash(node_index, msg):
        return node_index > 0 and msg.metadata.message_type == MSG_ROUND

    _, summary, rows, _ = run_inprocess(tmp_path, [], crash=crash)
    assert summary["status"] == "completed" and len(rows) == 2
    assert [r["clients_ok"] for r in rows] == [1, 1]
    assert [r["clients_failed"] for r in rows] == [3, 3]


def test_a_failing_run_keeps_finished_rounds(tmp_path, monkeypatch):
    from strategies.dsfl import DSFL

    calls = {"n": 0}
    original = DSFL.aggregate

    def fails_in_round_2(self, round_num, updates):
        calls["n"] += 1
        if round_num == 2:
            raise RuntimeError("server student diverged")
        return original(self, round_num, updates)

    monkeypatch.setattr(DSFL, "aggregate", fails_in_round_2)
    with pytest.raises(RuntimeError, match="diverged"):
        run_inprocess(tmp_path, [])
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and "diverged" in summary["error"]


def test_client_sampling_is_seeded_and_respects_minimum():
    spec = load_spec(None, ["clients.fraction=0.3", "clients.min_clients=4"])
    first = sample_clients(spec, 1)
    assert len(first) == 4 and first == sample_clients(spec, 1)
    assert any(sample_clients(spec, r) != first for r in range(2, 6))


def test_recorder_refuses_to_overwrite_a_run(tmp_path):
    run_inprocess(tmp_path, [])
    with pytest.raises(RunDirError, match="already holds a run"):
        RunRecorder(tmp_path / "run", load_spec())


def test_fedavg_clients_start_every_round_from_the_global_model(tmp_path):
    """Averaging independently initialised networks is meaningless: the server's model
    travels with every training request, round 1 included."""
    _, _, rows, grid = run_inprocess(
        tmp_path,
        [
            "algorithm.name=fedavg",
            "clients.students=cnn_small",
            "data.partition=iid",
            "rounds=3",
            "train.epochs=5",
        ],
    )
    local = [m for m in grid.sent if m.metadata.message_type == MSG_ROUND]
    weights = list(local[0].content["payload"].keys())
    model = build_model("cnn_small", (1, 8, 8), 10)
    assert weights == list(model.state_dict()), "round 1 carries the global initialisation"
    model_bytes = sum(local[0].content["payload"][k].numpy().nbytes for k in weights)
    assert rows[0]["bytes_down"] == 4 * model_bytes
    assert rows[0]["bytes_up_per_client"] == model_bytes
    assert rows[-1]["server_test_acc"] > 0.6  # chance is 0.1


def test_one_message_per_node_per_round_carries_the_previous_digest(tmp_path):
    # 4 nodes, 2 rounds: rounds 1 and 2, then one exchange for round 2's digest and evaluation.
    *_, grid = run_inprocess(tmp_path, [])
    sent = [m for m in grid.sent if m.metadata.message_type != MSG_HELLO]
    assert all(m.metadata.message_type == MSG_ROUND for m in sent)
    assert len(sent) == 4 * 3
    first, second, final = sent[:4], sent[4:8], sent[8:]
    for msg in first:
        config, payload = msg.content["config"], msg.content["payload"]
        assert "digest_ids" not in config and list(config["train_ids"]) != []
        assert not any(k.startswith("digest.") for k in payload.keys())
    for msg in second:
        config, payload = msg.content["config"], msg.content["payload"]
        assert config["digest_round"] == 1 and config["round"] == 2
        assert list(config["digest_ids"]) == list(config["train_ids"])
        assert {"digest.proxy_idx", "digest.teacher_logits", "proxy_idx"} <= set(payload.keys())
    for msg in final:
        config = msg.content["config"]
        assert config["digest_round"] == 2 and "train_ids" not in config
        assert list(config["evaluate_ids"]) == list(config["digest_ids"])
    # Every node of an exchange gets the same arrays, encoded once and shared by its messages.
    for exchange in (first, second, final):
        assert all(m.content["payload"] is exchange[0].content["payload"] for m in exchange)
    assert first[0].content["payload"] is not second[0].content["payload"]
