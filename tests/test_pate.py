"""PATE end to end through the round loop: teachers vote, Confident-GNMax answers, ledgers."""

import json

import numpy as np
import pytest
from dp_accounting.rdp import compute_epsilon as rdp_to_epsilon

from fedkd.privacy.accountant import RDP_ORDERS, compute_epsilon
from fedkd.privacy.ledger import PrivacyLedger
from fedkd.privacy.pate import rdp_gnmax_data_independent, rdp_threshold_data_independent
from tests.test_engine import run_inprocess

PATE = [
    "algorithm.name=pate",
    "algorithm.teachers_per_client=5",
    "train.epochs=10",
    "data.partition=iid",
    "distill.proxy_per_round=100",
    "server.student=mlp",
    "server.epochs=20",
]


def test_confident_gnmax_answers_some_queries_and_charges_every_client(tmp_path):
    # 20 teachers; a threshold strong consensus clears, little noise: answered labels are good.
    _, summary, rows, _ = run_inprocess(
        tmp_path,
        [
            *PATE,
            "algorithm.pate_threshold=12",
            "algorithm.pate_sigma_threshold=4",
            "algorithm.pate_sigma=2",
        ],
    )
    final = rows[-1]
    assert final["pate_queries"] == 200
    assert 0 < final["pate_answered"] < 200
    assert final["server_test_acc"] > 0.6  # chance is 0.1
    # Strong consensus with little noise: the released labels are mostly right.
    assert 0.8 < final["pate_label_acc"] <= 1.0
    book = json.loads((tmp_path / "run" / "ledgers.json").read_text())
    assert sorted(book["ledgers"]) == ["0", "1", "2", "3"]
    for cid, saved in book["ledgers"].items():
        ledger = PrivacyLedger.from_dict(saved)
        assert [e.kind for e in ledger.events] == ["pate_query", "pate_query"]
        report = compute_epsilon(ledger)
        assert final["epsilon"][cid] == pytest.approx(report.epsilon, rel=1e-6)
        assert report.epsilon_rdp_data_independent >= report.epsilon
    assert final["epsilon_data_independent_max"] >= final["epsilon_max"] > 0


def test_more_noise_answers_fewer_queries_at_lower_epsilon(tmp_path):
    _, _, quiet, _ = run_inprocess(
        tmp_path,
        [
            *PATE,
            "algorithm.pate_threshold=12",
            "algorithm.pate_sigma_threshold=4",
            "algorithm.pate_sigma=2",
        ],
        name="quiet",
    )
    _, _, noisy, _ = run_inprocess(
        tmp_path,
        [
            *PATE,
            "algorithm.pate_threshold=12",
            "algorithm.pate_sigma_threshold=40",
            "algorithm.pate_sigma=20",
        ],
        name="noisy",
    )
    assert noisy[-1]["epsilon_max"] < quiet[-1]["epsilon_max"]
    assert np.isfinite(noisy[-1]["server_test_acc"])


def test_self_training_labels_unanswered_inputs_each_iteration(tmp_path):
    config = [
        *PATE,
        "algorithm.pate_threshold=12",
        "algorithm.pate_sigma_threshold=4",
        "algorithm.pate_sigma=2",
        "algorithm.self_training_confidence=0.5",
        # The accuracies compared below are exact figures of this data split: with the default
        # validation slice the two runs happen to tie.
        "data.validation_fraction=0",
    ]
    _, _, once, _ = run_inprocess(tmp_path, config, name="once")
    _, _, thrice, _ = run_inprocess(
        tmp_path, [*config, "algorithm.self_training_iterations=3"], name="thrice"
    )
    for rows in (once, thrice):
        final = rows[-1]
        unanswered = 200 - final["pate_answered"]  # data.proxy_size = 200
        assert 0 < final["pate_pseudo_labelled"] <= unanswered
    # Same released labels (the votes do not depend on the student); more self-training.
    assert [r["pate_answered"] for r in once] == [r["pate_answered"] for r in thrice]
    assert thrice[-1]["server_test_acc"] != once[-1]["server_test_acc"]


def _fresh_data_independent_epsilon(ledger: PrivacyLedger) -> float:
    """The guarantee, recomposed here from the ledger's data-independent PATE curves."""
    events = ledger.events
    total = np.sum([e.data_independent_rdp for e in events], axis=0)
    return rdp_to_epsilon(list(events[0].orders), list(total), ledger.delta)[0]


def test_budget_is_never_exceeded_by_the_guarantee(tmp_path):
    # A budget just above what one round can cost at most (every query answered): round 1 fits,
    # a second round of the same kind cannot, whatever the votes.
    sigma1, sigma2, queries = 4.0, 2.0, 100
    worst = queries * (rdp_threshold_data_independent(sigma1) + rdp_gnmax_data_independent(sigma2))
    budget = 1.01 * rdp_to_epsilon(list(RDP_ORDERS), list(worst), 1e-5)[0]
    _, _, rows, _ = run_inprocess(
        tmp_path,
        [
            *PATE,
            "rounds=3",
            "algorithm.pate_threshold=12",
            f"algorithm.pate_sigma_threshold={sigma1}",
            f"algorithm.pate_sigma={sigma2}",
            f"privacy.budget_epsilon={budget}",
        ],
    )
    assert rows[0]["pate_answered"] > 0  # the clients did contribute
    book = json.loads((tmp_path / "run" / "ledgers.json").read_text())
    assert sorted(book["ledgers"]) == ["0", "1", "2", "3"]
    for cid, saved in book["ledgers"].items():
        ledger = PrivacyLedger.from_dict(saved)
        guarantee = _fresh_data_independent_epsilon(ledger)
        assert guarantee <= budget
        # The reported epsilon is that guarantee.
        assert rows[-1]["epsilon"][cid] == pytest.approx(guarantee, rel=1e-9)
    assert rows[-1]["epsilon_max"] <= budget
    assert rows[-1]["clients_stopped"] == 4
    assert rows[-1]["epsilon_data_dependent_unreleased_max"] <= rows[-1]["epsilon_max"]
