"""The [faults] table: simulated crashes, stragglers, NaN uploads, Byzantine attacks, and the
history defence (docs/faults.md)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedkd.apps.client_app import make_client_app
from fedkd.apps.faults import ServerFaults, act_in_clients
from fedkd.apps.server_app import Exchange, run_rounds
from fedkd.assembly import federated_data
from fedkd.faults import (
    HistoryDefence,
    attack_upload,
    byzantine_clients,
    client_faults,
    with_flipped_labels,
)
from fedkd.learner.cohort import ClientResult
from fedkd.results import RunRecorder
from fedkd.run import cli
from fedkd.spec import SpecError, load_spec
from tests.inprocess import InProcessGrid
from tests.test_engine import TIMINGS

# The quickstart, small enough for a test yet trained well enough that its students' logits
# rank the classes (one architecture, 10 clients).
SMALL = [
    "rounds=6",
    "clients.num_clients=10",
    "clients.students=mlp",
    "data.proxy_size=200",
    "train.epochs=3",
    "train.lr=0.1",
    "distill.epochs=1",
    "server.epochs=2",
]


def run(tmp_path: Path, overrides: list[str], name: str = "run") -> list[dict]:
    spec = load_spec(None, SMALL + overrides)
    run_rounds(
        InProcessGrid(make_client_app(spec), spec.num_nodes),
        spec,
        RunRecorder(tmp_path / name, spec),
    )
    lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in lines]


def honest_logits(n: int = 40, c: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 2, (n, c)).astype(np.float32)


# -- the draws ---------------------------------------------------------------------------------


def test_fault_draws_depend_on_seed_round_and_client_only():
    draws = [client_faults(3, 2, c, 0.3, 0.3, 0.3) for c in range(200)]
    assert draws == [client_faults(3, 2, c, 0.3, 0.3, 0.3) for c in range(200)]
    assert draws != [client_faults(4, 2, c, 0.3, 0.3, 0.3) for c in range(200)]
    crashed = sum(d.crashed for d in draws)
    assert 40 <= crashed <= 80  # 30% of 200
    assert not any(d.crashed and (d.straggled or d.nan) for d in draws)
    assert not any(
        client_faults(3, 2, c, 0, 0, 0) != client_faults(0, 0, 0, 0, 0, 0) for c in range(50)
    )


def test_byzantine_clients_are_a_fixed_seeded_choice():
    chosen = byzantine_clients(0, 10, 0.3)
    assert len(chosen) == 3 and chosen == sorted(set(chosen))
    assert chosen == byzantine_clients(0, 10, 0.3)
    assert len(byzantine_clients(0, 20, 0.2)) == 4
    assert byzantine_clients(0, 10, 0.0) == []


# -- what each attack sends --------------------------------------------------------------------


def test_invert_negates():
    x = honest_logits()
    assert np.array_equal(attack_upload("invert", x, 0, 1, 2), -x)


def test_loss_max_labels_every_input_with_its_least_likely_class():
    x = honest_logits()
    sent = attack_upload("loss_max", x, 0, 1, 2)
    assert np.array_equal(sent.argmax(1), x.argmin(1))
    assert np.allclose(sent.max(1), x.max(1)) and np.allclose(sent.min(1), x.min(1))


def test_class_prior_sends_the_class_least_similar_to_the_prediction():
    x = honest_logits()
    x[:20, 3] += 8  # the client predicts 3 on the first half ...
    x[:20, 5] -= 40  # ... and never 5 there
    sent = attack_upload("class_prior", x, 0, 1, 2)
    assert (x[:20].argmax(1) == 3).all() and (sent[:20].argmax(1) == 5).all()
    assert (sent.argmax(1) != x.argmax(1)).all()


def test_top_k_rotates_the_k_most_likely_classes():
    x = honest_logits()
    order = np.argsort(-x, axis=1)
    sent = attack_upload("top_k", x, 0, 1, 2, top_k=3)
    rows = np.arange(len(x))
    assert np.array_equal(sent.argmax(1), order[:, 2])  # the 3rd class wins
    assert np.array_equal(sent[rows, order[:, 0]], x[rows, order[:, 1]])
    assert np.array_equal(sent[rows, order[:, 3:].T].T, x[rows, order[:, 3:].T].T)  # rest kept


def test_random_is_seeded_and_at_the_upload_scale():
    x = honest_logits(400)
    sent = attack_upload("random", x, 0, 1, 2)
    assert np.array_equal(sent, attack_upload("random", x, 0, 1, 2))
    assert not np.array_equal(sent, attack_upload("random", x, 0, 2, 2))
    assert abs(sent.std() - x.std()) < 0.1 and sent.dtype == x.dtype
    assert abs(np.corrcoef(sent.ravel(), x.ravel())[0, 1]) < 0.1


def test_label_flip_poisons_only_the_byzantine_clients_training_labels():
    spec = load_spec(None, ["faults.byzantine_fraction=0.3", "faults.attack=label_flip"])
    clean = federated_data(load_spec(None, []))
    flipped = federated_data(spec)
    bad = byzantine_clients(spec.seed, 10, 0.3)
    for cid, (a, b) in enumerate(zip(clean.clients, flipped.clients, strict=True)):
        if cid in bad:
            assert np.array_equal(b.y_train, (a.y_train + 1) % clean.num_classes)
        else:
            assert b.y_train is a.y_train
        assert np.array_equal(a.y_local_test, b.y_local_test)
    assert with_flipped_labels(clean, bad) is with_flipped_labels(clean, bad)


# -- at the server -----------------------------------------------------------------------------


def exchange_of(uploads: dict[int, np.ndarray], spec=None, rnd: int = 1) -> Exchange:
    """What the server takes from one node whose clients computed `uploads` honestly and then
    (with `spec`) misbehaved as its [faults] says."""
    parts = {
        "train": {
            c: ClientResult({"logits": x}, {"num_examples": 10.0}) for c, x in uploads.items()
        },
        "digest": {c: ClientResult({}, {"distill_loss": 1.0}) for c in uploads},
    }
    if spec is not None:
        parts = act_in_clients(spec, rnd, parts)
    exchange = Exchange()
    exchange.take({part: sorted(uploads) for part in ("train", "digest")}, parts)
    return exchange


def test_server_receives_the_attacked_uploads_of_byzantine_clients_only():
    spec = load_spec(None, ["faults.byzantine_fraction=0.3", "faults.attack=invert"])
    uploads = {c: honest_logits(seed=c) for c in range(10)}
    exchange = exchange_of(uploads, spec, 1)
    row = ServerFaults(spec).act(1, exchange, list(range(10)))
    bad = byzantine_clients(0, 10, 0.3)
    assert row["byzantine_clients"] == bad and row["byzantine_uploads"] == 3
    for cid in range(10):
        got = exchange.results["train"][cid].arrays["logits"]
        assert np.array_equal(got, -uploads[cid] if cid in bad else uploads[cid])


def test_crashes_stragglers_and_nan_act_on_the_replies():
    spec = load_spec(
        None,
        [
            "faults.crash_rate=0.2",
            "faults.straggler_rate=0.2",
            "faults.straggler_delay=30",
            "faults.nan_rate=0.2",
            "resources.round_timeout=10",
        ],
    )
    exchange = exchange_of({c: honest_logits(seed=c) for c in range(40)}, spec, 3)
    row = ServerFaults(spec).act(3, exchange, list(range(40)))
    hit = row["faults_clients"]
    assert hit["crashed"] and hit["late"] == hit["straggled"] and hit["nan"]
    for cid in hit["crashed"] + hit["late"]:  # the whole reply is lost, with its cause
        assert cid in exchange.failed and cid not in exchange.results["digest"]
    assert "crash" in exchange.causes[hit["crashed"][0]]
    assert exchange.causes[hit["late"][0]].startswith("no reply within")
    assert sorted(exchange.rejected["train"]) == hit["nan"]  # the non-finite rejection
    assert all(np.isnan(exchange.rejected["train"][c].arrays["logits"]).all() for c in hit["nan"])
    assert set(exchange.results["digest"]) >= set(hit["nan"])  # only the upload was NaN
    assert (
        len(exchange.results["train"])
        == 40 - row["faults_crashed"] - row["faults_late"] - row["faults_nan"]
    )
    # A straggler within the timeout still counts.
    spec = load_spec(
        None,
        ["faults.straggler_rate=0.5", "faults.straggler_delay=5", "resources.round_timeout=10"],
    )
    exchange = exchange_of({c: honest_logits(seed=c) for c in range(40)}, spec, 3)
    row = ServerFaults(spec).act(3, exchange, list(range(40)))
    assert row["faults_straggled"] > 0 and row["faults_late"] == 0
    assert len(exchange.results["train"]) == 40


def test_history_defence_rejects_a_client_that_attacks_every_round():
    defence = HistoryDefence(decay=0.5, threshold=2.0)
    rng = np.random.default_rng(0)
    truth = rng.normal(0, 3, (50, 10))
    for _ in range(4):
        uploads = {c: truth + rng.normal(0, 1, truth.shape) for c in range(10)}
        uploads[7] = -uploads[7]
        screening = defence.screen(uploads)
    assert screening.rejected == [7]
    assert 7 not in screening.weights
    assert all(0 < w < 1 and screening.scores[c] > 1 for c, w in screening.weights.items())


def test_history_defence_rejects_exactly_the_byzantine_clients_and_helps(tmp_path):
    attack = ["faults.byzantine_fraction=0.3", "faults.attack=invert"]
    undefended = run(tmp_path, attack, "undefended")
    defended = run(tmp_path, [*attack, "faults.defence=history"], "defended")
    bad = defended[0]["byzantine_clients"]
    assert len(bad) == 3
    for row in defended[-3:]:
        assert row["faults_clients"]["defence_rejected"] == bad
        assert row["defence_rejected"] == 3 and row["clients_failed"] == 3
    assert defended[-1]["server_test_acc"] > undefended[-1]["server_test_acc"] + 0.03
    assert all(r["defence_rejected"] == 0 for r in undefended)
    summary = json.loads((tmp_path / "defended" / "summary.json").read_text())
    assert summary["total_defence_rejected"] == sum(r["defence_rejected"] for r in defended)


def test_the_same_faulty_spec_gives_the_same_metrics(tmp_path):
    faulty = [
        "rounds=3",
        "faults.crash_rate=0.2",
        "faults.nan_rate=0.1",
        "faults.straggler_rate=0.1",
        "faults.straggler_delay=700",
        "faults.byzantine_fraction=0.2",
        "faults.attack=loss_max",
        "faults.defence=history",
    ]
    first, second = run(tmp_path, faulty, "a"), run(tmp_path, faulty, "b")
    assert first == second
    hit = [r["faults_crashed"] + r["faults_late"] + r["faults_nan"] for r in first]
    assert sum(hit) > 0
    lost = {e["client"] for r in first for e in r["clients_lost"]}
    assert lost  # recorded with their cause


# -- refused combinations ----------------------------------------------------------------------

REFUSED = {
    "faults.crash_rate=1": "faults.crash_rate",
    "faults.nan_rate=-0.1": "faults.nan_rate",
    "faults.straggler_rate=0.1": "faults.straggler_delay",
    "faults.attack=evil": "faults.attack",
    "faults.byzantine_fraction=0.2": "faults.attack",
    "faults.attack=invert": "faults.byzantine_fraction",
    "faults.defence=expguard": "faults.defence",
    "faults.defence_threshold=1": "faults.defence_threshold",
    "faults.defence_decay=1": "faults.defence_decay",
    "faults.top_k=1": "faults.top_k",
}
REFUSED_WITH = {
    # An attack on logits of an algorithm that uploads weights or votes.
    "fedavg_invert": (
        [
            "algorithm.name=fedavg",
            "clients.students=cnn_small",
            "faults.attack=invert",
            "faults.byzantine_fraction=0.2",
        ],
        "faults.attack",
    ),
    "pate_top_k": (
        ["algorithm.name=pate", "faults.attack=top_k", "faults.byzantine_fraction=0.2"],
        "faults.attack",
    ),
    # A defence without logits on proxy inputs.
    "fd_history": (["algorithm.name=fd", "faults.defence=history"], "faults.defence"),
    "fedavg_history": (
        ["algorithm.name=fedavg", "clients.students=cnn_small", "faults.defence=history"],
        "faults.defence",
    ),
    "centralized_crash": (["algorithm.name=centralized", "faults.crash_rate=0.1"], "[faults]"),
    "release_history": (
        ["algorithm.name=fedmd", "privacy.release_noise=1", "faults.defence=history"],
        "faults.defence",
    ),
}


@pytest.mark.parametrize("override", list(REFUSED))
def test_bad_fault_values_are_refused(override):
    with pytest.raises(SpecError, match=REFUSED[override].replace("[", r"\[")):
        load_spec(None, [override])


@pytest.mark.parametrize("case", list(REFUSED_WITH))
def test_senseless_combinations_are_one_line_exit_2(case, monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise AssertionError("the input reached the simulation engine")

    monkeypatch.setattr(cli, "simulate", refuse)
    monkeypatch.chdir(tmp_path)
    overrides, key = REFUSED_WITH[case]
    args = ["run", *[a for o in overrides for a in ("--set", o)]]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 2, (result.stderr, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and key in lines[0], result.stderr


def test_label_flip_and_the_attacks_on_class_logits_are_accepted():
    load_spec(
        None,
        [
            "algorithm.name=fedavg",
            "clients.students=cnn_small",
            "faults.attack=label_flip",
            "faults.byzantine_fraction=0.2",
        ],
    )
    load_spec(None, ["algorithm.name=fd", "faults.attack=invert", "faults.byzantine_fraction=0.2"])


def test_a_lost_reply_s_dp_sgd_steps_are_charged_when_the_client_next_replies(tmp_path):
    dp = ["rounds=3", "privacy.dpsgd=true", "privacy.noise_multiplier=1.0"]
    faulty = [*dp, "faults.crash_rate=0.2", "faults.straggler_rate=0.2"]
    faulty += ["faults.straggler_delay=900", "resources.round_timeout=600"]
    rows = run(tmp_path, faulty, "faulty")
    run(tmp_path, dp, "clean")

    def steps(name: str) -> dict[str, int]:
        ledgers = json.loads((tmp_path / name / "ledgers.json").read_text())["ledgers"]
        return {
            cid: sum(e["steps"] for e in ledger["events"] if e["kind"] == "dp_sgd")
            for cid, ledger in ledgers.items()
        }

    lost_early = {
        str(c)
        for r in rows[:-1]
        for c in r["faults_clients"]["crashed"] + r["faults_clients"]["late"]
    }
    lost_last = {
        str(c) for c in rows[-1]["faults_clients"]["crashed"] + rows[-1]["faults_clients"]["late"]
    }
    caught_up = lost_early - lost_last
    assert caught_up  # some client lost a reply and replied again later
    faulty_steps, clean_steps = steps("faulty"), steps("clean")
    for cid in caught_up:
        assert faulty_steps[cid] == clean_steps[cid] > 0


def test_submit_refuses_simulated_faults(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    args = ["submit", "--connection", "127.0.0.1:9093", "--set", "faults.crash_rate=0.1"]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 2, (result.stderr, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "[faults]" in lines[0], result.stderr


def test_the_defence_rejects_at_the_server_and_down_weights_the_teacher_weight():
    spec = load_spec(None, ["faults.defence=history"])
    faults = ServerFaults(spec)
    rng = np.random.default_rng(1)
    truth = rng.normal(0, 3, (60, 10))
    for rnd in (1, 2, 3):
        uploads = {c: (truth + rng.normal(0, 2, truth.shape)).astype(np.float32) for c in range(10)}
        uploads[4] = -uploads[4]
        exchange = exchange_of(uploads, spec, rnd)
        row = faults.act(rnd, exchange, list(range(10)))
    assert row["faults_clients"]["defence_rejected"] == [4]
    assert 4 in exchange.rejected["train"] and "history defence" in exchange.causes[4]
    assert 4 not in exchange.results["train"]
    weighted = row["faults_clients"]["defence_downweighted"]
    assert weighted
    for cid, res in exchange.results["train"].items():
        weight = res.metrics["num_examples"] / 10.0
        assert (weight < 1) == (cid in weighted)
        assert np.isclose(weight, min(1.0, 1 / row["defence_scores"][str(cid)]))


def test_faults_act_in_the_client_before_its_reply_leaves():
    """What a node replies already holds the faults: the server's inputs are not edited."""
    spec = load_spec(
        None,
        [
            "faults.byzantine_fraction=0.3",
            "faults.attack=invert",
            "faults.crash_rate=0.2",
            "faults.nan_rate=0.2",
        ],
    )
    uploads = {c: honest_logits(seed=c) for c in range(40)}
    honest = {
        "train": {
            c: ClientResult({"logits": x}, {"num_examples": 1.0}) for c, x in uploads.items()
        },
        "evaluate": {c: ClientResult({}, {"test_acc": 0.5}) for c in uploads},
    }
    sent = act_in_clients(spec, 2, honest)
    bad = set(byzantine_clients(0, 10, 0.3))  # of the spec's 10 clients
    crashed = set(uploads) - set(sent["train"])
    assert crashed and crashed.isdisjoint(sent["evaluate"])  # a crash loses the whole reply
    for cid, res in sent["train"].items():
        x = res.arrays["logits"]
        if np.isnan(x).all():
            continue
        assert np.array_equal(x, -uploads[cid] if cid in bad else uploads[cid])
    assert any(np.isnan(r.arrays["logits"]).all() for r in sent["train"].values())
    # The server counts what the clients did from the same seeded draws.
    exchange = Exchange()
    exchange.take({"train": sorted(uploads), "evaluate": sorted(uploads)}, sent)
    row = ServerFaults(spec).act(2, exchange, sorted(uploads))
    assert set(row["faults_clients"]["crashed"]) == crashed
