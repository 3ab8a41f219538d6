"""Differential privacy through the round loop: DP-SGD clients (Opacus), releases, ledgers."""

import json

import dp_accounting
import numpy as np
import pytest
import torch

import strategies.base
from fedkd.assembly import federated_data
from fedkd.data import load_federated_data
from fedkd.knowledge import match_class_prior
from fedkd.learner.loop import OptimConfig, init_student, make_optimizer, seeded_generator
from fedkd.privacy.dpsgd import DpSgdSettings, train_dpsgd
from fedkd.privacy.ledger import PrivacyLedger
from strategies.base import Strategy
from tests.test_engine import run_inprocess

DP = ["privacy.dpsgd=true", "privacy.max_grad_norm=1.0", "train.epochs=1", "rounds=3"]


def fresh_epsilon(events: list[dict], delta: float) -> float:
    """Compose a saved ledger's events with dp-accounting directly (no fedkd code)."""
    accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    for e in events:
        if e["kind"] == "dp_sgd":
            step = dp_accounting.PoissonSampledDpEvent(
                e["sample_rate"], dp_accounting.GaussianDpEvent(e["noise_multiplier"])
            )
            accountant.compose(dp_accounting.SelfComposedDpEvent(step, e["steps"]))
        elif e["kind"] == "gaussian_release":
            accountant.compose(
                dp_accounting.SelfComposedDpEvent(
                    dp_accounting.GaussianDpEvent(e["noise_multiplier"]), e["count"]
                )
            )
    return accountant.get_epsilon(delta)


def test_opacus_trains_the_same_model_across_rounds_without_hook_errors():
    data = load_federated_data(source="digits", num_clients=4, proxy_size=200, seed=0)
    client = data.clients[0]
    model = init_student("cnn_small", data.input_shape, 10, 0, 0, 0)
    opt = make_optimizer(model.parameters(), OptimConfig(), torch_optimizer=True)
    settings = DpSgdSettings(max_grad_norm=1.0, delta=1e-5, noise_multiplier=1.0)
    for rnd in range(1, 4):
        stats, event = train_dpsgd(
            model,
            opt,
            client.x_train,
            client.y_train,
            epochs=1,
            batch_size=32,
            settings=settings,
            generator=seeded_generator(rnd),
            round_num=rnd,
        )
        assert np.isfinite(stats["loss"]) and event.steps == stats["steps"] > 0
        assert event.sample_rate == pytest.approx(1 / np.ceil(client.num_examples / 32))
        hooks = sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())
        assert hooks == 0, "Opacus hooks must not survive the round"
        assert all(getattr(p, "grad_sample", None) is None for p in model.parameters())


def test_epsilon_grows_and_equals_a_fresh_composition_of_the_saved_ledger(tmp_path):
    spec, _, rows, _ = run_inprocess(tmp_path, [*DP, "privacy.noise_multiplier=1.0"])
    eps_max = [r["epsilon_max"] for r in rows]
    assert eps_max[0] > 0 and eps_max == sorted(eps_max) and eps_max[2] > eps_max[0]
    book = json.loads((tmp_path / "run" / "ledgers.json").read_text())
    assert set(book["ledgers"]) == {"0", "1", "2", "3"}
    for cid, ledger in book["ledgers"].items():
        assert len(ledger["events"]) == 3  # one DP-SGD event per round
        reported = rows[-1]["epsilon"][cid]
        assert reported == pytest.approx(fresh_epsilon(ledger["events"], 1e-5), rel=0.01)
        # and the ledger file is a real, reloadable PrivacyLedger
        assert PrivacyLedger.from_dict(ledger).client_id == int(cid)


@pytest.mark.parametrize("teacher", ["class_weighted", "pooled_likelihood"])
def test_histogram_teacher_charges_each_histogram_once_within_the_target(tmp_path, teacher):
    _, _, rows, _ = run_inprocess(
        tmp_path,
        [
            *DP,
            "privacy.target_epsilon=2.0",
            f"algorithm.teacher={teacher}",
            "privacy.histogram_noise=20",
        ],
    )
    # Calibration left room for the histogram: nobody is stopped by the budget.
    assert all(r["clients_ok"] == 4 and r["clients_stopped"] == 0 for r in rows)
    book = json.loads((tmp_path / "run" / "ledgers.json").read_text())
    for cid, ledger in book["ledgers"].items():
        kinds = [(e["kind"], e["round"]) for e in ledger["events"]]
        # One release of the histogram (round 1), though it travels with every round's logits.
        assert kinds.count(("gaussian_release", 1)) == 1
        assert [k for k, _ in kinds].count("gaussian_release") == 1
        assert [k for k, _ in kinds].count("dp_sgd") == 3
        assert ledger["events"][-1]["kind"] == "dp_sgd"
        reported = rows[-1]["epsilon"][cid]
        assert reported == pytest.approx(fresh_epsilon(ledger["events"], 1e-5), rel=0.01)
        assert 0.97 * 2.0 <= reported <= 2.0


def test_class_weighted_teacher_without_privacy_uses_exact_counts(tmp_path):
    _, _, rows, _ = run_inprocess(tmp_path, ["algorithm.teacher=class_weighted", "rounds=2"])
    assert not (tmp_path / "run" / "ledgers.json").exists()
    assert rows[-1]["epsilon_max"] is None
    assert 0.1 < rows[-1]["teacher_test_acc"] <= 1.0


def test_matched_teacher_follows_the_clients_pooled_label_prior(tmp_path, monkeypatch):
    calls = []

    def recording(teacher, prior):
        out = match_class_prior(teacher, prior)
        calls.append((prior, out))
        return out

    monkeypatch.setattr(strategies.base, "match_class_prior", recording)
    spec, _, rows, _ = run_inprocess(
        tmp_path,
        ["algorithm.teacher=pooled_likelihood", "algorithm.match_class_prior=true", "rounds=2"],
    )
    # Each round's teacher on the whole proxy set (200 inputs) and on the test set.
    data = federated_data(spec)
    sizes = sorted(len(teacher) for _, teacher in calls)
    assert sizes == [200, 200, len(data.test_y), len(data.test_y)]
    assert rows[-1]["clients_ok"] == 4 and rows[-1]["teacher_test_acc"] is not None
    pooled = sum(np.bincount(c.y_train, minlength=10) for c in data.clients)
    for prior, teacher in calls:
        # Without privacy the histograms are the exact counts.
        np.testing.assert_array_equal(prior.numpy(), pooled)
        totals = teacher.double().exp().sum(dim=0).numpy()
        np.testing.assert_allclose(totals, len(teacher) * pooled / pooled.sum(), atol=1e-3)


def test_budget_stops_each_client_exactly_when_its_next_round_would_exceed_it(tmp_path):
    # First learn what each round costs each client, then set a budget between rounds 2 and 3.
    _, _, free, _ = run_inprocess(tmp_path, [*DP, "privacy.noise_multiplier=1.0"], name="free")
    eps = {c: [r["epsilon"][c] for r in free] for c in free[-1]["epsilon"]}
    budget = float(np.median([(e[1] + e[2]) / 2 for e in eps.values()]))
    _, _, rows, _ = run_inprocess(
        tmp_path,
        [*DP, "privacy.noise_multiplier=1.0", f"privacy.budget_epsilon={budget}"],
        name="capped",
    )
    book = json.loads((tmp_path / "capped" / "ledgers.json").read_text())
    for cid, costs in eps.items():
        expected_rounds = sum(1 for e in costs if e <= budget)
        ledger = book["ledgers"].get(cid, {"events": []})
        assert len(ledger["events"]) == expected_rounds, (cid, costs, budget)
        assert rows[-1]["epsilon"].get(cid, 0.0) <= budget
    stopped = {c for c, costs in eps.items() if costs[-1] > budget}
    assert stopped and book["stopped"] == sorted(int(c) for c in stopped)
    assert rows[-1]["clients_ok"] == 4 - len(stopped)


def _dp_sgd_rounds(ledger: dict) -> list[int]:
    return [e["round"] for e in ledger["events"] if e["kind"] == "dp_sgd"]


def _dp_sgd_steps(ledger: dict) -> list[int]:
    return [e["steps"] for e in ledger["events"] if e["kind"] == "dp_sgd"]


def test_dp_sgd_behind_a_non_finite_upload_is_still_charged(tmp_path, monkeypatch):
    original = Strategy.client_round.__func__

    def poisoned(cls, params, learner, round_num, client_ids, payload):
        results = original(cls, params, learner, round_num, client_ids, payload)
        if round_num == 2 and 2 in results:
            results[2].arrays["logits"][:] = np.nan
        return results

    monkeypatch.setattr(Strategy, "client_round", classmethod(poisoned))
    _, _, rows, _ = run_inprocess(tmp_path, [*DP, "privacy.noise_multiplier=1.0"])
    assert [r["clients_failed"] for r in rows] == [0, 1, 0]
    book = json.loads((tmp_path / "run" / "ledgers.json").read_text())
    # The upload was dropped, but the client's state kept the round's DP-SGD steps.
    assert _dp_sgd_rounds(book["ledgers"]["2"]) == [1, 2, 3]


def test_a_round_answered_too_late_is_charged_when_the_client_next_replies(tmp_path):
    # 4 rounds: the round after the catch-up must not charge the late round again. The late
    # round trains 3 epochs and the one that charges it 1: the catch-up charges the steps
    # that ran, not another round like the current one.
    overrides = [*DP, "privacy.noise_multiplier=1.0", "rounds=4", "train.epochs_schedule=[1, 3, 1]"]
    _, _, on_time, _ = run_inprocess(tmp_path, overrides, name="on_time")

    def late(node_index, msg):  # node 1 trains round 2 but its reply comes after the timeout
        return node_index == 1 and msg.metadata.group_id == "2"

    spec, _, rows, _ = run_inprocess(tmp_path, overrides, name="late", late=late)
    # Round 1's upload was used (it counts as ok there); the lost message also carried its
    # round-1 digest, which round 1's row counts apart.
    assert [r["clients_failed"] for r in rows] == [0, 1, 0, 0]
    assert [r["clients_digest_failed"] for r in rows] == [1, 0, 0, 0]
    book = json.loads((tmp_path / "late" / "ledgers.json").read_text())
    late_clients = [c for c in range(4) if _dp_sgd_rounds(book["ledgers"][str(c)]) == [1, 3, 3, 4]]
    assert late_clients and len(late_clients) == spec.clients.num_clients // spec.num_nodes
    on_time_book = json.loads((tmp_path / "on_time" / "ledgers.json").read_text())
    for c in range(4):
        steps = [_dp_sgd_steps(b["ledgers"][str(c)]) for b in (book, on_time_book)]
        assert sum(steps[0]) == sum(steps[1])
        if c in late_clients:  # rounds 1, 2 (charged in round 3), 3 and 4: 1, 3, 1, 1 epochs
            assert steps[0] == [steps[1][0], steps[1][1], steps[1][2], steps[1][3]]
            assert steps[1][1] == 3 * steps[1][0]
        # Same steps at the same noise as on time: the same epsilon, whatever round charged them.
        assert rows[-1]["epsilon"][str(c)] == pytest.approx(on_time[-1]["epsilon"][str(c)])
        events = book["ledgers"][str(c)]["events"]
        assert fresh_epsilon(events, 1e-5) == pytest.approx(rows[-1]["epsilon"][str(c)], rel=0.01)


def test_calibrated_noise_keeps_every_client_within_target_for_the_whole_run(tmp_path):
    _, _, rows, _ = run_inprocess(tmp_path, [*DP, "privacy.target_epsilon=2.0"])
    assert all(r["clients_ok"] == 4 for r in rows), "calibration plans for every round"
    final = rows[-1]["epsilon"]
    assert max(final.values()) <= 2.0
    assert min(final.values()) > 1.9  # calibrated for the run, not per round


def test_an_epoch_schedule_is_calibrated_for_and_budgeted_round_by_round(tmp_path):
    # 3 epochs, then 1: calibrated for 5 epochs in all. Projecting round 2 at round 1's cost
    # (3 epochs) would stop every client, since the target leaves room for 2 more epochs only.
    schedule = [*DP, "privacy.target_epsilon=2.0", "train.epochs_schedule=[3, 1]"]
    _, _, rows, _ = run_inprocess(tmp_path, schedule)
    assert all(r["clients_ok"] == 4 for r in rows)
    book = json.loads((tmp_path / "run" / "ledgers.json").read_text())
    assert book["stopped"] == []
    for cid, ledger in book["ledgers"].items():
        steps = _dp_sgd_steps(ledger)
        assert steps[0] == 3 * steps[1] and steps[1] == steps[2]
        final = rows[-1]["epsilon"][cid]
        assert 1.9 < final <= 2.0
        assert fresh_epsilon(ledger["events"], 1e-5) == pytest.approx(final, rel=0.01)
    # Growing epochs: round 2 costs 3 times round 1. A budget between "round 1 twice" and
    # "round 1, then 3 times as many steps" must stop the client before round 2.
    growing = [*DP, "rounds=2", "privacy.noise_multiplier=1.0", "train.epochs_schedule=[1, 3]"]
    _, _, free, _ = run_inprocess(tmp_path, growing, name="free")
    free_book = json.loads((tmp_path / "free" / "ledgers.json").read_text())
    middles = {}
    for cid, ledger in free_book["ledgers"].items():
        first = ledger["events"][0]
        as_round_1 = fresh_epsilon([first, first], 1e-5)
        middles[cid] = (as_round_1 + free[-1]["epsilon"][cid]) / 2
    cid, budget = min(middles.items(), key=lambda item: item[1])
    _, _, capped, _ = run_inprocess(
        tmp_path, [*growing, f"privacy.budget_epsilon={budget}"], name="capped"
    )
    capped_book = json.loads((tmp_path / "capped" / "ledgers.json").read_text())
    assert int(cid) in capped_book["stopped"]
    assert _dp_sgd_rounds(capped_book["ledgers"][cid]) == [1]
    # The first round is checked too (its cost is foreseen from the client's size).
    for c, eps in capped[-1]["epsilon"].items():
        assert eps <= budget, (c, eps, budget)


def test_budget_projection_scales_dp_sgd_steps_to_the_next_rounds_epochs():
    from fedkd.privacy.book import LedgerBook
    from fedkd.privacy.ledger import DpSgdEvent

    book = LedgerBook(delta=1e-5, budget_epsilon=10.0)
    book.record(0, DpSgdEvent(sample_rate=0.1, noise_multiplier=1.0, steps=100, round=1))
    epochs = {1: 10, 2: 3, 3: 3}.__getitem__
    (planned,) = book.planned_events(0, 2, epochs_in=epochs)
    assert (planned.steps, planned.round, planned.noise_multiplier) == (30, 2, 1.0)
    (same,) = book.planned_events(0, 2)  # no schedule: the last round again
    assert same.steps == 100


def test_gaussian_release_charges_every_contributor_each_round(tmp_path):
    # With DP-SGD: without it the students' outputs leave unprotected (epsilon inf).
    release = [*DP, "privacy.noise_multiplier=1.0", "privacy.release_noise=5.0", "rounds=2"]
    _, _, rows, _ = run_inprocess(tmp_path, release)
    book = json.loads((tmp_path / "run" / "ledgers.json").read_text())
    for ledger in book["ledgers"].values():
        kinds = [e["kind"] for e in ledger["events"]]
        assert kinds == ["dp_sgd", "gaussian_release"] * 2
        # Example-level sensitivity of a clipped probability matrix is sqrt(2) * clip.
        assert ledger["events"][1]["noise_multiplier"] == pytest.approx(5.0 / np.sqrt(2))
    assert rows[1]["epsilon_max"] > rows[0]["epsilon_max"] > 0
    assert np.isfinite(rows[-1]["server_test_acc"])


def test_release_noise_scale_on_the_teacher():
    from fedkd.privacy.gaussian_release import private_sum_of_probabilities

    zeros = torch.zeros(3, 200, 10)
    noisy = private_sum_of_probabilities(zeros, 2.0, 1.5, seeded_generator(7))
    assert float(noisy.std()) == pytest.approx(3.0, rel=0.03)
