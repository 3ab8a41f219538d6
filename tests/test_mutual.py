"""Deep mutual learning between each client's local model and its meme model
(`algorithm.mutual_weight`, `strategies.mutual`): the learner's `train_mutual` and partner
model on both learners, the logit algorithms' client side, a run, and the spec's refusals."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from fedkd.data import load_federated_data
from fedkd.learner.cohort import CohortLearner
from fedkd.learner.vectorised import VectorisedCohortLearner
from fedkd.privacy.dpsgd import DpSgdSettings
from fedkd.spec import SpecError, load_spec
from strategies.dsfl import DSFL
from strategies.feddf import FedDFLogit
from tests.test_algorithm_fingerprints import TINY, _golden, run_case
from tests.test_vectorised import assert_same_states, client_state, config

CLIENTS = [0, 1, 2]
# Each client's architecture: the quickstart's mix, small and fast.
ARCH = {0: "mlp", 1: "cnn_small", 2: "mlp"}.get
PROXY = np.arange(0, 120, 2)


@pytest.fixture(scope="module")
def data():
    return load_federated_data(source="digits", num_clients=3, proxy_size=120, seed=0)


def _weights(data, cfg, states) -> dict[int, dict[str, torch.Tensor]]:
    return {c: client_state(data, cfg, c, blob).model.state_dict() for c, blob in states.items()}


def _differ(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


def test_the_partner_starts_apart_and_mutual_learning_moves_the_student(data):
    cfg = config(arch=ARCH, epochs=1)
    plain, mutual, deaf = (CohortLearner(data, cfg, {}) for _ in range(3))
    plain.train_private(1, CLIENTS)
    mutual.train_mutual(1, CLIENTS, weight=1.0, partner_weight=1.0)
    # A student that gives its partner no weight learns as alone, batch for batch.
    deaf.train_mutual(1, CLIENTS, weight=0.0, partner_weight=1.0)
    assert_same_states(data, cfg, deaf.states, plain.states, atol=0)
    fresh = CohortLearner(data, cfg, {})
    start = _weights(data, cfg, {c: fresh._load(c).to_bytes() for c in CLIENTS})
    start_partner = {c: fresh.partner()._load(c).model.state_dict() for c in CLIENTS}
    moved, alone = _weights(data, cfg, mutual.states), _weights(data, cfg, plain.states)
    partners = _weights(data, cfg, mutual.partners)
    for cid in CLIENTS:
        assert _differ(start[cid], start_partner[cid])  # not a copy of the student
        assert _differ(moved[cid], alone[cid])  # the partner's KL term moved the student
        assert _differ(partners[cid], start_partner[cid])  # the partner trained too
    assert set(mutual.partners) == set(CLIENTS)


def test_mutual_learning_refuses_dpsgd(data):
    dp = DpSgdSettings(max_grad_norm=1.0, delta=1e-5, noise_multiplier=1.0)
    cfg = replace(config(arch="mlp"), dp=dp)
    with pytest.raises(ValueError, match="DP-SGD"):
        CohortLearner(data, cfg, {}).train_mutual(1, CLIENTS, 1.0, 1.0)


def _round(strategy, params, learner, rnd: int, teacher: np.ndarray) -> dict:
    plan = {"proxy_idx": PROXY.astype(np.int32)}
    uploads = strategy.client_round(params, learner, rnd, CLIENTS, plan)
    strategy.client_digest(params, learner, rnd, CLIENTS, {**plan, "teacher_logits": teacher})
    return uploads


def test_the_meme_model_uploads_and_digests_the_local_model_stays_home(data):
    cfg = config(arch=ARCH, epochs=1)
    learner = CohortLearner(data, cfg, {})
    params = DSFL.Params(mutual_weight=0.5, mutual_meme_weight=2.0)
    inputs = data.proxy_x[PROXY]
    plan = {"proxy_idx": PROXY.astype(np.int32)}
    uploads = DSFL.client_round(params, learner, 1, CLIENTS, plan)
    meme = learner.partner()
    memes, locals_ = meme.logits(CLIENTS, inputs), learner.logits(CLIENTS, inputs)
    for cid in CLIENTS:
        np.testing.assert_array_equal(uploads[cid].arrays["logits"], memes[cid])
        assert not np.allclose(uploads[cid].arrays["logits"], locals_[cid])
    # The round's training is `train_mutual` with the parameters' weights.
    twin = CohortLearner(data, cfg, {})
    twin.train_mutual(1, CLIENTS, 0.5, 2.0)
    assert_same_states(data, cfg, learner.states, twin.states, atol=0)
    assert_same_states(data, cfg, learner.partners, twin.partners, atol=0)
    # The digest distills the teacher into the meme model; the local model does not move.
    teacher = np.random.default_rng(1).normal(size=(len(PROXY), 10)).astype(np.float32)
    before = dict(learner.states)
    DSFL.client_digest(params, learner, 1, CLIENTS, {**plan, "teacher_logits": teacher})
    assert learner.states == before
    twin.partner().distill(1, CLIENTS, inputs, teacher)
    assert_same_states(data, cfg, learner.partners, twin.partners, atol=0)


def test_mutual_learning_on_the_vectorised_learner_matches_the_loop(data):
    cfg = config(arch=ARCH, epochs=1)
    params = FedDFLogit.Params(mutual_weight=1.0, self_distill_weight=0.3)
    loop, vectorised = CohortLearner(data, cfg, {}), VectorisedCohortLearner(data, cfg, {})
    for rnd in (1, 2):
        teacher = np.random.default_rng(rnd).normal(size=(len(PROXY), 10)).astype(np.float32)
        got = _round(FedDFLogit, params, vectorised, rnd, teacher)
        want = _round(FedDFLogit, params, loop, rnd, teacher)
        for cid in CLIENTS:
            np.testing.assert_allclose(
                got[cid].arrays["logits"], want[cid].arrays["logits"], atol=1e-4, rtol=0
            )
    assert_same_states(data, cfg, loop.states, vectorised.states, atol=1e-4)
    assert_same_states(data, cfg, loop.partners, vectorised.partners, atol=1e-4)
    # Self-distillation keeps the meme model's earlier logits.
    for cid in CLIENTS:
        np.testing.assert_allclose(
            vectorised.kept(cid)["logits"], loop.kept(cid)["logits"], atol=1e-4, rtol=0
        )


# Rows of the fingerprints' tiny DS-FL run: the clients' (local models') accuracy.
LOCAL = ("client_test_acc_mean", "client_local_acc_mean")


def test_a_run_with_mutual_learning_changes_the_local_models_numbers(tmp_path):
    plain = _golden()["dsfl"]  # the same run with mutual_weight = 0
    rows = run_case(tmp_path, ["algorithm.name=dsfl", "algorithm.mutual_weight=1"])
    assert len(rows) == 2
    assert all(np.isfinite(row[key]) for row in rows for key in LOCAL)
    assert [[r[k] for k in LOCAL] for r in rows] != [[r[k] for k in LOCAL] for r in plain]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["algorithm.mutual_weight=-1"], "algorithm.mutual_weight: must be a finite number"),
        (["algorithm.mutual_meme_weight=inf"], "algorithm.mutual_meme_weight: must be a finite"),
        (
            ["algorithm.mutual_weight=1", "privacy.dpsgd=true", "privacy.noise_multiplier=1"],
            "algorithm.mutual_weight: mutual learning trains each client's two models",
        ),
        (["algorithm.name=relation", "algorithm.mutual_weight=1"], "algorithm.mutual_weight:"),
        (["algorithm.name=fd", "algorithm.mutual_weight=1"], "unknown key 'algorithm.mutual"),
    ],
)
def test_the_spec_refuses_bad_mutual_learning(overrides, message):
    with pytest.raises(SpecError, match=message):
        load_spec(None, [*TINY, *overrides])
