"""FedProto: count-weighted prototypes, the embedding regulariser on both learners, its bytes."""

import numpy as np
import pytest
import torch

from fedkd.data import load_federated_data
from fedkd.learner.cohort import ClientResult, CohortConfig, CohortLearner
from fedkd.learner.loop import OptimConfig, StepConfig
from fedkd.learner.vectorised import VectorisedCohortLearner
from fedkd.models.zoo import EMBEDDING_WIDTH, fixed_projection
from fedkd.spec import load_spec
from strategies.fedproto import (
    FedProto,
    FedProtoParams,
    calibrate_head,
    head_inputs,
    nearest_prototype_scores,
)
from strategies.params import ParamError
from strategies.per_class import balanced_accuracy, balancing_offsets
from tests.test_engine import TIMINGS, run_inprocess
from tests.test_resume import SMALL, resume, stop_after_row, straight_run

CLIENTS = list(range(4))
MIXED = ["clients.students=['cnn_small', 'mlp']"]  # mlp's 200-wide embedding is projected


@pytest.fixture(scope="module")
def data():
    return load_federated_data(source="digits", num_clients=4, proxy_size=50, seed=0)


def config(arch_of=lambda cid: ("cnn_small", "mlp")[cid % 2], epochs=1):
    step = StepConfig(epochs=epochs, batch_size=32, optim=OptimConfig(momentum=0.9))
    return CohortConfig(seed=0, arch_of=arch_of, private=step, distill=step)


def two_rounds(learner_cls, data, proto_weight=1.0, **options):
    """Round 1 without prototypes, the server's average, round 2 pulled towards it."""
    states: dict[int, bytes] = {}
    params = FedProtoParams(proto_weight=proto_weight, **options)
    strategy = FedProto(data, seed=0)
    first = FedProto.client_round(params, learner_cls(data, config(), states), 1, CLIENTS, {})
    strategy.aggregate(1, first)
    plan = strategy.plan_local(2)
    second = FedProto.client_round(params, learner_cls(data, config(), states), 2, CLIENTS, plan)
    return states, plan, second


def test_the_server_averages_prototypes_per_class_weighted_by_counts(data):
    def upload(value, counts):
        prototypes = np.full((3, EMBEDDING_WIDTH), value, dtype=np.float32)
        return ClientResult(
            arrays={"prototypes": prototypes, "prototype_counts": np.array(counts, np.float32)},
            metrics={"num_examples": float(sum(counts))},
        )

    strategy = FedProto(data, seed=0)
    assert strategy.plan_local(1) == {}  # nothing to pull towards before the first round
    strategy.aggregate(1, {0: upload(1.0, [3, 0, 1]), 1: upload(5.0, [1, 0, 3])})
    plan = strategy.plan_local(2)
    np.testing.assert_allclose(plan["prototypes"][:, 0], [2.0, 0.0, 4.0])  # (3*1+1*5)/4, ...
    assert plan["prototypes"].dtype == np.float32
    assert plan["prototype_present"].tolist() == [1, 0, 1]
    assert strategy.round_metrics() == {"prototype_classes": 2.0}


def test_loop_and_vectorised_learners_agree(data):
    """Mixed architectures (a projected embedding), the regulariser in round 2: the same
    uploads and losses from both learners."""
    _, plan_a, a = two_rounds(CohortLearner, data)
    _, plan_b, b = two_rounds(VectorisedCohortLearner, data)
    np.testing.assert_allclose(plan_b["prototypes"], plan_a["prototypes"], atol=1e-5)
    for cid in CLIENTS:
        assert a[cid].arrays["prototypes"].shape == (10, EMBEDDING_WIDTH)
        assert b[cid].metrics["train_loss"] == pytest.approx(a[cid].metrics["train_loss"], 1e-5)
        for key in ("prototypes", "prototype_counts"):
            np.testing.assert_allclose(b[cid].arrays[key], a[cid].arrays[key], atol=1e-5)


@pytest.mark.parametrize("learner_cls", [CohortLearner, VectorisedCohortLearner])
def test_the_regulariser_pulls_embeddings_towards_the_global_prototypes(data, learner_cls):
    def distance(proto_weight):
        _, plan, out = two_rounds(learner_cls, data, proto_weight)
        target = plan["prototypes"]
        return np.mean([np.square(out[c].arrays["prototypes"] - target).sum() for c in CLIENTS])

    assert distance(50.0) < 0.5 * distance(0.0)


@pytest.mark.parametrize("learner", ["loop", "vectorised"])
def test_fedproto_runs_end_to_end_with_tiny_uploads(tmp_path, learner):
    _, summary, rows, _ = run_inprocess(
        tmp_path, ["algorithm.name=fedproto", f"resources.learner={learner}", *MIXED]
    )
    assert summary["status"] == "completed"
    classes = 10
    for row in rows:
        assert row["clients_failed"] == 0
        assert row["bytes_up_per_client"] == classes * EMBEDDING_WIDTH * 4 + classes * 4
        assert row["server_test_acc"] is None  # no global model: clients use their own heads
        assert 0.0 <= row["client_test_acc_mean"] <= 1.0
        # Nearest-prototype accuracies, on the same slices as the head's.
        for kind in ("test", "local", "val"):
            assert 0.0 <= row[f"client_proto_{kind}_acc_mean"] <= 1.0
    # Round 2's request carries the global prototypes (and which classes have one), and so
    # does each round's evaluation of its 4 clients.
    prototypes = classes * EMBEDDING_WIDTH * 4 + classes
    assert rows[0]["bytes_down"] == 4 * prototypes
    # With the default logit adjustment each of round 2's 4 training requests also says which
    # of the 4 clients' heads carry the shift (one byte per client).
    assert rows[1]["bytes_down"] == 2 * 4 * prototypes + 4 * 4
    assert rows[1]["prototype_classes"] == classes


def test_clients_predict_the_nearest_present_global_prototype():
    prototypes = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], dtype=np.float32)
    present = np.array([1, 1, 0], dtype=np.uint8)  # class 2 has no prototype
    embeddings = np.array([[1.0, 1.0], [9.0, -1.0], [0.0, 9.0], [6.0, 0.0]], dtype=np.float32)
    scores = nearest_prototype_scores(embeddings, prototypes, present)
    # The third input is nearest class 2's prototype, which is absent: class 0 is next.
    assert scores.argmax(dim=1).tolist() == [0, 1, 0, 1]
    assert scores[0, 1].item() == pytest.approx(-(9.0**2 + 1.0))  # minus squared distance
    assert torch.isinf(scores[:, 2]).all()


@pytest.mark.parametrize("learner_cls", [CohortLearner, VectorisedCohortLearner])
def test_client_evaluate_scores_embeddings_against_the_sent_prototypes(data, learner_cls):
    """Prototypes placed at client 0's own test embeddings of two classes' first examples:
    its test accuracy is the nearest-prototype rule's on its embeddings of the test subset."""
    learner = learner_cls(data, config(), {})
    test_idx = np.arange(40)
    test_y = data.test_y[test_idx]
    embedded = learner.embeddings([0], data.test_x[test_idx])[0]
    prototypes = np.zeros((10, EMBEDDING_WIDTH), dtype=np.float32)
    present = np.zeros(10, dtype=np.uint8)
    for cls in np.unique(test_y)[:2]:
        prototypes[cls] = embedded[np.flatnonzero(test_y == cls)[0]]
        present[cls] = 1
    payload = {"prototypes": prototypes, "prototype_present": present}
    out = FedProto.client_evaluate(FedProtoParams(), learner, [0, 1], test_idx, payload)
    predicted = nearest_prototype_scores(embedded, prototypes, present).argmax(dim=1).numpy()
    assert out[0]["client_proto_test_acc"] == pytest.approx(np.mean(predicted == test_y))
    assert set(out[1]) == set(FedProto.evaluation_metrics)
    assert FedProto.client_evaluate(FedProtoParams(), learner, [0], test_idx, {}) == {}


def test_the_engine_gives_the_same_metrics_on_both_learners(tmp_path):
    overrides = ["algorithm.name=fedproto", *MIXED]
    *_, loop, _ = run_inprocess(tmp_path, [*overrides, "resources.learner=loop"], name="a")
    *_, fast, _ = run_inprocess(tmp_path, [*overrides, "resources.learner=vectorised"], name="b")
    for a, b in zip(loop, fast, strict=True):
        assert isinstance(a["client_proto_test_acc_mean"], float)
        for key, value in a.items():
            if key not in TIMINGS and isinstance(value, float):
                assert b[key] == pytest.approx(value, abs=1e-5), key


def test_embeddings_have_one_width_for_every_architecture(data):
    learner = CohortLearner(data, config(), {})
    out = learner.embeddings(CLIENTS, data.proxy_x[:7])
    assert {v.shape for v in out.values()} == {(7, EMBEDDING_WIDTH)}
    logits = learner.logits(CLIENTS, data.proxy_x[:7])
    statistics = learner.class_statistics(CLIENTS, "embeddings")
    for per_client in (True, False):  # a CPU's path, and a GPU's (vmap over the stack)
        vectorised = VectorisedCohortLearner(data, config(), {}, predict_rows=50)
        vectorised.per_client_predict = per_client
        ours = vectorised.embeddings(CLIENTS, data.proxy_x[:7])
        our_statistics = vectorised.class_statistics(CLIENTS, "embeddings")
        for cid in CLIENTS:
            np.testing.assert_allclose(ours[cid], out[cid], atol=1e-5)
            for mine, theirs in zip(our_statistics[cid], statistics[cid], strict=True):
                np.testing.assert_allclose(mine, theirs, atol=1e-5)
            assert torch.isfinite(torch.from_numpy(logits[cid])).all()


def test_a_resumed_fedproto_run_writes_the_straight_runs_metrics(tmp_path):
    """The global prototypes are in the strategy's checkpointed state."""
    spec = load_spec(None, [*SMALL, "algorithm.name=fedproto"])
    expected = straight_run(spec, tmp_path / "straight")
    stop_after_row(spec, tmp_path / "resumed", 2)
    assert resume(spec, tmp_path / "resumed") == expected


def heads(learner_cls, data, states):
    """Each client's last layer (weight, bias): its head."""
    weights = learner_cls(data, config(), states).get_weights(CLIENTS)
    return {cid: [w[k] for k in list(w)[-2:]] for cid, w in weights.items()}


@pytest.mark.parametrize("learner_cls", [CohortLearner, VectorisedCohortLearner])
def test_logit_adjustment_shifts_the_head_after_training_and_off_before_the_next(data, learner_cls):
    params = FedProtoParams(logit_adjustment=0.5)
    plain_states: dict[int, bytes] = {}
    states: dict[int, bytes] = {}
    plain = FedProto.client_round(
        FedProtoParams(logit_adjustment=0.0),
        learner_cls(data, config(), plain_states),
        1,
        CLIENTS,
        {},
    )
    adjusted = FedProto.client_round(params, learner_cls(data, config(), states), 1, CLIENTS, {})
    plain_heads, adjusted_heads = (
        heads(learner_cls, data, plain_states),
        heads(learner_cls, data, states),
    )
    for cid in CLIENTS:  # the same training and uploads; the bias moved by tau * offsets
        for key in ("prototypes", "prototype_counts"):
            np.testing.assert_array_equal(adjusted[cid].arrays[key], plain[cid].arrays[key])
        (weight, bias), (plain_weight, plain_bias) = adjusted_heads[cid], plain_heads[cid]
        np.testing.assert_array_equal(weight, plain_weight)
        offsets = balancing_offsets(adjusted[cid].arrays["prototype_counts"])
        np.testing.assert_allclose(bias - plain_bias, 0.5 * offsets, atol=1e-6)
        assert np.abs(offsets).max() > 0.1  # skewed labels: a real shift
    strategy = FedProto(data, seed=0, logit_adjustment=0.5)
    strategy.aggregate(1, adjusted)
    plan = strategy.plan_local(2)
    assert plan["adjusted_clients"].tolist() == [1, 1, 1, 1]
    assert "adjusted_clients" not in strategy.evaluate_payload(2)
    assert "adjusted_clients" not in FedProto(data, seed=0).plan_local(1)
    # A round without training steps: the shift comes off, then goes on again, once.
    idle = learner_cls(data, config(epochs=0), states)
    FedProto.client_round(params, idle, 2, CLIENTS, plan)
    for cid, (_, bias) in heads(learner_cls, data, states).items():
        np.testing.assert_allclose(bias, adjusted_heads[cid][1], atol=1e-5)


def test_balancing_offsets_favour_a_clients_rare_classes():
    counts = np.array([30.0, 2.0, 0.0])
    offsets = balancing_offsets(counts)
    centred = -np.log((counts + 1) / (32 + 3))
    np.testing.assert_allclose(offsets, centred - centred.mean(), rtol=1e-6)
    assert offsets[0] < offsets[1] < offsets[2]
    assert offsets.sum() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("width", [EMBEDDING_WIDTH, 200])
def test_calibrated_head_predicts_each_global_prototypes_class(width):
    gen = torch.Generator().manual_seed(0)
    prototypes = torch.randn(4, EMBEDDING_WIDTH, generator=gen).abs().numpy()
    present = np.array([1, 1, 1, 0], dtype=np.uint8)
    # A head that only ever predicts class 0 (a client that held class 0 alone).
    weight, bias = np.zeros((4, width), np.float32), np.array([5.0, 0, 0, 0], np.float32)
    new_weight, new_bias = calibrate_head(weight, bias, prototypes, present, 200, 0.5)
    virtual = head_inputs(torch.from_numpy(prototypes), width).numpy()
    assert ((virtual @ new_weight.T + new_bias).argmax(axis=1)[:3] == [0, 1, 2]).all()
    # The head's inputs map back onto the embeddings through the fixed projection.
    if width != EMBEDDING_WIDTH:
        np.testing.assert_allclose(virtual @ fixed_projection(width).numpy(), prototypes, atol=1e-4)


@pytest.mark.parametrize(
    "options", [{"logit_adjustment": -1.0}, {"calibration_steps": -1}, {"calibration_lr": 0.0}]
)
def test_bad_head_options_are_refused(options):
    with pytest.raises(ParamError, match=next(iter(options))):
        FedProtoParams(**options).check()


def test_balanced_accuracy_weights_every_present_class_alike():
    logits = np.eye(3, dtype=np.float32)[[0, 0, 0, 0, 1, 2]]  # predicts 0, 0, 0, 0, 1, 2
    y = np.array([0, 0, 0, 1, 1, 1])  # class 0: 3/3 right, class 1: 1/3, class 2 absent
    assert balanced_accuracy(logits, y) == pytest.approx((1.0 + 1 / 3) / 2)
    assert np.isnan(balanced_accuracy(logits[:0], y[:0]))
