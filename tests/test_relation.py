"""Relational KD: RKD's potentials, the server's aggregation, the relational distillation on both
learners, its bytes and its refusals."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from fedkd.data import load_federated_data
from fedkd.learner.batch_plans import plan_batches, shuffled_batches
from fedkd.learner.cohort import ClientResult, CohortConfig, CohortLearner
from fedkd.learner.loop import GroupRegulariser, OptimConfig, StepConfig
from fedkd.learner.vectorised import VectorisedCohortLearner
from fedkd.run import cli
from fedkd.spec import load_spec
from strategies.relation import (
    Relation,
    RelationParams,
    aggregate_relations,
    pack_upper,
    relation_potentials,
    relational_loss,
    similarity_matrices,
    unpack_similarities,
)
from tests.test_engine import TIMINGS, run_inprocess
from tests.test_input_errors import no_engine  # noqa: F401 - a fixture
from tests.test_resume import SMALL, resume, stop_after_row, straight_run

CLIENTS = list(range(4))
MIXED = ["clients.students=['cnn_small', 'mlp']"]
B = 5  # relation batch of the learner tests
PROXY = np.arange(20)  # four relation batches


@pytest.fixture(scope="module")
def data():
    return load_federated_data(source="digits", num_clients=4, proxy_size=50, seed=0)


def config(distill_epochs=1):
    step = StepConfig(epochs=1, batch_size=12, optim=OptimConfig(momentum=0.9))
    return CohortConfig(
        seed=0,
        arch_of=lambda cid: ("cnn_small", "mlp")[cid % 2],
        private=step,
        distill=StepConfig(epochs=distill_epochs, batch_size=12, optim=OptimConfig(momentum=0.9)),
    )


def test_potentials_are_parks_distances_and_angles_of_the_unit_vectors():
    """Read off the Gram matrix, they equal RKD's computed from the points themselves."""
    outputs = torch.randn(3, 6, 5, generator=torch.Generator().manual_seed(0))
    unit = F.normalize(outputs, dim=-1)
    distances, angles = relation_potentials(similarity_matrices(outputs))
    pairwise = torch.cdist(unit, unit)
    np.testing.assert_allclose(distances, pairwise / (pairwise.sum((1, 2), True) / 30), atol=1e-5)
    edges = F.normalize(unit[:, None, :, :] - unit[:, :, None, :], dim=-1)  # [j, i]: x_i - x_j
    np.testing.assert_allclose(angles, edges @ edges.transpose(-1, -2), atol=1e-5)


def test_similarities_travel_as_the_entries_above_the_diagonal():
    sims = similarity_matrices(torch.randn(2, 6, 4))
    packed = pack_upper(sims)
    assert packed.shape == (2, 15)
    np.testing.assert_allclose(unpack_similarities(packed, 6), sims, atol=1e-6)


def test_the_server_combines_similarities_by_weighted_mean_or_median():
    relations = torch.tensor([[[0.0, 1.0]], [[0.5, 0.0]], [[0.9, 0.2]]])
    weights = torch.tensor([1.0, 1.0, 2.0])
    mean = aggregate_relations(relations, weights, "mean")
    np.testing.assert_allclose(mean, [[(0.0 + 0.5 + 1.8) / 4, (1.0 + 0.4) / 4]], atol=1e-6)
    np.testing.assert_allclose(aggregate_relations(relations, weights, "median"), [[0.5, 0.2]])


def test_a_round_sends_whole_relation_batches_and_the_aggregate_comes_back(data):
    strategy = Relation(data, seed=0, proxy_per_round=47, relation_batch=20)
    plan = strategy.plan_local(1)
    assert len(plan["proxy_idx"]) == 40  # 47 cut to two whole batches
    assert len(set(plan["proxy_idx"].tolist())) == 40
    # With the whole proxy set every round, each round's batches group other inputs.
    whole = Relation(data, seed=0, relation_batch=10)
    first, second = whole.plan_local(1)["proxy_idx"], whole.plan_local(2)["proxy_idx"]
    assert sorted(first) == sorted(second) == list(range(50))
    assert not np.array_equal(first[:10], second[:10])

    def upload(value, count):
        return ClientResult(
            arrays={
                "logits": np.full((40, 10), value, np.float32),
                "relations": np.full((2, 190), value, np.float32),
            },
            metrics={"num_examples": count},
        )

    strategy.aggregate(1, {0: upload(0.0, 1.0), 1: upload(0.4, 3.0)})
    payload = strategy.digest_payload(1)
    np.testing.assert_allclose(payload["relations"], np.full((2, 190), 0.3), atol=1e-6)
    assert payload["relations"].dtype == np.float32
    np.testing.assert_array_equal(payload["proxy_idx"], plan["proxy_idx"])
    assert strategy.round_metrics()["relation_mean_similarity"] == pytest.approx(0.3)


def test_batches_of_whole_groups_and_plain_batches_are_the_same_draws():
    plain = torch.randperm(30, generator=torch.Generator().manual_seed(4)).split(8)
    ours = shuffled_batches(30, 8, torch.Generator().manual_seed(4))
    assert all(torch.equal(a, b) for a, b in zip(plain, ours, strict=True))
    grouped = shuffled_batches(30, 8, torch.Generator().manual_seed(4), group_size=3)
    assert [len(b) for b in grouped] == [6] * 5  # two whole groups per batch
    for batch in grouped:
        groups = batch.reshape(-1, 3)
        assert (groups[:, 0] % 3 == 0).all() and (groups.diff(dim=1) == 1).all()
    plan = plan_batches([30], [0], 1, 8, [torch.Generator().manual_seed(4)], "cpu", 3)
    assert [plan.index[t, 0, : plan.size[t, 0]].tolist() for t in range(5)] == [
        b.tolist() for b in grouped
    ]


def two_rounds(learner_cls, data, params, distill_epochs=1):
    """Round 1's uploads, the server's aggregate, the clients' relational digest."""
    states: dict[int, bytes] = {}
    strategy = Relation(data, seed=0, relation_batch=params.relation_batch)
    plan = {"proxy_idx": PROXY.astype(np.int32)}
    strategy._proxy_idx = PROXY
    learner = learner_cls(data, config(distill_epochs), states)
    uploads = Relation.client_round(params, learner, 1, CLIENTS, plan)
    strategy.aggregate(1, uploads)
    payload = strategy.digest_payload(1)
    digest = Relation.client_digest(params, learner, 1, CLIENTS, payload)
    return learner, uploads, payload, digest


@pytest.mark.parametrize("space", ["embeddings", "logits"])
def test_loop_and_vectorised_learners_agree(data, space):
    """Mixed architectures: the same uploads and relational distillation losses."""
    params = RelationParams(relation_batch=B, relation_space=space)
    _, up_a, payload_a, a = two_rounds(CohortLearner, data, params)
    _, up_b, payload_b, b = two_rounds(VectorisedCohortLearner, data, params)
    np.testing.assert_allclose(payload_b["relations"], payload_a["relations"], atol=1e-5)
    for cid in CLIENTS:
        assert up_a[cid].arrays["relations"].shape == (len(PROXY) // B, B * (B - 1) // 2)
        np.testing.assert_allclose(
            up_b[cid].arrays["relations"], up_a[cid].arrays["relations"], atol=1e-5
        )
        assert b[cid].metrics["distill_loss"] == pytest.approx(a[cid].metrics["distill_loss"], 1e-4)


@pytest.mark.parametrize("learner_cls", [CohortLearner, VectorisedCohortLearner])
def test_the_relational_term_pulls_the_students_relations_to_the_aggregate(data, learner_cls):
    def gap(weight):
        params = RelationParams(relation_batch=B, distance_weight=weight, angle_weight=weight)
        learner, _, payload, _ = two_rounds(learner_cls, data, params, distill_epochs=5)
        target = unpack_similarities(torch.from_numpy(payload["relations"]), B)
        target_distances, _ = relation_potentials(target)
        after = learner.embeddings(CLIENTS, data.proxy_x[PROXY])
        own = [
            relation_potentials(similarity_matrices(torch.from_numpy(after[c]).reshape(-1, B, 64)))
            for c in CLIENTS
        ]
        return np.mean([(d - target_distances).abs().mean().item() for d, _ in own])

    assert gap(5.0) < 0.7 * gap(0.0)


def test_the_loss_is_zero_on_its_own_target_and_positive_elsewhere():
    outputs = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    own = similarity_matrices(outputs)
    assert relational_loss(outputs, own, 1.0, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert relational_loss(outputs, own.flip(1).flip(2).roll(1, 1), 1.0, 2.0).item() > 1e-3


def degenerate(case: str) -> torch.Tensor:
    """Post-ReLU-like outputs ``(3, 20, 64)`` with one degenerate relation batch, as a student's
    embeddings were on MNIST before its distillation diverged."""
    gen = torch.Generator().manual_seed(0)
    outputs = torch.randn(3, 20, 64, generator=gen).relu()
    noise = torch.rand(20, 64, generator=gen)
    if case == "near-zero embedding":  # a nearly dead ReLU layer on one input
        outputs[0, 3] = 1e-6 * noise[0]
    elif case == "near-duplicate outputs":
        outputs[0, 4] = outputs[0, 3] + 1e-3 * (noise[0] - 0.5)
    else:  # the whole batch in (nearly) one direction
        outputs[0] = outputs[0, 0] + 1e-3 * noise
    return outputs


@pytest.mark.parametrize(
    "case", ["near-zero embedding", "near-duplicate outputs", "collapsed batch"]
)
def test_the_relational_loss_and_its_gradient_stay_bounded_on_degenerate_outputs(case):
    """Normalising a near-zero output, reading angles at near-coincident points and dividing by
    a vanishing mean distance gave gradients of 1e3 to 1e6 (and losses of 1e3), which sent
    MNIST students to chance; on healthy outputs the gradient's norm is about 0.01."""
    outputs = degenerate(case).requires_grad_(True)
    gen = torch.Generator().manual_seed(1)
    target = similarity_matrices(torch.randn(3, 20, 64, generator=gen).relu())
    loss = relational_loss(outputs, target, 5.0, 10.0)
    loss.backward()
    assert torch.isfinite(outputs.grad).all()
    assert outputs.grad.norm().item() < 2.0
    assert loss.item() < 1.0
    _, angles = relation_potentials(similarity_matrices(outputs.detach()))
    assert angles.abs().max().item() <= 1.01  # cosines, up to float32 rounding


def test_a_group_regulariser_refuses_groups_that_do_not_divide_the_inputs(data):
    regulariser = GroupRegulariser(
        group_size=3, targets=torch.zeros(20, 3), loss=lambda o, t: o.sum() * 0
    )
    with pytest.raises(ValueError, match="groups of 3"):
        CohortLearner(data, config(), {}).distill(
            1, [0], data.proxy_x[:20], np.zeros((20, 10), np.float32), regulariser
        )


@pytest.mark.parametrize("learner", ["loop", "vectorised"])
def test_relation_runs_end_to_end_and_uploads_logits_and_triangles(tmp_path, learner):
    _, summary, rows, _ = run_inprocess(
        tmp_path, ["algorithm.name=relation", f"resources.learner={learner}", *MIXED]
    )
    assert summary["status"] == "completed"
    proxy, classes, b = 200, 10, 20
    for row in rows:
        assert row["clients_failed"] == 0
        # Logits, and per batch of 20 inputs the 190 similarities above the diagonal.
        assert row["bytes_up_per_client"] == 4 * (proxy * classes + proxy // b * b * (b - 1) // 2)
        assert 0.0 <= row["server_test_acc"] <= 1.0
        assert -1.0 <= row["relation_mean_similarity"] <= 1.0


def test_the_engine_gives_the_same_metrics_on_both_learners(tmp_path):
    overrides = ["algorithm.name=relation", *MIXED]
    *_, loop, _ = run_inprocess(tmp_path, [*overrides, "resources.learner=loop"], name="a")
    *_, fast, _ = run_inprocess(tmp_path, [*overrides, "resources.learner=vectorised"], name="b")
    for a, b in zip(loop, fast, strict=True):
        for key, value in a.items():
            if key not in TIMINGS and isinstance(value, float):
                assert b[key] == pytest.approx(value, abs=1e-4), key


@pytest.mark.parametrize(
    "sets",
    [
        ["algorithm.relation_batch=2"],
        ["algorithm.relation_space=pixels"],
        ["algorithm.relation_aggregate=mode"],
        ["algorithm.angle_weight=-1"],
        ["algorithm.self_distill_weight=0.5"],  # not combined with the relational digest
        ["distill.proxy_per_round=10"],  # fewer than one relation batch of 20
        ["privacy.release_noise=1"],  # would protect the logit teacher, not the relations
    ],
)
def test_bad_relation_input_is_one_line_and_exit_2(sets, no_engine):  # noqa: F811
    args = ["run", "--set", "algorithm.name=relation"]
    for one in sets:
        args += ["--set", one]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 2, (result.stderr, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_a_resumed_relation_run_writes_the_straight_runs_metrics(tmp_path):
    """Resumed after round 2, the clients digest the same relations and logits (the pending
    digest comes back from the checkpoint) and the rounds after it match the straight run."""
    spec = load_spec(None, [*SMALL, "algorithm.name=relation"])
    expected = straight_run(spec, tmp_path / "straight")
    stop_after_row(spec, tmp_path / "resumed", 2)
    assert resume(spec, tmp_path / "resumed") == expected
