"""FD's options (the normalised regulariser, the head's logit adjustment) and the per-class
algorithms' validation scores of the head."""

import numpy as np
import pytest

from fedkd.data import load_federated_data
from fedkd.learner.cohort import CohortConfig, CohortLearner
from fedkd.learner.loop import OptimConfig, StepConfig
from fedkd.learner.vectorised import VectorisedCohortLearner
from fedkd.models.zoo import EMBEDDING_WIDTH
from strategies.fd import FD, FDParams
from strategies.fedproto import FedProto, FedProtoParams
from strategies.per_class import balanced_accuracy, balancing_offsets

CLIENTS = list(range(4))


@pytest.fixture(scope="module")
def data():
    return load_federated_data(
        source="digits",
        num_clients=4,
        proxy_size=50,
        seed=0,
        proxy_validation_size=20,
        validation_fraction=0.2,
    )


def config(lr=0.05):
    step = StepConfig(epochs=1, batch_size=32, optim=OptimConfig(lr=lr, momentum=0.9))
    return CohortConfig(
        seed=0, arch_of=lambda cid: ("cnn_small", "mlp")[cid % 2], private=step, distill=step
    )


# Global class averages as FD's clients see them once they fit their own data: near one-hot.
PAYLOAD = {
    "class_logits": (8.0 * np.eye(10)).astype(np.float32),
    "class_present": np.ones(10, dtype=np.uint8),
}


def heads(learner):
    """Each client's last layer (weight, bias): its head."""
    return {cid: [w[k] for k in list(w)[-2:]] for cid, w in learner.get_weights(CLIENTS).items()}


@pytest.mark.parametrize("learner_cls", [CohortLearner, VectorisedCohortLearner])
def test_the_normalised_regulariser_is_the_added_one_at_a_step_divided_by_one_plus_its_weight(
    data, learner_cls
):
    # SGD with momentum and no weight decay is linear in the loss: (CE + w KL) / (1 + w) at
    # learning rate lr trains exactly as CE + w KL at lr / (1 + w). Fresh clients: a saved
    # optimizer keeps the learning rate it was saved with.
    normalised = learner_cls(data, config(lr=0.06), {})
    added = learner_cls(data, config(lr=0.02), {})
    plain = learner_cls(data, config(lr=0.06), {})
    FD.client_round(FDParams(fd_weight=2.0, fd_normalise=True), normalised, 1, CLIENTS, PAYLOAD)
    FD.client_round(FDParams(fd_weight=2.0), added, 1, CLIENTS, PAYLOAD)
    FD.client_round(FDParams(fd_weight=2.0), plain, 1, CLIENTS, PAYLOAD)
    moved = 0.0
    for cid in CLIENTS:
        a, b, c = (learner.get_weights([cid])[cid] for learner in (normalised, added, plain))
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-5)
            moved = max(moved, float(np.abs(a[key] - c[key]).max()))
    assert moved > 1e-3  # without normalising, the step differs


@pytest.mark.parametrize("learner_cls", [CohortLearner, VectorisedCohortLearner])
def test_fd_logit_adjustment_shifts_the_head_after_training_and_leaves_the_uploads(
    data, learner_cls
):
    plain_states: dict[int, bytes] = {}
    states: dict[int, bytes] = {}
    plain = FD.client_round(FDParams(), learner_cls(data, config(), plain_states), 1, CLIENTS, {})
    params = FDParams(logit_adjustment=0.5)
    adjusted = FD.client_round(params, learner_cls(data, config(), states), 1, CLIENTS, {})
    plain_heads = heads(learner_cls(data, config(), plain_states))
    adjusted_heads = heads(learner_cls(data, config(), states))
    for cid in CLIENTS:
        for key in ("class_logits", "class_counts"):  # computed before the shift
            np.testing.assert_array_equal(adjusted[cid].arrays[key], plain[cid].arrays[key])
        (weight, bias), (plain_weight, plain_bias) = adjusted_heads[cid], plain_heads[cid]
        np.testing.assert_array_equal(weight, plain_weight)
        offsets = balancing_offsets(adjusted[cid].arrays["class_counts"])
        np.testing.assert_allclose(bias - plain_bias, 0.5 * offsets, atol=1e-6)
        assert np.abs(offsets).max() > 0.1
    strategy = FD(data, seed=0, logit_adjustment=0.5)
    strategy.aggregate(1, adjusted)
    assert strategy.plan_local(2)["adjusted_clients"].tolist() == [1, 1, 1, 1]
    assert "adjusted_clients" not in FD(data, seed=0).plan_local(1)


@pytest.mark.parametrize("learner_cls", [CohortLearner, VectorisedCohortLearner])
def test_the_logit_adjustment_leaves_training_as_it_is_without_it(data, learner_cls):
    # Two rounds: the shift comes off before round 2's training and the client keeps its
    # optimizer through it, so its momentum carries over as without the adjustment and the
    # trained students agree (the head up to the shift).
    plain_states: dict[int, bytes] = {}
    states: dict[int, bytes] = {}
    params = FDParams(logit_adjustment=0.5)
    for round_num, payload in ((1, {}), (2, {**PAYLOAD, "adjusted_clients": np.ones(4, np.uint8)})):
        FD.client_round(
            FDParams(), learner_cls(data, config(), plain_states), round_num, CLIENTS, payload
        )
        adjusted = FD.client_round(
            params, learner_cls(data, config(), states), round_num, CLIENTS, payload
        )
    plain = learner_cls(data, config(), plain_states).get_weights(CLIENTS)
    shifted = learner_cls(data, config(), states).get_weights(CLIENTS)
    for cid in CLIENTS:
        *body, bias_key = plain[cid]
        for key in body:
            np.testing.assert_allclose(shifted[cid][key], plain[cid][key], rtol=1e-4, atol=1e-5)
        offsets = balancing_offsets(adjusted[cid].arrays["class_counts"])
        np.testing.assert_allclose(
            shifted[cid][bias_key] - plain[cid][bias_key], 0.5 * offsets, atol=1e-4
        )


@pytest.mark.parametrize(
    ("algorithm", "params", "payload"),
    [
        (FD, FDParams(), {}),
        (
            FedProto,
            FedProtoParams(),
            {
                "prototypes": np.zeros((10, EMBEDDING_WIDTH), np.float32),
                "prototype_present": np.ones(10, np.uint8),
            },
        ),
    ],
)
def test_heads_are_scored_on_the_public_and_the_balanced_validation_slices(
    data, algorithm, params, payload
):
    learner = CohortLearner(data, config(), {})
    out = algorithm.client_evaluate(params, learner, [0, 1], np.arange(30), payload)
    assert set(out[0]) == set(algorithm.evaluation_metrics)
    for cid in (0, 1):
        logits = learner.logits([cid], data.proxy_val_x)[cid]
        expected = np.mean(logits.argmax(axis=1) == data.proxy_val_y)
        assert out[cid]["client_public_val_acc"] == pytest.approx(expected)
        client = data.clients[cid]
        assert len(client.y_val) > 0
        balanced = balanced_accuracy(learner.logits([cid], client.x_val)[cid], client.y_val)
        assert out[cid]["client_balanced_val_acc"] == balanced
