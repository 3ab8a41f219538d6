"""The reference learner: persistence, determinism, FD's bounded digest, the server student."""

import numpy as np
import pytest
import torch

from fedkd.data import load_federated_data
from fedkd.learner import cohort
from fedkd.learner.cohort import CohortConfig, CohortLearner
from fedkd.learner.loop import (
    ClientState,
    OptimConfig,
    StepConfig,
    derive_seed,
    fit_batches,
    init_student,
    random_shift,
)
from fedkd.learner.server_student import ServerStudent
from fedkd.models.zoo import build_model
from strategies.dsfl import DSFL
from strategies.fd import FD, FDParams
from strategies.fedavg import FedAvg


@pytest.fixture(scope="module")
def data():
    return load_federated_data(source="digits", num_clients=4, proxy_size=200, seed=0)


def config(arch="cnn_small", optimizer="sgd"):
    step = StepConfig(epochs=1, batch_size=32, optim=OptimConfig(optimizer=optimizer))
    return CohortConfig(seed=0, arch_of=lambda cid: arch, private=step, distill=step)


def test_seeds_are_stable_and_distinct():
    assert derive_seed(0, 1, 2) == derive_seed(0, 1, 2)
    assert len({derive_seed(0, r, c) for r in range(5) for c in range(-2, 5)}) == 35


def test_init_student_seeds_only_the_cpu_generator(monkeypatch):
    # torch.manual_seed would also seed every accelerator (a lazy call with a formatted stack
    # trace each, paid three times per client and round); the weights are the CPU draw alone.
    seeded = []
    for module in (torch.cuda, torch.xpu, torch.mtia):
        monkeypatch.setattr(module, "manual_seed_all", lambda seed, m=module: seeded.append(m))
    model = init_student("cnn_small", (1, 8, 8), 10, 0, 3, 0)
    assert seeded == []
    monkeypatch.undo()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(0, 3, 0))
        expected = build_model("cnn_small", (1, 8, 8), 10)
    for got, want in zip(model.state_dict().values(), expected.state_dict().values(), strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_state_round_trip_keeps_model_and_optimizer(data, optimizer):
    states = {}
    learner = CohortLearner(data, config(optimizer=optimizer), states)
    learner.train_private(1, [0])
    cfg = learner.config
    state = ClientState.create(
        0, "cnn_small", data.input_shape, 10, 0, cfg.private.optim, cfg.distill.optim
    )
    state.load_bytes(states[0])
    assert state.rounds_trained == 1
    assert state.private_opt.state_dict()["state"], "optimizer state (momentum/moments) persisted"
    with pytest.raises(ValueError, match="saved student is 'cnn_small', spec says 'mlp'"):
        ClientState.create(
            0, "mlp", data.input_shape, 10, 0, cfg.private.optim, cfg.distill.optim
        ).load_bytes(states[0])


def _fedavg_rounds(data, decoded):
    """Two FedAvg rounds of clients 0 and 1, each in a learner of its own (one message each);
    `decoded` counts the states decoded in the second."""
    states, out = {}, None
    weights = {
        k: v.numpy()
        for k, v in ClientState.create(
            9, "cnn_small", data.input_shape, 10, 0, OptimConfig(), OptimConfig()
        )
        .model.state_dict()
        .items()
    }
    for rnd in (1, 2):
        decoded.clear()
        learner = CohortLearner(data, config(), states)
        out = FedAvg.client_round(FedAvg.Params(), learner, rnd, [0, 1], weights)
        weights = out[0].arrays
        learner.logits([0, 1], data.proxy_x[:20])
    return out, states


def test_a_message_decodes_each_client_state_once(data, monkeypatch):
    # FedAvg loads a client three times per message (set_weights, train, get_weights): the
    # state saved by one step is reused by the next, with the numbers of decoding it again.
    decoded = []
    load_bytes = ClientState.load_bytes

    def counting(self, blob):
        decoded.append(self.client_id)
        load_bytes(self, blob)

    monkeypatch.setattr(ClientState, "load_bytes", counting)
    out, states = _fedavg_rounds(data, decoded)
    assert sorted(decoded) == [0, 1]  # set_weights' load only
    monkeypatch.setattr(cohort, "SAVED_STATES_BYTES", 0)  # every load decodes
    again, again_states = _fedavg_rounds(data, decoded)
    assert sorted(decoded) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert states == again_states
    for cid in (0, 1):
        assert out[cid].metrics == again[cid].metrics
        for k, v in out[cid].arrays.items():
            np.testing.assert_array_equal(v, again[cid].arrays[k])


def test_training_continues_from_saved_state(data):
    """Two rounds in one learner equal two rounds with the state carried as bytes in between."""
    a_states, b_states = {}, {}
    a = CohortLearner(data, config(), a_states)
    plan = {"proxy_idx": np.arange(50, dtype=np.int32)}
    params = DSFL.Params()
    DSFL.client_round(params, a, 1, [1], plan)
    out_a = DSFL.client_round(params, a, 2, [1], plan)
    b1 = CohortLearner(data, config(), b_states)
    DSFL.client_round(params, b1, 1, [1], plan)
    b2 = CohortLearner(data, config(), dict(b_states))  # a fresh process would see only bytes
    out_b = DSFL.client_round(params, b2, 2, [1], plan)
    np.testing.assert_array_equal(out_a[1].arrays["logits"], out_b[1].arrays["logits"])


def test_fd_digest_stays_finite_with_extreme_class_logits(data):
    learner = CohortLearner(data, config(), {})
    plan = {
        "class_logits": (torch.randn(10, 10) * 1e4).numpy(),
        "class_present": np.ones(10, dtype=np.uint8),
    }
    for rnd in (1, 2, 3):
        out = FD.client_round(FDParams(fd_weight=1.0), learner, rnd, [0, 1], plan)
        for res in out.values():
            assert np.isfinite(res.metrics["train_loss"])
            assert np.isfinite(res.arrays["class_logits"]).all()


def test_server_student_distills_towards_the_teacher(data):
    student = ServerStudent(
        "mlp", data.input_shape, 10, seed=0, step=StepConfig(5, 32, OptimConfig())
    )
    idx = np.arange(len(data.proxy_y))
    # An oracle teacher (one-hot log-probabilities from the true labels) should be learnable.
    teacher = np.log(np.eye(10, dtype=np.float32)[data.proxy_y] * 0.98 + 0.002)
    before = student.accuracy(data.test_x, data.test_y)
    student.fit(1, data.proxy_x, idx, teacher)
    assert student.accuracy(data.test_x, data.test_y) > max(0.6, before + 0.3)


def test_server_student_reset_returns_to_the_initial_weights_and_optimizer(data):
    student = ServerStudent("mlp", data.input_shape, 10, 0, StepConfig(2, 32, OptimConfig()))
    initial = [p.detach().clone() for p in student.model.parameters()]

    def same_as_initial() -> list[bool]:
        params = student.model.parameters()
        return [torch.equal(a, b) for a, b in zip(initial, params, strict=True)]

    student.fit_labels(1, data.proxy_x, data.proxy_y)
    assert not all(same_as_initial())
    student.reset()
    assert all(same_as_initial())
    assert student.opt.state_dict()["state"] == {}  # no momentum carried over


def test_self_training_fits_labels_then_adds_its_confident_guesses(data):
    def student() -> ServerStudent:
        return ServerStudent("mlp", data.input_shape, 10, 0, StepConfig(5, 32, OptimConfig()))

    x, y = data.proxy_x[:40], data.proxy_y[:40]
    rest = data.proxy_x[40:]
    plain, self_trained = student(), student()
    plain.fit_labels(1, x, y)  # from the initial weights, like fit_self_training's reset
    assert self_trained.fit_self_training(1, x, y, rest, confidence=0.0) == 0
    torch.testing.assert_close(self_trained.logits(rest), plain.logits(rest))
    added = self_trained.fit_self_training(1, x, y, rest, confidence=0.5, iterations=2)
    assert 0 < added <= len(rest)


def test_cosine_schedule_anneals_each_fit_from_the_base_lr_to_zero(data):
    step = StepConfig(2, 50, OptimConfig(lr=0.1), lr_schedule="cosine")
    student = ServerStudent("mlp", data.input_shape, 10, 0, step)
    x = torch.from_numpy(data.proxy_x)
    lrs: list[float] = []

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        lrs.append(student.opt.param_groups[0]["lr"])
        return student.model(x[idx]).square().mean()

    for _ in range(2):  # 200 examples, batch 50, 2 epochs: 8 steps per fit
        fit_batches(student.model, student.opt, 200, step, torch.Generator(), batch_loss)
        assert student.opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert lrs[0] == lrs[8] == pytest.approx(0.1)  # the second fit starts again from lr
    assert lrs[:8] == sorted(lrs[:8], reverse=True) and lrs[7] < 0.01


def test_server_student_seen_mode_keeps_earlier_labels(data):
    student = ServerStudent(
        "mlp",
        data.input_shape,
        10,
        0,
        StepConfig(1, 32, OptimConfig()),
        distill_on="seen",
        proxy_size=len(data.proxy_y),
    )
    teacher = np.zeros((50, 10), dtype=np.float32)
    student.fit(1, data.proxy_x, np.arange(50), teacher)
    student.fit(2, data.proxy_x, np.arange(50, 100), teacher)
    assert int(student._seen.sum()) == 100


def test_random_shift_moves_each_image_by_its_own_offset_with_zero_fill():
    x = torch.arange(1, 3 * 1 * 6 * 6 + 1, dtype=torch.float32).reshape(3, 1, 6, 6)
    out = random_shift(x, 2, torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    offsets = []
    for i in range(3):
        matches = []
        for sy in range(-2, 3):
            for sx in range(-2, 3):
                ref = torch.zeros(6, 6)
                for r in range(6):
                    for c in range(6):
                        if 0 <= r - sy < 6 and 0 <= c - sx < 6:
                            ref[r, c] = x[i, 0, r - sy, c - sx]
                if torch.equal(out[i, 0], ref):
                    matches.append((sy, sx))
        assert len(matches) == 1  # every value is distinct: exactly one offset explains it
        offsets.append(matches[0])
    assert len(set(offsets)) > 1  # offsets are drawn per image
    same = random_shift(x, 2, torch.Generator().manual_seed(1))
    assert torch.equal(out, same)  # seeded
    assert random_shift(x, 0, torch.Generator()) is x
    flat = torch.ones(4, 10)
    assert random_shift(flat, 2, torch.Generator()) is flat  # not an image batch


def test_epochs_schedule_gives_each_round_its_epochs_and_repeats_the_last():
    step = StepConfig(epochs=5, epochs_schedule=(10, 3))
    assert [step.epochs_in(r) for r in (1, 2, 3, 4)] == [10, 3, 3, 3]
    assert step.epochs_through(3) == 16
    assert step.for_round(1).epochs == 10 and step.for_round(1).epochs_schedule == ()
    plain = StepConfig(epochs=5)
    assert [plain.epochs_in(r) for r in (1, 2)] == [5, 5] and plain.epochs_through(2) == 10
