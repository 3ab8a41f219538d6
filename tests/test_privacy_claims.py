"""What a run may claim: no finite epsilon for an unprotected release, budgets checked on the
planned round's worst case from round 1, calibration that leaves room for every release."""

import json
import math

import pytest

from fedkd.assembly import dpsgd_settings, unprotected_outputs
from fedkd.privacy.accountant import compute_epsilon, would_exceed_budget
from fedkd.privacy.ledger import (
    DpSgdEvent,
    GaussianReleaseEvent,
    PrivacyLedger,
    UnprotectedReleaseEvent,
    event_from_dict,
)
from fedkd.spec import load_spec
from tests.test_engine import SMALL, run_inprocess
from tests.test_privacy_run import DP, fresh_epsilon

HISTOGRAM = ["algorithm.teacher=class_weighted", "privacy.histogram_noise=20"]


def _ledgers(tmp_path, name="run") -> dict:
    return json.loads((tmp_path / name / "ledgers.json").read_text())["ledgers"]


def test_an_unprotected_release_composes_to_infinity_and_round_trips():
    event = UnprotectedReleaseEvent("train.logits", round=2)
    assert event_from_dict(event.to_dict()) == event
    ledger = PrivacyLedger(0, [DpSgdEvent(0.1, 1.0, 10), GaussianReleaseEvent(5.0)], 8.0)
    assert math.isfinite(compute_epsilon(ledger).epsilon)
    assert not would_exceed_budget(ledger, [])
    ledger.add(event)
    report = compute_epsilon(ledger)
    assert report.method == "unprotected"
    assert math.isinf(report.epsilon) and math.isinf(report.epsilon_rdp)
    assert would_exceed_budget(ledger, [])
    assert PrivacyLedger.from_json(ledger.to_json()).has_unprotected


@pytest.mark.parametrize(
    "privacy",
    [HISTOGRAM, ["privacy.release_noise=5.0"]],
    ids=["histogram_noise", "release_noise"],
)
def test_a_mechanism_without_dp_sgd_reports_infinite_epsilon(tmp_path, privacy, caplog):
    spec, summary, rows, _ = run_inprocess(tmp_path, privacy)
    assert spec.name == "quickstart" and not spec.privacy.dpsgd
    warnings = [r.getMessage() for r in caplog.records if "unprotected" in r.getMessage()]
    assert len(warnings) == 1 and "train.logits" in warnings[0]
    for row in rows:
        assert math.isinf(row["epsilon_max"])
        assert all(math.isinf(e) for e in row["epsilon"].values())
    assert math.isinf(summary["final"]["epsilon_max"])
    for ledger in _ledgers(tmp_path).values():
        unprotected = [e for e in ledger["events"] if e["kind"] == "unprotected_release"]
        assert len(unprotected) == 1 and unprotected[0]["round"] == 1
        assert "train.logits" in unprotected[0]["values"]
    # The mechanism itself is still recorded beside it.
    kinds = {e["kind"] for ledger in _ledgers(tmp_path).values() for e in ledger["events"]}
    assert "gaussian_release" in kinds


def test_no_mechanism_claims_nothing(tmp_path):
    spec, _, rows, _ = run_inprocess(tmp_path, ["rounds=1"])
    assert unprotected_outputs(spec) == []
    assert rows[-1]["epsilon_max"] is None and rows[-1]["epsilon"] is None
    assert not (tmp_path / "run" / "ledgers.json").exists()


def test_dp_sgd_with_the_releases_stays_finite_and_is_not_charged_as_unprotected(tmp_path):
    _, _, rows, _ = run_inprocess(tmp_path, [*DP, "privacy.noise_multiplier=1.0", *HISTOGRAM])
    for cid, ledger in _ledgers(tmp_path).items():
        assert all(e["kind"] != "unprotected_release" for e in ledger["events"])
        assert rows[-1]["epsilon"][cid] == pytest.approx(
            fresh_epsilon(ledger["events"], 1e-5), rel=0.01
        )


def test_a_fixed_noise_budget_is_checked_before_round_1(tmp_path):
    # Learn each client's first-round cost, then set a budget some first rounds exceed: those
    # clients must never train (nothing foresaw round 1 before: they trained and went over).
    fixed = [*DP, "privacy.noise_multiplier=1.0", "rounds=2"]
    _, _, free, _ = run_inprocess(tmp_path, fixed, name="free")
    first = free[0]["epsilon"]
    budget = sorted(first.values())[len(first) // 2] * 0.999
    over = {c for c, e in first.items() if e > budget}
    assert over and len(over) < len(first)
    _, _, rows, _ = run_inprocess(tmp_path, [*fixed, f"privacy.budget_epsilon={budget}"])
    ledgers = _ledgers(tmp_path)
    assert all(not ledgers[c]["events"] for c in over), "a client over budget in round 1 trained"
    assert rows[0]["clients_ok"] == len(first) - len(over)
    assert all(e <= budget for row in rows for e in row["epsilon"].values())


def test_calibration_leaves_room_for_the_per_round_teacher_release(tmp_path):
    spec = load_spec(None, [*SMALL, *DP, "privacy.target_epsilon=2.0", "privacy.release_noise=5"])
    (release,) = dpsgd_settings(spec).other_releases
    assert release.count == spec.rounds == 3  # a client may contribute to every round
    _, _, rows, _ = run_inprocess(
        tmp_path, [*DP, "privacy.target_epsilon=2.0", "privacy.release_noise=5"]
    )
    # Nobody is stopped mid-run by the budget (target_epsilon), and the run spends most of it.
    assert all(r["clients_ok"] == 4 and r["clients_stopped"] == 0 for r in rows)
    final = rows[-1]["epsilon"]
    assert 1.9 < min(final.values()) and max(final.values()) <= 2.0
    for cid, ledger in _ledgers(tmp_path).items():
        kinds = [e["kind"] for e in ledger["events"]]
        assert kinds == ["dp_sgd", "gaussian_release"] * 3
        assert final[cid] == pytest.approx(fresh_epsilon(ledger["events"], 1e-5), rel=0.01)


def test_private_statistics_of_a_private_run_are_flagged_as_oracle_metrics(tmp_path):
    _, _, rows, _ = run_inprocess(tmp_path, [*DP, "privacy.noise_multiplier=1.0", "rounds=1"])
    assert rows[0]["oracle_metrics"] == [
        "client_local_acc_mean",
        "client_val_acc_mean",
        "train_loss_mean",
    ]
    assert rows[0]["train_loss_mean"] > 0 and rows[0]["client_local_acc_mean"] is not None
    assert rows[0]["client_val_acc_mean"] is not None
    _, _, plain, _ = run_inprocess(tmp_path, ["rounds=1"], name="plain")
    assert "oracle_metrics" not in plain[0] and plain[0]["train_loss_mean"] > 0
