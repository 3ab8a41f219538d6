"""The teacher options of the logit algorithms, end to end: confidence-weighted teachers
(`algorithm.teacher_confidence`, `algorithm.teacher_prior_agreement`) and the clients'
self-distillation from their own earlier model (`algorithm.self_distill_weight`,
`strategies.self_distill`), on both learners."""

from __future__ import annotations

import numpy as np
import pytest

from fedkd.data import load_federated_data
from fedkd.learner.cohort import CohortLearner
from fedkd.learner.vectorised import VectorisedCohortLearner
from strategies.dsfl import DSFL
from strategies.fedmd import FedMD
from tests.test_algorithm_fingerprints import _golden, run_case
from tests.test_vectorised import assert_same_states, config

CLIENTS = [0, 1, 2]
PROXY = np.arange(0, 120, 2)


@pytest.fixture(scope="module")
def data():
    return load_federated_data(source="digits", num_clients=3, proxy_size=120, seed=0)


def _teacher(rnd: int) -> np.ndarray:
    return np.random.default_rng(rnd).normal(size=(len(PROXY), 10)).astype(np.float32)


def _round(strategy, params, learner, rnd: int) -> None:
    """One round of a logit algorithm's client side: train and upload, then digest."""
    plan = {"proxy_idx": PROXY.astype(np.int32)}
    strategy.client_round(params, learner, rnd, CLIENTS, plan)
    strategy.client_digest(params, learner, rnd, CLIENTS, {**plan, "teacher_logits": _teacher(rnd)})


def test_clients_keep_their_earlier_logits_and_distill_towards_the_mix(data):
    cfg = config()
    learner = CohortLearner(data, cfg, {})
    params = DSFL.Params(self_distill_weight=0.3)
    inputs = data.proxy_x[PROXY]
    _round(DSFL, params, learner, 1)
    before = learner.logits(CLIENTS, inputs)  # the models the clients hold before round 2
    plan = {"proxy_idx": PROXY.astype(np.int32)}
    uploads = DSFL.client_round(params, learner, 2, CLIENTS, plan)
    for cid in CLIENTS:
        kept = learner.kept(cid)
        assert int(kept["round"][0]) == 2 and np.array_equal(kept["proxy_idx"], PROXY)
        np.testing.assert_array_equal(kept["logits"], before[cid])
        assert not np.allclose(uploads[cid].arrays["logits"], before[cid])  # trained since
    # The digest is a plain distillation towards 0.7 * teacher + 0.3 * earlier logits.
    twin = CohortLearner(data, cfg, dict(learner.states))
    DSFL.client_digest(params, learner, 2, CLIENTS, {**plan, "teacher_logits": _teacher(2)})
    for cid in CLIENTS:
        twin.distill(2, [cid], inputs, 0.7 * _teacher(2) + 0.3 * before[cid])
    assert_same_states(data, cfg, learner.states, twin.states, atol=0)
    # Logits kept for another round are not used: the digest is the plain teacher's.
    plain = CohortLearner(data, cfg, dict(learner.states))
    again = CohortLearner(data, cfg, dict(learner.states), kept=dict(learner.kept_arrays))
    DSFL.client_digest(params, again, 3, CLIENTS, {**plan, "teacher_logits": _teacher(3)})
    DSFL.client_digest(DSFL.Params(), plain, 3, CLIENTS, {**plan, "teacher_logits": _teacher(3)})
    assert_same_states(data, cfg, again.states, plain.states, atol=0)


def test_self_distillation_on_the_vectorised_learner_matches_the_loop(data):
    cfg = config(loss="mae")
    params = FedMD.Params(self_distill_weight=0.5)
    loop, vectorised = CohortLearner(data, cfg, {}), VectorisedCohortLearner(data, cfg, {})
    for rnd in (1, 2):
        _round(FedMD, params, loop, rnd)
        _round(FedMD, params, vectorised, rnd)
    for cid in CLIENTS:
        np.testing.assert_allclose(
            vectorised.kept(cid)["logits"], loop.kept(cid)["logits"], atol=1e-4, rtol=0
        )
    assert_same_states(data, cfg, loop.states, vectorised.states, atol=1e-4)


# Rows of the fingerprints' tiny DS-FL run that the options move.
MOVED = ("server_test_acc", "client_test_acc_mean")


@pytest.mark.parametrize(
    "option",
    [
        "algorithm.teacher_confidence=negative_entropy",
        "algorithm.teacher_confidence=max_prob",
        "algorithm.self_distill_weight=0.5",
    ],
)
def test_each_option_runs_and_changes_the_runs_numbers(tmp_path, option):
    plain = _golden()["dsfl"]  # the same run without the option
    rows = run_case(tmp_path / "option", ["algorithm.name=dsfl", option])
    assert_moved(rows, plain)


def test_prior_agreement_runs_and_changes_the_class_weighted_teachers_numbers(tmp_path):
    class_weighted = ["algorithm.name=dsfl", "algorithm.teacher=class_weighted"]
    plain = run_case(tmp_path / "plain", class_weighted)
    rows = run_case(
        tmp_path / "option", [*class_weighted, "algorithm.teacher_prior_agreement=true"]
    )
    assert_moved(rows, plain)


def assert_moved(rows: list[dict], plain: list[dict]) -> None:
    assert len(rows) == len(plain) == 2
    assert all(np.isfinite(row[key]) for row in rows for key in MOVED)
    assert [[r[k] for k in MOVED] for r in rows] != [[r[k] for k in MOVED] for r in plain]
