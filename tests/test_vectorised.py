"""The vectorised cohort learner against the per-client loop, and vectorised DP-SGD against Opacus.

The loop (`CohortLearner`) is the reference: the same seed must give the same client weights,
optimizer states, uploads and metrics from both paths, up to float rounding.
"""

import dataclasses
import io
import warnings

import numpy as np
import pytest
import torch

from fedkd import spec as spec_module
from fedkd.data import load_federated_data
from fedkd.learner import stacked_cnn
from fedkd.learner import vectorised as vec
from fedkd.learner.batch_plans import plan_batches
from fedkd.learner.cohort import DIGEST_DIVERGED, TRAIN_DIVERGED, CohortConfig, CohortLearner
from fedkd.learner.device import PRECISIONS, resolve_device
from fedkd.learner.functional_optim import FunctionalAdam, FunctionalSGD
from fedkd.learner.loop import (
    PHASE_TRAIN,
    ClassRegulariser,
    ClientState,
    OptimConfig,
    StepConfig,
    make_optimizer,
    seeded_generator,
)
from fedkd.learner.vectorised import VectorisedCohortLearner
from fedkd.models.zoo import build_model
from fedkd.privacy import vectorised_dpsgd as vdp
from fedkd.privacy.dpsgd import DpSgdSettings
from fedkd.spec import SpecError, load_spec
from strategies.dsfl import DSFL

CLIENTS = list(range(6))
PROXY = np.arange(0, 200, 2)  # a proxy subset of 100 indices


@pytest.fixture(scope="module")
def data():
    # Dirichlet(0.5) over 6 clients: training sets of 116 to 264 examples (different step counts).
    d = load_federated_data(source="digits", num_clients=6, proxy_size=200, seed=0)
    assert len({c.num_examples for c in d.clients}) == 6
    return d


def config(arch="cnn_small", optimizer="sgd", lr=0.05, epochs=2, loss="kl", temperature=1.0):
    arch_of = arch if callable(arch) else (lambda cid: arch)
    optim = OptimConfig(optimizer=optimizer, lr=lr, momentum=0.9, weight_decay=1e-3)
    return CohortConfig(
        seed=0,
        arch_of=arch_of,
        private=StepConfig(epochs=epochs, batch_size=32, optim=optim),
        distill=StepConfig(epochs=1, batch_size=64, optim=optim),
        distill_loss=loss,
        distill_temperature=temperature,
    )


def client_state(data, cfg, cid, blob) -> ClientState:
    state = ClientState.create(
        cid, cfg.arch_of(cid), data.input_shape, 10, 0, cfg.private.optim, cfg.distill.optim
    )
    state.load_bytes(blob)
    return state


def assert_same_states(data, cfg, a, b, atol):
    """Same weights, same optimizer states (torch format, same keys), same round counter."""
    assert set(a) == set(b)
    for cid in a:
        sa, sb = client_state(data, cfg, cid, a[cid]), client_state(data, cfg, cid, b[cid])
        assert sa.rounds_trained == sb.rounds_trained
        for key, value in sa.model.state_dict().items():
            torch.testing.assert_close(sb.model.state_dict()[key], value, atol=atol, rtol=0)
        for which in ("private_opt", "distill_opt"):
            da = getattr(sa, which).state_dict()
            db = getattr(sb, which).state_dict()
            assert da["param_groups"] == db["param_groups"]
            assert da["state"].keys() == db["state"].keys()
            for i, entry in da["state"].items():
                assert entry.keys() == db["state"][i].keys()
                for key, value in entry.items():
                    torch.testing.assert_close(db["state"][i][key], value, atol=atol, rtol=0)


def train_and_upload_logits(learner, rnd, client_ids=CLIENTS):
    """A logit teacher's client round: private training, then logits on the proxy subset
    (and the label histogram where the config has one)."""
    plan = {"proxy_idx": PROXY.astype(np.int32)}
    return DSFL.client_round(DSFL.Params(), learner, rnd, client_ids, plan)


def distill_on_proxy(learner, rnd, teacher, client_ids=CLIENTS):
    return learner.distill(rnd, client_ids, learner.data.proxy_x[PROXY], teacher)


def run_rounds(learner_cls, data, cfg, rounds=2, teacher_seed=None, **kw):
    """`rounds` rounds; every round a fresh learner that only sees the previous bytes."""
    states: dict[int, bytes] = {}
    outputs = []
    for rnd in range(1, rounds + 1):
        learner = learner_cls(data, cfg, dict(states), **kw)
        out = train_and_upload_logits(learner, rnd)
        if teacher_seed is not None:
            teacher = np.random.default_rng(teacher_seed + rnd).normal(size=(len(PROXY), 10))
            digest = distill_on_proxy(learner, rnd, teacher.astype(np.float32))
            for cid, res in digest.items():
                out[cid].metrics.update(res.metrics)
        states = dict(learner.states)
        outputs.append(out)
    return states, outputs


def assert_same_outputs(a, b, atol):
    # Arrays also get a relative 1e-5: proxy logits reach about 10 after two epochs, where float32
    # summation order alone (which differs between CPUs' kernels) moves them by more than 1e-5.
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        for cid in ra:
            assert ra[cid].metrics.keys() == rb[cid].metrics.keys()
            for key, value in ra[cid].metrics.items():
                assert rb[cid].metrics[key] == pytest.approx(value, abs=atol), key
            assert ra[cid].arrays.keys() == rb[cid].arrays.keys()
            for key, value in ra[cid].arrays.items():
                np.testing.assert_allclose(rb[cid].arrays[key], value, atol=atol, rtol=1e-5)


# -- the learner against the loop --------------------------------------------------------------
@pytest.mark.parametrize(("stacked", "stack_rows"), [(None, None), (None, 64), (False, None)])
def test_sgd_training_and_distillation_match_the_loop(data, stacked, stack_rows):
    """SGD + momentum + weight decay, 6 clients of different sizes, 2 epochs, 2 rounds, KL; the
    CPU's default steps (`stacked_cnn`'s grouped convolutions; with `stack_rows` 64, training
    steps in passes of 2 clients, distillation steps of 1, logits in passes of 21 rows) and
    ``vmap``'s."""
    cfg = config()
    sa, oa = run_rounds(CohortLearner, data, cfg, teacher_seed=0)
    sb, ob = run_rounds(
        VectorisedCohortLearner, data, cfg, teacher_seed=0, stacked=stacked, stack_rows=stack_rows
    )
    assert_same_states(data, cfg, sa, sb, atol=1e-5)
    assert_same_outputs(oa, ob, atol=1e-5)  # proxy logits, train_loss, distill_loss


def blow_up(data, cfg, states, cid, scale) -> ClientState:
    """Client `cid`'s stored weights in `states` times `scale`; its state as now stored."""
    blown = client_state(data, cfg, cid, states[cid])
    with torch.no_grad():
        for p in blown.model.parameters():
            p.mul_(scale)
    states[cid] = blown.to_bytes()
    return blown


@pytest.mark.parametrize("learner_cls", [CohortLearner, VectorisedCohortLearner])
def test_a_digest_that_makes_a_student_non_finite_is_undone(data, learner_cls):
    cfg = config(epochs=1)
    states, _ = run_rounds(learner_cls, data, cfg, rounds=1)
    # Client 3's weights blown up (as DP-SGD noise did to a 27-example client at epsilon 1):
    # its outputs are still finite, but distilling on them overflows and turns them NaN.
    blow_up(data, cfg, states, 3, 1e5)
    learner = learner_cls(data, cfg, dict(states))
    teacher = np.random.default_rng(0).normal(size=(len(PROXY), 10)).astype(np.float32)
    digest = distill_on_proxy(learner, 2, teacher)
    assert digest[3].metrics[DIGEST_DIVERGED] == 1.0
    assert learner.states[3] == states[3], "the stored student from before the digest stays"
    for cid in set(CLIENTS) - {3}:
        assert DIGEST_DIVERGED not in digest[cid].metrics
        assert learner.states[cid] != states[cid]
    again = learner.evaluate([3], np.arange(100))[3]
    assert np.isfinite(again.arrays["test_logits"]).all()


@pytest.mark.parametrize("learner_cls", [CohortLearner, VectorisedCohortLearner])
@pytest.mark.parametrize("dp", [False, True])
def test_private_training_that_makes_a_student_non_finite_is_undone(data, learner_cls, dp):
    """The client keeps its student from before the round (a NaN student would fail every
    round after), reports ``train_diverged`` and no loss, and still counts the DP-SGD steps the
    undone round took (they are charged)."""
    cfg = config(epochs=1)
    if dp:
        settings = DpSgdSettings(
            max_grad_norm=1.0, delta=1e-5, target_epsilon=4.0, planned_epochs=2
        )
        cfg = dataclasses.replace(cfg, dp=settings)
    states, _ = run_rounds(CohortLearner, data, cfg, rounds=1)
    # Client 3's weights blown up: its logits overflow in training and its student turns NaN.
    blown = blow_up(data, cfg, states, 3, 1e10)
    learner = learner_cls(data, cfg, dict(states))
    trained = learner.train_private(2, CLIENTS)
    assert trained[3].metrics[TRAIN_DIVERGED] == 1.0
    assert "train_loss" not in trained[3].metrics
    kept = client_state(data, cfg, 3, learner.states[3])
    for key, value in blown.model.state_dict().items():
        torch.testing.assert_close(kept.model.state_dict()[key], value, rtol=0, atol=0)
    assert kept.rounds_trained == blown.rounds_trained
    taken = trained[3].metrics["dp_steps"] if dp else 0
    assert taken >= (1 if dp else 0) and kept.dp_steps == blown.dp_steps + taken
    for cid in set(CLIENTS) - {3}:
        assert TRAIN_DIVERGED not in trained[cid].metrics
        assert np.isfinite(trained[cid].metrics["train_loss"])
        assert learner.states[cid] != states[cid]


def test_label_histograms_match_the_loop_and_repeat_every_round(data):
    cfg = dataclasses.replace(config(epochs=1), label_histogram_noise=3.0)
    _, oa = run_rounds(CohortLearner, data, cfg)
    _, ob = run_rounds(VectorisedCohortLearner, data, cfg)
    assert_same_outputs(oa, ob, atol=1e-5)
    for cid in CLIENTS:
        first, second = (out[cid].arrays["label_histogram"] for out in oa)
        np.testing.assert_array_equal(first, second)  # the same release, resent
        exact = np.bincount(data.clients[cid].y_train, minlength=10)
        assert not np.array_equal(first, exact)  # noisy
        assert np.abs(first - exact).max() < 6 * 3.0


@pytest.mark.parametrize("stack_rows", [None, 96])
def test_adam_training_matches_the_loop(data, stack_rows):
    """Adam: the update is bitwise torch's (see the optimizer test); end to end, Adam divides
    by sqrt(v), which turns ~1e-9 gradient rounding on small coordinates into ~1e-5 weight
    differences, hence the looser tolerance. `stack_rows` 96: training steps in passes of 3
    clients."""
    cfg = config(optimizer="adam", lr=1e-3)
    sa, oa = run_rounds(CohortLearner, data, cfg, teacher_seed=1)
    sb, ob = run_rounds(VectorisedCohortLearner, data, cfg, teacher_seed=1, stack_rows=stack_rows)
    assert_same_states(data, cfg, sa, sb, atol=2e-4)
    assert_same_outputs(oa, ob, atol=2e-4)


def test_mae_distillation_and_mixed_architectures_match_the_loop(data):
    cfg = config(arch=lambda cid: ("cnn_small", "mlp")[cid % 2], loss="mae", epochs=1)
    sa, oa = run_rounds(CohortLearner, data, cfg, teacher_seed=2)
    sb, ob = run_rounds(VectorisedCohortLearner, data, cfg, teacher_seed=2, max_chunk=2)
    assert_same_states(data, cfg, sa, sb, atol=1e-5)
    assert_same_outputs(oa, ob, atol=1e-5)


@pytest.mark.parametrize(("optimizer", "stacked"), [("sgd", None), ("adam", None), ("sgd", False)])
def test_very_unequal_clients_match_the_loop_without_computing_on_padding(
    monkeypatch, optimizer, stacked
):
    """Clients of 13 to 421 examples (Dirichlet 0.1), not in size order, two epochs: the same
    states and outputs as the loop, and private training computes each step only on the
    clients that still have a batch (not every client padded to the largest one's steps)."""
    data = load_federated_data(source="digits", num_clients=6, alpha=0.1, proxy_size=200, seed=0)
    lengths = [len(c.y_train) for c in data.clients]
    assert max(lengths) > 20 * min(lengths) and lengths != sorted(lengths, reverse=True)
    cfg = config(optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 1e-3)
    sa, oa = run_rounds(CohortLearner, data, cfg, teacher_seed=4)
    sb, ob = run_rounds(VectorisedCohortLearner, data, cfg, teacher_seed=4, stacked=stacked)
    assert_same_states(data, cfg, sa, sb, atol=1e-5)
    assert_same_outputs(oa, ob, atol=1e-5)

    rows = []  # (clients, rows per client) of every training step

    def counting(step):
        def call(params, x, *rest):
            rows.append(tuple(x.shape[:2]))
            return step(params, x, *rest)

        return call

    def counting_vmap(fn, *args, **kwargs):
        return counting(torch.func.vmap(fn, *args, **kwargs))

    def counting_stacked(*args, **kwargs):
        return counting(stacked_cnn.stacked_grad_and_value(*args, **kwargs))

    monkeypatch.setattr(vec, "vmap", counting_vmap)
    monkeypatch.setattr(vec, "stacked_grad_and_value", counting_stacked)
    VectorisedCohortLearner(data, cfg, {}, stacked=stacked).train_private(1, CLIENTS)
    computed = sum(k * b for k, b in rows)
    # At most one short batch per client and epoch is padded to the batch size.
    assert computed <= 2 * sum(lengths) + 2 * len(lengths) * 32
    assert len(rows) == 2 * -(-max(lengths) // 32)  # steps of the largest client


def test_class_logits_upload_and_fd_regulariser_match_the_loop(data):
    cfg = config(epochs=1)
    present = torch.ones(10, dtype=torch.bool)
    present[3] = False  # a class nobody reported: masked out of the regulariser
    teacher = ClassRegulariser(
        targets=torch.randn(10, 10, generator=torch.Generator().manual_seed(0)) * 3,
        present=present,
        weight=0.5,
        temperature=2.0,
    )
    results = []
    for cls in (CohortLearner, VectorisedCohortLearner):
        states: dict[int, bytes] = {}
        learner = cls(data, cfg, states)
        out = learner.train_private(1, CLIENTS, teacher)
        for cid, (means, counts) in learner.class_statistics(CLIENTS, "logits").items():
            out[cid].arrays.update(class_logits=means, class_counts=counts)
        results.append((states, out))
    (sa, oa), (sb, ob) = results
    assert {"class_logits", "class_counts"} <= set(ob[0].arrays)
    assert_same_outputs([oa], [ob], atol=1e-5)
    assert_same_states(data, cfg, sa, sb, atol=1e-5)


def test_weights_upload_and_evaluation_match_the_loop():
    # With validation slices, so that every accuracy the evaluation reports is compared.
    data = load_federated_data(
        source="digits", num_clients=6, proxy_size=200, seed=0, validation_fraction=0.1
    )
    cfg = config(epochs=1)
    test_idx = np.arange(0, 360, 3)
    results = []
    # predict_rows=50: logits come in many passes; one client at a time (a CPU's default) and
    # all stacked clients per vmapped pass (a GPU's), 8 rows each for 6 clients.
    for cls, kw in ((CohortLearner, {}), (VectorisedCohortLearner, {"predict_rows": 50})):
        for per_client in (True, False) if kw else (None,):
            learner = cls(data, cfg, {}, **kw)
            if per_client is not None:
                learner.per_client_predict = per_client
            out = learner.train_private(1, CLIENTS)
            for cid, weights in learner.get_weights(CLIENTS).items():
                out[cid].arrays.update(weights)
            results.append((out, learner.evaluate(CLIENTS, test_idx)))
    (oa, ea), (ob, eb), (oc, ec) = results
    assert_same_outputs([oa, ea], [ob, eb], atol=1e-5)
    assert_same_outputs([oa, ea], [oc, ec], atol=1e-5)
    assert {"test_acc", "local_acc", "val_acc"} <= set(eb[0].metrics)


def test_loop_and_vectorised_take_turns_on_the_same_bytes(data):
    """Round 1 by one learner, round 2 by the other: the same as the loop twice."""
    cfg = config(epochs=1)
    loop_states, _ = run_rounds(CohortLearner, data, cfg, teacher_seed=3)
    for first, second in (
        (CohortLearner, VectorisedCohortLearner),
        (VectorisedCohortLearner, CohortLearner),
    ):
        states: dict[int, bytes] = {}
        for rnd, cls in ((1, first), (2, second)):
            learner = cls(data, cfg, states)
            train_and_upload_logits(learner, rnd)
            teacher = np.random.default_rng(3 + rnd).normal(size=(len(PROXY), 10))
            distill_on_proxy(learner, rnd, teacher.astype(np.float32))
        assert_same_states(data, cfg, loop_states, states, atol=1e-5)


def test_precision_options(data):
    cfg = config(epochs=1)
    fp32, _ = run_rounds(VectorisedCohortLearner, data, cfg, rounds=1)
    tf32, _ = run_rounds(VectorisedCohortLearner, data, cfg, rounds=1, precision="tf32")
    # TF32 only changes CUDA matmuls and convolutions.
    if resolve_device("auto").type == "cpu":
        assert_same_states(data, cfg, fp32, tf32, atol=1e-6)
    bf16, out = run_rounds(VectorisedCohortLearner, data, cfg, rounds=1, precision="bf16")
    assert all(np.isfinite(r.arrays["logits"]).all() for r in out[0].values())
    a = client_state(data, cfg, 0, fp32[0]).model.state_dict()
    b = client_state(data, cfg, 0, bf16[0]).model.state_dict()
    drift = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert 0 < drift < 0.05, "bf16 autocast changes the numbers, but not by much"
    with pytest.raises(ValueError, match="precision 'fp16' is not one of"):
        VectorisedCohortLearner(data, cfg, {}, precision="fp16")


# -- building blocks ---------------------------------------------------------------------------
def test_batch_plan_reproduces_the_loops_minibatches():
    lengths, offsets, batch = [70, 5, 64], [0, 70, 75], 32
    plan = plan_batches(
        lengths,
        offsets,
        2,
        batch,
        [seeded_generator(0, 1, c, PHASE_TRAIN) for c in range(3)],
        torch.device("cpu"),
    )
    assert plan.steps == 2 * 3  # the longest client: ceil(70 / 32) = 3 steps per epoch
    for k, (n, off) in enumerate(zip(lengths, offsets, strict=True)):
        gen = seeded_generator(0, 1, k, PHASE_TRAIN)
        expected = [
            c + off for _ in range(2) for c in torch.randperm(n, generator=gen).split(batch)
        ]
        for t in range(plan.steps):
            size = int(plan.size[t, k])
            if t < len(expected):
                assert torch.equal(plan.index[t, k, :size], expected[t])
                assert plan.weight[t, k, :size].sum() == pytest.approx(1.0)
            else:
                assert size == 0
            assert float(plan.weight[t, k, size:].abs().sum()) == 0.0  # padding weighs nothing


def test_batch_plan_counts_the_rows_its_steps_compute():
    """Clients of 70, 64 and 5 examples, 2 epochs at batch 32 (6, 4 and 2 steps): each step
    computes only the clients that still take it, at that step's longest batch."""
    gens = [seeded_generator(0, 1, c, PHASE_TRAIN) for c in range(3)]
    plan = plan_batches([70, 64, 5], [0, 70, 134], 2, 32, gens, torch.device("cpu"))
    assert plan.computed == [3, 3, 2, 2, 1, 1]
    assert plan.width == [32, 32, 32, 32, 32, 6]
    assert plan.real_rows == 2 * (70 + 64 + 5)
    # 2 x 3 x 32 + 2 x 2 x 32 + 32 + 6; in lockstep (all 3 clients each step): 3 x 166 = 498.
    assert plan.computed_rows == 358
    # Scattered steppers (not the largest first): every step computes the whole stack.
    gens = [seeded_generator(0, 1, c, PHASE_TRAIN) for c in range(3)]
    shuffled = plan_batches([5, 70, 64], [134, 0, 70], 2, 32, gens, torch.device("cpu"))
    assert shuffled.computed == [3, 3, 3, 3, 3, 3]


@pytest.mark.parametrize(
    ("functional", "torch_opt"),
    [
        (
            FunctionalSGD(lr=0.1, momentum=0.9, weight_decay=0.01),
            lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
        ),
        (FunctionalSGD(lr=0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
        (
            FunctionalAdam(lr=0.01, weight_decay=0.01),
            lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.01),
        ),
    ],
)
def test_functional_optimizers_are_torchs_update(functional, torch_opt):
    """Same gradients, K clients with different step counts (masked steps), state in torch's
    format both ways (a torch optimizer resumes from it)."""
    gen = torch.Generator().manual_seed(0)
    shapes = {"w": (4, 3), "b": (3,)}
    k = 3
    init = {n: torch.randn(k, *s, generator=gen) for n, s in shapes.items()}
    models = [{n: torch.nn.Parameter(init[n][j].clone()) for n in shapes} for j in range(k)]
    opts = [torch_opt(list(m.values())) for m in models]
    params, state = dict(init), functional.init(init)
    for t in range(7):
        active = torch.tensor([True, t % 2 == 0, 2 <= t < 4])  # client 2 starts late
        grads = {n: torch.randn(k, *s, generator=gen) for n, s in shapes.items()}
        for j in range(k):
            if active[j]:
                for n in shapes:
                    models[j][n].grad = grads[n][j].clone()
                opts[j].step()
        params, state = functional.step(params, grads, state, active)
        if t == 4:  # round trip through torch's format mid-way
            saved = [functional.to_torch(state, j) for j in range(k)]
            state = functional.from_torch(saved, params)
    for j in range(k):
        for n in shapes:
            torch.testing.assert_close(params[n][j], models[j][n].detach(), atol=1e-7, rtol=0)
        ours = functional.to_torch(state, j)
        theirs = opts[j].state_dict()["state"]
        assert ours.keys() == theirs.keys()
        for i, entry in theirs.items():
            assert entry.keys() == ours[i].keys()
            for key, value in entry.items():
                assert ours[i][key].dtype == value.dtype
                torch.testing.assert_close(ours[i][key], value, atol=1e-7, rtol=0)
        resumed = torch_opt([torch.nn.Parameter(models[j][n].detach().clone()) for n in shapes])
        resumed.load_state_dict(
            {"state": ours, "param_groups": opts[j].state_dict()["param_groups"]}
        )


def test_state_bytes_are_the_loops_format(data):
    """A client's bytes from the vectorised learner load into `ClientState` (and vice versa)."""
    cfg = config(optimizer="adam", lr=1e-3, epochs=1)
    states: dict[int, bytes] = {}
    VectorisedCohortLearner(data, cfg, states).train_private(1, [2])
    saved = torch.load(io.BytesIO(states[2]), weights_only=True)
    assert set(saved) == {
        "client_id",
        "arch",
        "model",
        "private_opt",
        "distill_opt",
        "rounds_trained",
        "dp_steps",
    }
    state = client_state(data, cfg, 2, states[2])
    assert state.rounds_trained == 1
    assert state.private_opt.state_dict()["state"][0]["step"] == 7  # ceil(193 / 32) steps
    assert state.distill_opt.state_dict()["state"] == {}  # never distilled yet
    fresh = make_optimizer(state.model.parameters(), cfg.private.optim).state_dict()
    assert saved["private_opt"]["param_groups"] == fresh["param_groups"]
    with pytest.raises(ValueError, match="saved student is 'cnn_small', spec says 'mlp'"):
        VectorisedCohortLearner(data, config(arch="mlp"), dict(states)).train_private(2, [2])


# -- spec and engine ---------------------------------------------------------------------------
def test_spec_learner_and_precision_keys():
    assert spec_module.PRECISIONS == PRECISIONS
    spec = load_spec(None, ["resources.learner=vectorised", "resources.precision=bf16"])
    assert (spec.resources.learner, spec.resources.precision) == ("vectorised", "bf16")
    assert load_spec().resources.learner == "loop"
    with pytest.raises(SpecError, match="resources.learner: 'vmap' is not one of loop, vect"):
        load_spec(None, ["resources.learner=vmap"])
    with pytest.raises(SpecError, match="resources.precision: 'fp16' is not one of"):
        load_spec(None, ["resources.learner=vectorised", "resources.precision=fp16"])
    with pytest.raises(SpecError, match="needs resources.learner = 'vectorised'"):
        load_spec(None, ["resources.precision=tf32"])


def test_engine_gives_the_same_metrics_with_the_vectorised_learner(tmp_path):
    from tests.test_engine import TIMINGS, run_inprocess

    _, _, loop, _ = run_inprocess(tmp_path, ["resources.learner=loop"], name="loop")
    _, _, fast, grid = run_inprocess(tmp_path, ["resources.learner=vectorised"], name="fast")
    assert len(loop) == len(fast) == 2
    for a, b in zip(loop, fast, strict=True):
        assert a.keys() == b.keys()
        assert b["learner_s"] > 0 and b["learner_max_s"] <= b["learner_s"]
        assert b["learner_max_s"] <= b["wall_s"]
        for key, value in a.items():
            if key in TIMINGS:
                continue
            if isinstance(value, float):
                assert b[key] == pytest.approx(value, abs=1e-5), key
            else:
                assert b[key] == value, key


# -- vectorised DP-SGD against Opacus ----------------------------------------------------------
def _opacus_grad(model, x, y, max_grad_norm, noise_multiplier, expected_batch, seed=0):
    """What Opacus's DPOptimizer leaves in p.grad for one batch (loss_reduction="mean")."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    gsm = GradSampleModule(model, loss_reduction="mean")
    opt = DPOptimizer(
        torch.optim.SGD(gsm.parameters(), lr=0.0),
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch,
        loss_reduction="mean",
        generator=torch.Generator().manual_seed(seed),
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook")
        torch.nn.functional.cross_entropy(gsm(x), y).backward()
    opt.pre_step()  # clip, accumulate, noise, scale: the gradient step() would apply
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    gsm.remove_hooks()  # the model is reused by other tests: leave it plain
    for p in model.parameters():
        p.grad = p.grad_sample = p.summed_grad = None
    return grads


@pytest.fixture(scope="module")
def dp_batch(data):
    """Three clients' models and a batch of 40 of their own examples each."""
    models, xs, ys = [], [], []
    for k in range(3):
        torch.manual_seed(k)
        models.append(build_model("cnn_small", data.input_shape, 10))
        xs.append(torch.from_numpy(data.clients[k].x_train[:40]))
        ys.append(torch.from_numpy(data.clients[k].y_train[:40]))
    params = {
        n: torch.stack([dict(m.named_parameters())[n].detach() for m in models])
        for n, _ in models[0].named_parameters()
    }
    return models, params, torch.stack(xs), torch.stack(ys)


def test_dp_sgd_clipped_sums_agree_with_opacus(dp_batch):
    models, params, x, y = dp_batch
    mask = torch.ones(3, 40, dtype=torch.bool)
    mask[1, 30:] = False  # client 1 sampled only 30 examples this step (padding after)
    ours, loss_sums = vdp.dp_sgd_gradients(
        models[0],
        params,
        x,
        y,
        mask,
        max_grad_norm=0.5,
        noise_multiplier=0.0,
        expected_batch_sizes=[32, 25, 32],
        noise_generators=[torch.Generator() for _ in range(3)],
    )
    for k, (n_rows, expected) in enumerate([(40, 32), (30, 25), (40, 32)]):
        ref = _opacus_grad(models[k], x[k, :n_rows], y[k, :n_rows], 0.5, 0.0, expected)
        for name, value in ref.items():
            torch.testing.assert_close(ours[name][k], value, atol=1e-6, rtol=1e-5)
        loss = torch.nn.functional.cross_entropy(models[k](x[k, :n_rows]), y[k, :n_rows]).detach()
        assert float(loss_sums[k]) == pytest.approx(float(loss) * n_rows, rel=1e-5)
    # Clipping bites: the clipped mean is smaller than the plain mean gradient.
    plain = torch.autograd.grad(
        torch.nn.functional.cross_entropy(models[0](x[0]), y[0]), list(models[0].parameters())
    )
    assert sum(float(g.norm() ** 2) for g in plain) > sum(
        float(ours[n][0].norm() ** 2) for n in ours
    )


def test_dp_sgd_noise_has_the_right_scale(dp_batch):
    models, params, x, y = dp_batch
    mask = torch.ones(3, 40, dtype=torch.bool)
    sigma, clip, expected = 1.3, 0.5, 32
    kwargs = {"max_grad_norm": clip, "expected_batch_sizes": [expected] * 3}
    clean, _ = vdp.dp_sgd_gradients(
        models[0], params, x, y, mask, noise_multiplier=0.0,
        noise_generators=[torch.Generator() for _ in range(3)], **kwargs,
    )  # fmt: skip
    gens = [torch.Generator().manual_seed(10 + k) for k in range(3)]
    noisy, _ = vdp.dp_sgd_gradients(
        models[0], params, x, y, mask, noise_multiplier=sigma, noise_generators=gens, **kwargs
    )
    noise = torch.cat([(noisy[n] - clean[n]).flatten() for n in clean])  # 3 x 6,058 coordinates
    target = sigma * clip / expected
    assert float(noise.std()) == pytest.approx(target, rel=0.03)
    assert abs(float(noise.mean())) < 0.03 * target
    ref_clean = _opacus_grad(models[0], x[0], y[0], clip, 0.0, expected)
    ref_noisy = _opacus_grad(models[0], x[0], y[0], clip, sigma, expected, seed=1)
    ref_noise = torch.cat([(ref_noisy[n] - ref_clean[n]).flatten() for n in ref_clean])
    assert float(ref_noise.std()) == pytest.approx(target, rel=0.05)  # Opacus: same scale
    # Seeded: the same generators give the same noise.
    again, _ = vdp.dp_sgd_gradients(
        models[0], params, x, y, mask, noise_multiplier=sigma,
        noise_generators=[torch.Generator().manual_seed(10 + k) for k in range(3)], **kwargs,
    )  # fmt: skip
    assert all(torch.equal(again[n], noisy[n]) for n in noisy)


def test_poisson_sampling_rate_and_reproducibility():
    lengths, offsets, rates, steps = [200, 50], [0, 200], [0.1, 0.5], [300, 120]

    def plan(seed):
        gens = [torch.Generator().manual_seed(seed + k) for k in range(2)]
        return vdp.poisson_plan(lengths, offsets, rates, steps, gens)

    p = plan(0)
    assert p.steps == 300 and p.active.sum(0).tolist() == [300, 120]
    for k, (n, off, q, s) in enumerate(zip(lengths, offsets, rates, steps, strict=True)):
        counts = torch.tensor([int(p.mask[t][k].sum()) for t in range(s)], dtype=torch.float64)
        assert float(counts.mean()) == pytest.approx(n * q, rel=0.05)
        # Binomial(n, q) batch sizes, not fixed ones.
        assert float(counts.var()) == pytest.approx(n * q * (1 - q), rel=0.25)
        rows = torch.cat([p.index[t][k][p.mask[t][k]] for t in range(s)])
        assert int(rows.min()) >= off and int(rows.max()) < off + n
        assert len(torch.unique(p.index[0][k][p.mask[0][k]])) == int(p.mask[0][k].sum())
    q = plan(0)
    assert all(torch.equal(a, b) for a, b in zip(p.index, q.index, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(p.index, plan(1).index, strict=True))


def test_train_dp_sgd_steps_and_masking(data):
    """Opacus's step counts per client; a client that finished its steps is left alone."""
    x = torch.from_numpy(np.concatenate([data.clients[k].x_train for k in (0, 1)]))
    y = torch.from_numpy(np.concatenate([data.clients[k].y_train for k in (0, 1)]))
    lengths = [len(data.clients[0].y_train), 40]  # client 1 uses only 40 of its examples
    offsets = [0, len(data.clients[0].y_train)]
    torch.manual_seed(0)
    model = build_model("mlp", data.input_shape, 10)
    params = {n: p.detach()[None].repeat(2, *[1] * p.dim()) for n, p in model.named_parameters()}
    opt = FunctionalSGD(lr=0.1, momentum=0.9)
    out = vdp.train_dp_sgd(
        model,
        params,
        opt,
        opt.init(params),
        x,
        y,
        lengths,
        offsets,
        epochs=2,
        batch_size=32,
        max_grad_norm=1.0,
        noise_multiplier=0.8,
        sample_generators=[torch.Generator().manual_seed(k) for k in range(2)],
        noise_generators=[torch.Generator().manual_seed(9 + k) for k in range(2)],
    )
    assert out.steps == [2 * 9, 2 * 2]  # ceil(264 / 32) = 9, ceil(40 / 32) = 2 per epoch
    assert out.sample_rates == [pytest.approx(1 / 9), pytest.approx(1 / 2)]
    assert all(np.isfinite(out.loss.numpy()))
    # Client 1 after its 4 steps equals client 1 trained alone for exactly 4 steps.
    alone = vdp.train_dp_sgd(
        model,
        {n: p[1:].clone() for n, p in params.items()},
        opt,
        opt.init({n: p[1:] for n, p in params.items()}),
        x,
        y,
        lengths[1:],
        offsets[1:],
        epochs=2,
        batch_size=32,
        max_grad_norm=1.0,
        noise_multiplier=0.8,
        sample_generators=[torch.Generator().manual_seed(1)],
        noise_generators=[torch.Generator().manual_seed(10)],
    )
    for name, value in alone.params.items():
        torch.testing.assert_close(out.params[name][1], value[0], atol=1e-6, rtol=0)
    for i, value in out.opt_state["momentum_buffer"].items():
        torch.testing.assert_close(value[1], alone.opt_state["momentum_buffer"][i][0])


def test_train_dp_sgd_computes_only_the_clients_still_stepping(data, monkeypatch):
    """Clients of 264, 100 and 40 examples (9, 4 and 2 steps at batch 32): each step computes
    per-sample gradients of the clients that still step (15 client-steps, not 3 x 9); each
    client ends as if trained alone; the caller's weights and state are left as they were."""
    sizes = [264, 100, 40]
    x = torch.from_numpy(np.concatenate([data.clients[k].x_train[: sizes[k]] for k in range(3)]))
    y = torch.from_numpy(np.concatenate([data.clients[k].y_train[: sizes[k]] for k in range(3)]))
    offsets = [0, 264, 364]
    assert [len(data.clients[k].y_train) >= n for k, n in enumerate(sizes)] == [True] * 3
    torch.manual_seed(0)
    model = build_model("mlp", data.input_shape, 10)
    params = {n: p.detach()[None].repeat(3, *[1] * p.dim()) for n, p in model.named_parameters()}
    before = {n: p.clone() for n, p in params.items()}
    opt = FunctionalAdam(lr=1e-3)
    state = opt.init(params)

    def run(ks, counted=None):
        return vdp.train_dp_sgd(
            model,
            {n: p[ks].clone() for n, p in params.items()},
            opt,
            opt.init({n: p[ks] for n, p in params.items()}) if counted is None else state,
            x,
            y,
            [sizes[k] for k in ks],
            [offsets[k] for k in ks],
            epochs=1,
            batch_size=32,
            max_grad_norm=1.0,
            noise_multiplier=0.8,
            sample_generators=[torch.Generator().manual_seed(k) for k in ks],
            noise_generators=[torch.Generator().manual_seed(9 + k) for k in ks],
        )

    clients_per_step = []
    clipped_sum_and_losses = vdp.clipped_sum_and_losses

    def counting(model, params, x, *rest):
        clients_per_step.append(x.shape[0])
        return clipped_sum_and_losses(model, params, x, *rest)

    monkeypatch.setattr(vdp, "clipped_sum_and_losses", counting)
    together = vdp.train_dp_sgd(
        model, params, opt, state, x, y, sizes, offsets, epochs=1, batch_size=32,
        max_grad_norm=1.0, noise_multiplier=0.8,
        sample_generators=[torch.Generator().manual_seed(k) for k in range(3)],
        noise_generators=[torch.Generator().manual_seed(9 + k) for k in range(3)],
    )  # fmt: skip
    assert together.steps == [9, 4, 2]
    assert clients_per_step == [3, 3, 2, 2, 1, 1, 1, 1, 1]
    assert all(torch.equal(params[n], before[n]) for n in params)
    assert all(float(v.abs().sum()) == 0 for v in state["exp_avg"].values())
    for k in range(3):
        alone = run([k])
        for name, value in alone.params.items():
            torch.testing.assert_close(together.params[name][k], value[0], atol=1e-6, rtol=0)
        for i, value in alone.opt_state["exp_avg_sq"].items():
            torch.testing.assert_close(together.opt_state["exp_avg_sq"][i][k], value[0])
        assert float(together.loss[k]) == pytest.approx(float(alone.loss[0]), rel=1e-5)


def test_clients_without_local_test_data_evaluate_like_the_loop():
    bare = load_federated_data(
        source="digits", num_clients=3, proxy_size=200, local_test_fraction=0.0, seed=0
    )
    cfg = config(epochs=1)
    ids, test_idx = [0, 1, 2], np.arange(50)
    ea = CohortLearner(bare, cfg, {}).evaluate(ids, test_idx)
    eb = VectorisedCohortLearner(bare, cfg, {}).evaluate(ids, test_idx)
    for cid in ids:
        assert np.isnan(ea[cid].metrics["local_acc"]) and np.isnan(eb[cid].metrics["local_acc"])
        assert eb[cid].metrics["test_acc"] == pytest.approx(ea[cid].metrics["test_acc"])
        np.testing.assert_allclose(
            eb[cid].arrays["test_logits"], ea[cid].arrays["test_logits"], atol=1e-5
        )


# -- DP-SGD in the vectorised learner ------------------------------------------------------------
def test_vectorised_dp_sgd_charges_what_the_opacus_loop_charges(data):
    from dataclasses import replace

    from fedkd.privacy.dpsgd import DpSgdSettings

    # 2 epochs in round 1, then 1: noise calibrated for 3 epochs in all.
    dp = DpSgdSettings(max_grad_norm=1.0, delta=1e-5, target_epsilon=4.0, planned_epochs=3)
    cfg = replace(config(epochs=1), dp=dp)
    cfg = replace(cfg, private=replace(cfg.private, epochs_schedule=(2, 1)))
    loop_states, loop_out = run_rounds(CohortLearner, data, cfg)
    fast_states, fast_out = run_rounds(VectorisedCohortLearner, data, cfg)
    keys = ("dp_sample_rate", "dp_noise_multiplier", "dp_steps", "dp_steps_total", "num_examples")
    for cid in CLIENTS:
        first, second = (out[cid].metrics for out in loop_out)
        assert first["dp_steps"] == 2 * second["dp_steps"]
        assert second["dp_steps_total"] == first["dp_steps"] + second["dp_steps"]
    for a, b in zip(loop_out, fast_out, strict=True):
        for cid in CLIENTS:
            assert {k: b[cid].metrics[k] for k in keys} == {k: a[cid].metrics[k] for k in keys}
            # Same noise calibrated for the client's whole run: clients of different sizes
            # sample at different rates and get different multipliers.
            assert a[cid].metrics["dp_noise_multiplier"] > 0
            assert np.isfinite(b[cid].arrays["logits"]).all()
    sigmas = {loop_out[0][c].metrics["dp_noise_multiplier"] for c in CLIENTS}
    assert len(sigmas) > 1
    # Different random draws (Opacus's generator vs the client's own), same training: the
    # weights moved, and by a similar amount in both paths.
    for cid in CLIENTS:
        start = ClientState.create(
            cid, "cnn_small", data.input_shape, 10, 0, cfg.private.optim, cfg.distill.optim
        ).model.state_dict()
        moved = []
        for states in (loop_states, fast_states):
            sd = client_state(data, cfg, cid, states[cid]).model.state_dict()
            moved.append(sum(float((sd[k] - start[k]).norm()) for k in start))
        assert moved[1] > 0 and 0.5 < moved[1] / moved[0] < 2.0


def test_engine_ledgers_are_the_same_with_the_vectorised_dp_learner(tmp_path):
    from tests.test_engine import run_inprocess

    dp = ["privacy.dpsgd=true", "privacy.target_epsilon=4", "clients.clients_per_node=2"]
    _, _, loop, _ = run_inprocess(tmp_path, [*dp, "resources.learner=loop"], name="loop")
    _, _, fast, _ = run_inprocess(tmp_path, [*dp, "resources.learner=vectorised"], name="fast")
    assert [r["epsilon"] for r in fast] == [r["epsilon"] for r in loop]
    assert 0 < fast[-1]["epsilon_max"] <= 4.0
    assert fast[-1]["clients_ok"] == 4


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_steps_in_place_once_every_buffer_exists_with_torchs_update(momentum):
    """`step_first` writes SGD's update into the stack in place (torch's own operations), with
    torch's numbers exactly; a first step (buffers not yet created) or a masked step does not."""
    opt = FunctionalSGD(lr=0.1, momentum=momentum, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    k, shapes = 3, {"w": (4, 3), "b": (3,)}
    init = {n: torch.randn(k, *s, generator=gen) for n, s in shapes.items()}
    models = [{n: torch.nn.Parameter(init[n][j].clone()) for n in shapes} for j in range(k)]
    torch_opts = [
        torch.optim.SGD(list(m.values()), lr=0.1, momentum=momentum, weight_decay=0.01)
        for m in models
    ]
    params, state = {n: p.clone() for n, p in init.items()}, opt.init(init)
    every = torch.ones(k, dtype=torch.bool)
    in_place = []
    for _ in range(4):
        grads = {n: torch.randn(k, *s, generator=gen) for n, s in shapes.items()}
        for j in range(k):
            for n in shapes:
                models[j][n].grad = grads[n][j].clone()
            torch_opts[j].step()
        probe = {n: g.clone() for n, g in grads.items()}
        in_place.append(opt.step_in_place({}, {}, state, every) if momentum else True)
        before = {n: p for n, p in params.items()}
        params, state = opt.step_first(params, probe, state, every, k)
        if in_place[-1]:
            assert all(params[n] is before[n] for n in shapes)  # the same tensors, updated
    assert in_place == [momentum == 0, True, True, True]
    for j in range(k):
        for n in shapes:
            assert torch.equal(params[n][j], models[j][n].detach())
    masked = torch.tensor([True, False, True])
    assert not opt.step_in_place(params, grads, state, masked)
