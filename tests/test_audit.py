"""Privacy audits: the one-run bound against the paper's formula, MIA on real (in-process) runs."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fedkd.apps.client_app import make_client_app
from fedkd.apps.server_app import run_rounds
from fedkd.apps.wire import MSG_ROUND
from fedkd.assembly import federated_data
from fedkd.audit.canary import audit_canaries, one_run_epsilon_lower_bound, one_run_p_value
from fedkd.audit.mia import attack_summary, lira_offline_scores, match_by_class
from fedkd.audit.run_audit import AuditError, audit_finished_run, audit_run, load_student
from fedkd.data.canaries import make_canaries
from fedkd.learner.loop import ClientState, OptimConfig, init_student, seeded_generator
from fedkd.privacy.dpsgd import DpSgdSettings, train_dpsgd
from fedkd.results import RunRecorder, load_teachers, student_path
from fedkd.run.cli import app
from fedkd.spec import SpecError, load_spec
from tests.inprocess import InProcessGrid

# An overfit student on digits: few private examples each (a large proxy set takes most of the
# pool), an MLP, many epochs of small batches, no distillation pulling it back (local_only).
OVERFIT = [
    "algorithm.name=local_only",
    "clients.num_clients=4",
    "data.proxy_size=1200",
    "data.partition=iid",
    "clients.students=mlp",
    "train.epochs=60",
    "train.batch_size=8",
    "rounds=1",
    "audit.enabled=true",
    "audit.client=0",
    "audit.canaries=64",
    "audit.shadows=4",
]
# The same client under strong DP-SGD (fewer steps keep the test fast; the bound must hold).
# A fixed noise multiplier: calibrating to a target epsilon takes seconds per client.
STRONG_DP = [
    "train.epochs=15",
    "audit.shadows=2",
    "privacy.dpsgd=true",
    "privacy.noise_multiplier=6.0",
]


def _run(path, overrides):
    spec = load_spec(None, overrides)
    grid = InProcessGrid(make_client_app(spec), spec.num_nodes)
    run_rounds(grid, spec, RunRecorder(path, spec), after_run=audit_finished_run)
    return spec, grid


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("audit") / "overfit"
    spec, grid = _run(path, OVERFIT)
    return path, spec, grid


# -- the one-run bound (Steinke, Nasr, Jagielski 2023, Theorem 3 / Algorithm 2) ----------------


def test_p_value_matches_hand_computed_values():
    # eps = 0: q = 1/2, so P[Bin(4, 1/2) >= 4] = 1/16.
    assert one_run_p_value(10, 4, 4, 0.0, 0.0) == pytest.approx(1 / 16)
    # delta term: max_i P[4 > B >= 4 - i] / i over i = 1..4 is at i = 2: (4 + 6) / 16 / 2.
    assert one_run_p_value(10, 4, 4, 0.0, 1e-3) == pytest.approx(1 / 16 + 2 * 10 * 1e-3 * 0.3125)
    # all of 10 guesses right at eps = 1: q^10 with q = e / (1 + e).
    q = math.e / (1 + math.e)
    assert one_run_p_value(10, 10, 10, 1.0, 0.0) == pytest.approx(q**10)


def test_p_value_equals_the_formula_written_out_with_binomial_coefficients():
    m, r, v, eps, delta = 1000, 100, 70, 0.5, 1e-4
    q = math.exp(eps) / (1 + math.exp(eps))

    def pmf(j):
        return math.comb(r, j) * q**j * (1 - q) ** (r - j)

    tail = sum(pmf(j) for j in range(v, r + 1))
    alpha = max(sum(pmf(j) for j in range(v - i, v)) / i for i in range(1, v + 1))
    assert one_run_p_value(m, r, v, eps, delta) == pytest.approx(tail + 2 * m * delta * alpha)


def test_lower_bound_inverts_the_p_value():
    # v = r = m = 10, delta = 0: the bound solves q^10 = 0.05, eps = log(q / (1 - q)).
    q = 0.05 ** (1 / 10)
    expected = math.log(q / (1 - q))  # 1.0519...
    assert one_run_epsilon_lower_bound(10, 10, 10, 0.0, 0.95) == pytest.approx(expected, abs=1e-5)
    # The bound is rejected at 95%, a hair above it is not.
    eps = one_run_epsilon_lower_bound(200, 80, 70, 1e-5, 0.95)
    assert one_run_p_value(200, 80, 70, eps, 1e-5) < 0.05
    assert one_run_p_value(200, 80, 70, eps + 1e-4, 1e-5) >= 0.05
    # delta can only weaken the bound; chance-level guessing proves nothing.
    assert one_run_epsilon_lower_bound(200, 80, 70, 1e-2, 0.95) < eps
    assert one_run_epsilon_lower_bound(200, 80, 40, 1e-5, 0.95) == 0.0


def test_canary_guesses_split_the_confidence_over_the_guess_sizes():
    included = np.r_[np.ones(50, bool), np.zeros(50, bool)]
    perfect = audit_canaries(included.astype(float), included, delta=1e-5)
    assert perfect.correct == perfect.guesses
    k = perfect.guesses
    # Bonferroni over the 6 guess sizes: each test at 1 - 0.05 / 6.
    assert perfect.epsilon_lower_bound == pytest.approx(
        one_run_epsilon_lower_bound(100, k, k, 1e-5, 1 - 0.05 / 6)
    )
    noise = np.random.default_rng(0).normal(size=100)
    assert audit_canaries(noise, included, delta=1e-5).epsilon_lower_bound < 0.5


# -- membership inference pieces ---------------------------------------------------------------


def test_non_members_match_the_members_class_by_class():
    member_y = np.array([0] * 30 + [1] * 5 + [2] * 3)
    pool_y = np.array([0] * 10 + [1] * 50 + [3] * 9)
    mi, ni = match_by_class(member_y, pool_y, 0, np.random.default_rng(0))
    assert np.bincount(member_y[mi]).tolist() == [10, 5]
    assert np.bincount(pool_y[ni]).tolist() == [10, 5]


def test_lira_scores_separate_an_example_above_its_out_distribution():
    rng = np.random.default_rng(0)
    shadow = rng.normal(0, 1, size=(8, 200)) + np.arange(200)  # each target its own mean
    target = np.arange(200) + np.r_[np.full(100, 3.0), np.zeros(100)]
    result = attack_summary("lira", lira_offline_scores(target, shadow), np.arange(200) < 100)
    assert result.auc > 0.95 and result.tpr_at_1pct_fpr > 0.5


def test_dpsgd_survives_empty_poisson_batches():
    # 20 examples at sample rate 0.1: about one batch in eight is empty.
    x = np.random.default_rng(0).normal(size=(20, 1, 8, 8)).astype(np.float32)
    model = init_student("mlp", (1, 8, 8), 10, 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    settings = DpSgdSettings(max_grad_norm=1.0, delta=1e-5, noise_multiplier=1.0)
    stats, event = train_dpsgd(
        model,
        opt,
        x,
        np.arange(20) % 10,
        epochs=10,
        batch_size=2,
        settings=settings,
        generator=seeded_generator(1),
    )
    assert event.steps == 100 and np.isfinite(stats["loss"])


# -- the run keeps what the audit needs --------------------------------------------------------


def test_canaries_are_inserted_into_the_audited_client_only():
    spec = load_spec(None, OVERFIT)
    plain = load_spec(None, [o for o in OVERFIT if not o.startswith("audit.")])
    with_c, without = federated_data(spec), federated_data(plain)
    canaries = make_canaries(with_c, 0, 64, spec.seed)
    added = with_c.clients[0].num_examples - without.clients[0].num_examples
    assert added == canaries.included.sum() > 0
    assert np.array_equal(with_c.clients[0].x_train[-added:], canaries.x[canaries.included])
    assert (with_c.clients[0].train_indices[-added:] == -1).all()
    for a, b in zip(with_c.clients[1:], without.clients[1:], strict=True):
        assert np.array_equal(a.x_train, b.x_train)


def test_the_run_saves_the_audited_clients_final_student(overfit_run):
    path, spec, grid = overfit_run
    assert student_path(path, 0).is_file()
    data = federated_data(spec)
    model, saved = load_student(path, 0, data.input_shape, data.num_classes)
    # The weights the node holds for client 0 at the end of the run.
    (ctx,) = [c for c in grid.contexts.values() if c.node_config["partition-id"] == 0]
    state = ClientState.create(
        0, "mlp", data.input_shape, data.num_classes, spec.seed, OptimConfig(), OptimConfig()
    )
    state.load_bytes(ctx.state["client.0"]["blob"])
    for key, value in state.model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)
    assert saved["rounds_trained"] == 1 and saved["arch"] == "mlp"


def test_the_run_keeps_the_teachers_the_client_distilled_from_and_shadows_replay_them(tmp_path):
    overrides = ["clients.num_clients=3", "rounds=2", "data.proxy_size=200", "audit.enabled=true"]
    _, grid = _run(tmp_path / "dsfl", [*overrides, "audit.client=1", "audit.shadows=2"])
    digests = [
        m.content["payload"]
        for m in grid.sent
        if m.metadata.message_type == MSG_ROUND and 1 in m.content["config"].get("digest_ids", [])
    ]
    kept = load_teachers(tmp_path / "dsfl")
    assert len(kept) == len(digests) == 2
    for (idx, logits), sent in zip(kept, digests, strict=True):
        assert np.array_equal(idx, sent["digest.proxy_idx"].numpy())
        assert np.array_equal(logits, sent["digest.teacher_logits"].numpy())
    result = json.loads((tmp_path / "dsfl" / "audit.json").read_text())
    assert result["membership"]["shadow_digests_replayed"] == 2 and result["canary"] is None


def test_audit_detects_membership_on_an_overfit_non_dp_student(overfit_run):
    path, _, _ = overfit_run
    result = json.loads((path / "audit.json").read_text())  # written at the end of the run
    mem = result["membership"]
    assert mem["loss_threshold"]["auc"] > 0.6
    assert mem["lira_offline"]["auc"] > 0.6
    assert mem["loss_threshold"]["members"] == mem["loss_threshold"]["non_members"] > 30
    assert result["theoretical_epsilon"] is None and result["dp"] is False
    # A non-private student memorises its canaries: the one-run audit proves epsilon > 1.
    assert result["canary"]["epsilon_lower_bound"] > 1.0


def test_audit_lower_bound_stays_under_the_theoretical_epsilon_under_strong_dp(tmp_path):
    _run(tmp_path / "dp", OVERFIT + STRONG_DP)
    result = json.loads((tmp_path / "dp" / "audit.json").read_text())
    theory = result["theoretical_epsilon"]
    assert result["dp"] and 0 < theory < 1
    assert result["canary"]["epsilon_lower_bound"] <= theory
    assert result["membership"]["loss_threshold"]["auc"] < 0.6


def test_fedkd_audit_cli_reprints_and_rewrites_the_audit(overfit_run, tmp_path):
    path = tmp_path / "copy"  # a copy: the other tests read the run's own audit.json
    shutil.copytree(overfit_run[0], path)
    out = CliRunner().invoke(app, ["audit", str(path), "--shadows", "2"])
    assert out.exit_code == 0, out.output
    assert "loss threshold" in out.output and "epsilon >=" in out.output
    assert json.loads((path / "audit.json").read_text())["membership"]["shadows"] == 2


def test_audit_of_a_run_without_the_student_says_what_to_do(tmp_path):
    spec = load_spec(None, ["clients.num_clients=4", "rounds=1", "data.proxy_size=200"])
    grid = InProcessGrid(make_client_app(spec), spec.num_nodes)
    run_rounds(grid, spec, RunRecorder(tmp_path / "plain", spec))
    with pytest.raises(AuditError, match=r"\[audit\] enabled = true"):
        audit_run(tmp_path / "plain")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("audit.client=10", "audit.client: 10 is not a client id"),
        ("audit.canaries=10", "audit.canaries: canaries are only inserted with audit.enabled"),
        ("audit.shadows=1", "audit.shadows: offline LiRA needs at least 2"),
    ],
)
def test_audit_spec_errors_are_one_line(override, message):
    with pytest.raises(SpecError, match=message):
        load_spec(None, [override])
