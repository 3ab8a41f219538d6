"""Distillation with a private anchor (`distill.private_weight`, `loop.PrivateAnchor`).

A client digesting a teacher adds, on each proxy batch, the weight times cross-entropy on as
many of its own private examples. Weight 0 is the digest as it was; the anchor's batches come
from a stream of their own; the vectorised learner runs the loop for it; DP-SGD and algorithms
without a digest refuse it.
"""

import numpy as np
import pytest
import torch

from fedkd.assembly import cohort_config
from fedkd.audit.mia import ShadowRecipe, train_shadow
from fedkd.data import load_federated_data
from fedkd.learner.cohort import CohortConfig, CohortLearner
from fedkd.learner.loop import (
    OptimConfig,
    PrivateAnchor,
    StepConfig,
    accuracy,
    distill,
    init_student,
    make_optimizer,
    predict_logits,
    seeded_generator,
)
from fedkd.learner.vectorised import VectorisedCohortLearner
from fedkd.spec import SpecError, load_spec

CLIENTS = list(range(4))


@pytest.fixture(scope="module")
def data():
    return load_federated_data(source="digits", num_clients=4, proxy_size=200, seed=0)


def config(weight: float, distill_epochs: int = 1) -> CohortConfig:
    optim = OptimConfig(lr=0.05, momentum=0.9)
    return CohortConfig(
        seed=0,
        arch_of=lambda cid: "cnn_small",
        private=StepConfig(epochs=6, batch_size=32, optim=optim),
        distill=StepConfig(epochs=distill_epochs, batch_size=64, optim=optim),
        distill_private_weight=weight,
    )


def flat_teacher(n: int) -> np.ndarray:
    """A teacher that knows nothing: the same logit for every class of every input (the
    averaged teacher of clients that each know other classes tends towards it)."""
    return np.zeros((n, 10), dtype=np.float32)


def train_then_digest(learner_cls, data, cfg, client_ids=CLIENTS):
    """One round: private training, then a digest of the flat teacher on the proxy set."""
    learner = learner_cls(data, cfg, {})
    learner.train_private(1, client_ids)
    digest = learner.distill(1, client_ids, data.proxy_x, flat_teacher(len(data.proxy_x)))
    return learner, digest


def own_accuracy(learner, cid: int) -> float:
    """The client's accuracy on its own private training data."""
    client = learner.data.clients[cid]
    logits = predict_logits(learner._load(cid).model, client.x_train)
    return accuracy(logits, client.y_train)


def test_the_spec_parses_the_weight_into_the_cohort_config():
    spec = load_spec(None, ["distill.private_weight=0.5"])
    assert spec.distill.private_weight == 0.5
    assert cohort_config(spec).distill_private_weight == 0.5
    assert cohort_config(load_spec(None, [])).distill_private_weight == 0.0


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["distill.private_weight=-1"], "must be >= 0"),
        (
            [
                "distill.private_weight=1",
                "privacy.dpsgd=true",
                "privacy.noise_multiplier=1",
            ],
            "outside DP-SGD",
        ),
        (["distill.private_weight=1", "algorithm.name=local_only"], "no client distillation"),
        (["distill.private_weight=1", "algorithm.name=fd"], "no client distillation"),
    ],
)
def test_the_spec_refuses_a_negative_weight_dpsgd_and_algorithms_without_a_digest(overrides, words):
    with pytest.raises(SpecError, match="distill.private_weight") as err:
        load_spec(None, overrides)
    assert words in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["dsfl", "fedmd", "feddf", "relation"])
def test_the_logit_algorithms_accept_it(name):
    overrides = ["distill.private_weight=1", f"algorithm.name={name}"]
    if name == "feddf":
        overrides.append('server.student="cnn_small"')
    assert load_spec(None, overrides).distill.private_weight == 1.0


def test_the_anchor_draws_from_its_own_stream_not_the_distillations(data):
    """The proxy batches (and any shift) are the same with and without the anchor."""
    client = data.clients[0]
    step = StepConfig(epochs=2, batch_size=64, optim=OptimConfig())
    states = []
    for anchored in (False, True):
        model = init_student("cnn_small", data.input_shape, 10, 0, 0)
        gen = seeded_generator(0, 1, 0, 99)
        anchor = PrivateAnchor(client.x_train, client.y_train, 1.0, seeded_generator(5))
        distill(
            model,
            make_optimizer(model.parameters(), step.optim),
            data.proxy_x,
            flat_teacher(len(data.proxy_x)),
            step,
            gen,
            anchor=anchor if anchored else None,
        )
        states.append(gen.get_state())
    assert torch.equal(states[0], states[1])


def test_the_anchor_sees_every_private_example_before_any_twice():
    y = torch.arange(7)
    anchor = PrivateAnchor(torch.zeros(7, 1), y, 1.0, seeded_generator(3))
    first = torch.cat([anchor.next_indices(3), anchor.next_indices(3), anchor.next_indices(1)])
    assert sorted(first.tolist()) == list(range(7))
    assert len(anchor.next_indices(20)) == 20
    with pytest.raises(ValueError):
        PrivateAnchor(torch.zeros(0, 1), torch.zeros(0, dtype=torch.long), 1.0, seeded_generator(3))


def test_weights_change_only_with_a_positive_weight(data):
    plain, _ = train_then_digest(CohortLearner, data, config(0.0))
    anchored, _ = train_then_digest(CohortLearner, data, config(1.0))
    again, _ = train_then_digest(CohortLearner, data, config(0.0))
    for cid in CLIENTS:
        assert plain.states[cid] == again.states[cid]  # deterministic, byte for byte
        assert plain.states[cid] != anchored.states[cid]


def test_the_anchor_keeps_private_knowledge_a_flat_teacher_overwrites(data):
    """Distilling a teacher that knows nothing erases what private training taught; with the
    anchor the clients keep much of it."""
    plain, _ = train_then_digest(CohortLearner, data, config(0.0, distill_epochs=5))
    anchored, _ = train_then_digest(CohortLearner, data, config(1.0, distill_epochs=5))
    without = [own_accuracy(plain, cid) for cid in CLIENTS]
    with_anchor = [own_accuracy(anchored, cid) for cid in CLIENTS]
    assert all(a > b for a, b in zip(with_anchor, without, strict=True)), (with_anchor, without)
    assert np.mean(with_anchor) > np.mean(without) + 0.3, (with_anchor, without)


def test_the_vectorised_learner_runs_the_loop_for_it(data):
    loop, loop_digest = train_then_digest(CohortLearner, data, config(1.0))
    vec, vec_digest = train_then_digest(VectorisedCohortLearner, data, config(1.0))
    plain, _ = train_then_digest(VectorisedCohortLearner, data, config(0.0))
    for cid in CLIENTS:
        a, b = loop._load(cid).model.state_dict(), vec._load(cid).model.state_dict()
        for key, value in a.items():
            # Private training was vectorised (float rounding), the digest the loop's.
            torch.testing.assert_close(b[key], value, atol=1e-4, rtol=0)
        assert vec_digest[cid].metrics["distill_loss"] == pytest.approx(
            loop_digest[cid].metrics["distill_loss"], abs=1e-4
        )
        assert plain.states[cid] != vec.states[cid]


def test_an_audit_shadow_anchors_like_its_client(data):
    """The audit's shadows replay the client's recipe: its digest with its anchor too."""
    client = data.clients[0]
    step = StepConfig(epochs=1, batch_size=64, optim=OptimConfig())
    shadows = []
    for weight in (0.0, 1.0):
        recipe = ShadowRecipe(
            arch="cnn_small",
            input_shape=data.input_shape,
            num_classes=10,
            rounds=1,
            private=step,
            dp=None,
            seed=0,
            distill=step,
            distill_private_weight=weight,
            teachers=[(data.proxy_x, flat_teacher(len(data.proxy_x)))],
        )
        shadows.append(train_shadow(recipe, client.x_train, client.y_train, 0))
    plain, anchored = (m.state_dict() for m in shadows)
    assert any(not torch.equal(plain[k], anchored[k]) for k in plain)
