"""A node's cohort of clients: the per-client reference implementation of the learner
interface (`fedkd.learner.protocol.Learner`), one client after another.

The algorithms' client sides (`strategies`) call it through the ClientApp; it knows nothing of
Flower and nothing of any algorithm. Client state comes in
and goes out as bytes (the app keeps them in the node's context between rounds), results are
numpy arrays and float metrics, and every client's computation depends only on its own id,
the round and the run seed, so one client per node and cohorts give the same numbers.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field

import numpy as np
import torch

from fedkd.data.splits import FederatedData
from fedkd.knowledge.teachers import per_class_mean_logits
from fedkd.learner.loop import (
    PHASE_DISTILL,
    PHASE_HISTOGRAM,
    PHASE_INIT,
    PHASE_PARTNER,
    PHASE_TRAIN,
    ClassRegulariser,
    ClientState,
    GroupRegulariser,
    PrivateAnchor,
    StepConfig,
    accuracy,
    derive_seed,
    distill,
    init_student,
    make_optimizer,
    predict_embeddings,
    predict_logits,
    seeded_generator,
    train_mutual,
    train_supervised,
)
from fedkd.learner.state_codec import decode_teachers, encode_teachers
from fedkd.privacy.dpsgd import DpSgdSettings, train_dpsgd
from fedkd.privacy.label_histogram import LabelHistogramRelease
from fedkd.privacy.ledger import DpSgdEvent
from fedkd.privacy.noise import noise_source
from fedkd.privacy.teacher_shards import teacher_shards

# Digest metric: distillation made the client's student non-finite, and the digest was undone.
DIGEST_DIVERGED = "digest_diverged"
# Training metric: private training made the client's student non-finite, and the round's
# training was undone (the server ignores that reply; the client trains again next round).
TRAIN_DIVERGED = "train_diverged"
# Result keys (arrays and metrics) whose values the client's student computes, besides its
# weights and its algorithm's uploads (`strategies.params.Capabilities.uploads`): private only
# as far as the student is (DP-SGD makes them post-processing).
STUDENT_OUTPUTS = (
    "test_logits",
    "test_acc",
    "distill_loss",
    DIGEST_DIVERGED,
    TRAIN_DIVERGED,
)


@dataclass(frozen=True)
class CohortConfig:
    """Everything a node needs to know about how its clients learn (built from the spec)."""

    seed: int
    arch_of: Callable[[int], str]
    private: StepConfig
    distill: StepConfig
    distill_loss: str = "kl"
    distill_temperature: float = 1.0
    # > 0: each distillation batch adds this times cross-entropy on as many of the client's
    # private examples (`fedkd.learner.loop.PrivateAnchor`); never with `dp` (outside DP-SGD).
    distill_private_weight: float = 0.0
    # DP-SGD for private training (None: plain SGD); distillation is never charged.
    dp: DpSgdSettings | None = None
    # Class-weighted teacher: noise std of the label histogram each client sends with its
    # logits (None: no histogram; 0: exact counts, only when nothing is private).
    label_histogram_noise: float | None = None
    # Where the privacy mechanisms' noise comes from: "seeded" or "secure" (fedkd.privacy.noise).
    noise_rng: str = "seeded"


def dp_step_metrics(event: DpSgdEvent, steps_total: int) -> dict[str, float]:
    """A DP-SGD round as the client reports it: the round's event, and its steps over the run
    (the server charges any steps its ledger lacks, e.g. of a reply that came too late)."""
    return {
        "dp_sample_rate": event.sample_rate,
        "dp_noise_multiplier": event.noise_multiplier,
        "dp_steps": float(event.steps),
        "dp_steps_total": float(steps_total),
    }


# Most bytes of saved client states a `CohortLearner` keeps live for its next loads of them
# (the states past it are decoded again when loaded: the same values). Holds a node of ten
# `cnn_large` clients (about 5 MB each with momentum).
SAVED_STATES_BYTES = 64 * 2**20


# Metrics computed on a client's private examples with no mechanism behind them: its training
# loss and its accuracy on its private held-out slice. Where a run claims privacy they never
# travel as metrics (see `ClientResult.oracle` and docs/what-leaves-a-client.md).
PRIVATE_STATISTICS = ("train_loss", "local_acc", "val_acc")


def is_private_statistic(key: str) -> bool:
    """Whether a client metric is one of the `PRIVATE_STATISTICS`, or an algorithm's own
    measure of one (its name ends in ``_<statistic>``, e.g. ``client_proto_val_acc``)."""
    return key in PRIVATE_STATISTICS or key.endswith(tuple(f"_{s}" for s in PRIVATE_STATISTICS))


@dataclass
class ClientResult:
    """One client's reply in one phase.

    ``oracle`` holds what a simulation measures beside the protocol (the `PRIVATE_STATISTICS`
    of a run that claims privacy): a deployed node never sends it.
    """

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    oracle: dict[str, float] = field(default_factory=dict)

    def private_statistics_apart(self, keep: bool) -> ClientResult:
        """This result with its `PRIVATE_STATISTICS` out of ``metrics``: into ``oracle`` if
        `keep` (a simulation's oracle channel), else dropped."""
        metrics = {k: v for k, v in self.metrics.items() if not is_private_statistic(k)}
        moved = {k: v for k, v in self.metrics.items() if is_private_statistic(k)}
        oracle = {**self.oracle, **moved} if keep else {}
        return ClientResult(self.arrays, metrics, oracle)


def _finite_weights(model: torch.nn.Module) -> bool:
    """Whether every weight of `model` is finite (a student that diverged is not)."""
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


class CohortLearner:
    """The learner interface for the clients one node hosts, one client after another.

    Parameters
    ----------
    data : FederatedData
        The run's data; each client only touches its own slice and the public proxy/test sets.
    config : CohortConfig
        Learning configuration shared by all clients of the run.
    states : MutableMapping[int, bytes]
        Where client states persist between phases and rounds (node state in Flower).
    released : MutableMapping[int, bytes], optional
        Where each client keeps what it released once and resends (its noisy label
        histogram), persisting like `states`; default: a dict of this learner's own.
    kept : MutableMapping[int, bytes], optional
        Where each client keeps what its algorithm's client side carries from one phase to a
        later one (`keep`, `kept`), persisting like `states`; default: a dict of its own.
    partners : MutableMapping[int, bytes], optional
        Where each client's partner model persists (`partner`, `train_mutual`), like
        `states`; default: a dict of its own.
    """

    def __init__(
        self,
        data: FederatedData,
        config: CohortConfig,
        states: MutableMapping[int, bytes],
        released: MutableMapping[int, bytes] | None = None,
        kept: MutableMapping[int, bytes] | None = None,
        partners: MutableMapping[int, bytes] | None = None,
    ) -> None:
        self.data = data
        self.config = config
        self.states = states
        self.released = {} if released is None else released
        self.kept_arrays = {} if kept is None else kept
        self.partners = {} if partners is None else partners
        # Where a client's model draws its initial weights (`PHASE_PARTNER` in `partner`).
        self.init_phase = PHASE_INIT
        # The state each client last saved through this learner, with its bytes (at most
        # `SAVED_STATES_BYTES` of bytes): a later load of the client whose stored bytes are
        # still those reuses it instead of building and decoding a new one (FedAvg loads each
        # client three times per round: set_weights, train, get_weights).
        self._saved: dict[int, tuple[bytes, ClientState]] = {}
        self._saved_bytes = 0

    # -- state ---------------------------------------------------------------------------------
    def _load(self, client_id: int, read_only: bool = False) -> ClientState:
        """The client's state from its stored bytes (a fresh one without). `read_only`: the
        caller only computes outputs or copies weights, so a state kept by `_save` stays
        kept; otherwise it is handed over, and a caller that changes it without saving it (a
        diverged digest) leaves the stored bytes, which the next load decodes."""
        blob = self.states.get(client_id)
        saved = self._saved.get(client_id)
        if saved is not None:
            if not read_only or blob is None or saved[0] != blob:
                del self._saved[client_id]
                self._saved_bytes -= len(saved[0])
            if blob is not None and saved[0] == blob:
                saved[1].model.train()  # as a model built anew
                return saved[1]
        cfg = self.config
        state = ClientState.create(
            client_id,
            cfg.arch_of(client_id),
            self.data.input_shape,
            self.data.num_classes,
            cfg.seed,
            cfg.private.optim,
            cfg.distill.optim,
            self.init_phase,
            dp_sgd=cfg.dp is not None,
        )
        if blob is not None:
            state.load_bytes(blob)
        return state

    def _save(self, state: ClientState) -> None:
        blob = state.to_bytes()
        self.states[state.client_id] = blob
        # Kept as a load would rebuild it from `blob`: no gradients, in training mode.
        state.model.zero_grad(set_to_none=True)
        state.model.train()
        old = self._saved.pop(state.client_id, None)
        if old is not None:
            self._saved_bytes -= len(old[0])
        # Full: the new state is not kept (dropping the oldest instead would miss every load
        # of a cohort larger than the budget, which loads its clients in the order it saved
        # them; this way the first ones are still found).
        if self._saved_bytes + len(blob) <= SAVED_STATES_BYTES:
            self._saved[state.client_id] = (blob, state)
            self._saved_bytes += len(blob)

    # -- the learner interface (`fedkd.learner.protocol.Learner`) ------------------------------
    def train_private(
        self,
        round_num: int,
        client_ids: list[int],
        regulariser: ClassRegulariser | None = None,
    ) -> dict[int, ClientResult]:
        """Train each client on its private data (see `fedkd.learner.protocol.Learner`)."""
        if regulariser is not None:
            regulariser = regulariser.with_temperature(self.config.distill_temperature)
        results = {}
        for cid in client_ids:
            state = self._load(cid)
            client = self.data.clients[cid]
            gen = seeded_generator(self.config.seed, round_num, cid, PHASE_TRAIN)
            private = self.config.private.for_round(round_num)
            result = ClientResult(metrics={"num_examples": float(client.num_examples)})
            if self.config.dp is None:
                stats = train_supervised(
                    state.model,
                    state.private_opt,
                    client.x_train,
                    client.y_train,
                    private,
                    gen,
                    regulariser,
                )
            else:
                if regulariser is not None:
                    raise ValueError("a class regulariser does not run under DP-SGD")
                stats, event = train_dpsgd(
                    state.model,
                    state.private_opt,
                    client.x_train,
                    client.y_train,
                    epochs=private.epochs,
                    batch_size=private.batch_size,
                    settings=self.config.dp,
                    generator=noise_source(self.config.noise_rng, lambda g=gen: g),
                    round_num=round_num,
                )
                state.dp_steps += event.steps
                result.metrics.update(dp_step_metrics(event, state.dp_steps))
            if not _finite_weights(state.model):
                self._undo_training(cid, state.dp_steps)
                result.metrics[TRAIN_DIVERGED] = 1.0
                results[cid] = result
                continue
            state.rounds_trained += 1
            result.metrics["train_loss"] = stats["loss"]
            self._save(state)
            results[cid] = result
        return results

    def _undo_training(self, cid: int, dp_steps: int) -> None:
        """Leave the client's stored state from before a round whose private training made its
        student non-finite (a NaN student would fail every round from then on), with
        `dp_steps`, the DP-SGD steps counted so far: the undone round's steps were taken and
        are charged. The caller has loaded the state without saving it."""
        if self.config.dp is None:
            return  # the stored bytes are already those from before the round
        state = self._load(cid)
        state.dp_steps = dp_steps
        self._save(state)

    def partner(self) -> CohortLearner:
        """This learner on each client's partner model, a second model of the client's
        architecture kept in `partners` (see `fedkd.learner.protocol.Learner`)."""
        view = copy.copy(self)
        view.states, view.init_phase = self.partners, PHASE_PARTNER
        view._saved, view._saved_bytes = {}, 0  # other states, other bytes
        return view

    def train_mutual(
        self, round_num: int, client_ids: list[int], weight: float, partner_weight: float
    ) -> dict[int, ClientResult]:
        """Train each client's student and its partner model together on its private data
        (see `fedkd.learner.protocol.Learner`); on the loop in both learners."""
        if self.config.dp is not None:
            raise ValueError("mutual learning does not run under DP-SGD")
        partner = self.partner()
        results = {}
        for cid in client_ids:
            state, other = self._load(cid), partner._load(cid)
            client = self.data.clients[cid]
            stats = train_mutual(
                (state.model, other.model),
                (state.private_opt, other.private_opt),
                client.x_train,
                client.y_train,
                self.config.private.for_round(round_num),
                seeded_generator(self.config.seed, round_num, cid, PHASE_TRAIN),
                (weight, partner_weight),
            )
            metrics = {"num_examples": float(client.num_examples)}
            if not (_finite_weights(state.model) and _finite_weights(other.model)):
                # Both undone, unsaved (no DP-SGD here): they trained together.
                results[cid] = ClientResult(metrics={**metrics, TRAIN_DIVERGED: 1.0})
                continue
            state.rounds_trained += 1
            other.rounds_trained += 1
            self._save(state)
            partner._save(other)
            results[cid] = ClientResult(metrics={**metrics, "train_loss": stats["loss"]})
        return results

    def logits(self, client_ids: list[int], inputs: np.ndarray) -> dict[int, np.ndarray]:
        """Each client's logits on `inputs` (see `fedkd.learner.protocol.Learner`)."""
        return {
            cid: predict_logits(self._load(cid, read_only=True).model, inputs)
            .numpy()
            .astype(np.float32)
            for cid in client_ids
        }

    def embeddings(self, client_ids: list[int], inputs: np.ndarray) -> dict[int, np.ndarray]:
        """Each client's embeddings on `inputs` (see `fedkd.learner.protocol.Learner`)."""
        return {
            cid: predict_embeddings(self._load(cid, read_only=True).model, inputs)
            .numpy()
            .astype(np.float32)
            for cid in client_ids
        }

    def class_statistics(
        self, client_ids: list[int], space: str
    ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Per-class means on private data (see `fedkd.learner.protocol.Learner`)."""
        predict = _PREDICTORS[space]
        return {
            cid: self._per_class_mean(
                cid, predict(self._load(cid, read_only=True).model, self.data.clients[cid].x_train)
            )
            for cid in client_ids
        }

    def _per_class_mean(self, cid: int, outputs: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        means, counts = per_class_mean_logits(
            outputs, torch.from_numpy(self.data.clients[cid].y_train), self.data.num_classes
        )
        return means.numpy().astype(np.float32), counts.numpy().astype(np.float32)

    def get_weights(self, client_ids: list[int]) -> dict[int, dict[str, np.ndarray]]:
        """Each client's student weights (see `fedkd.learner.protocol.Learner`)."""
        return {cid: _weights_of(self._load(cid, read_only=True).model) for cid in client_ids}

    def set_weights(
        self,
        client_ids: list[int],
        weights: dict[str, np.ndarray],
        *,
        keep_optimizer: bool = False,
    ) -> None:
        """Load `weights` into every client's student with a fresh private optimizer, or the
        one it has (see `fedkd.learner.protocol.Learner`)."""
        for cid in client_ids:
            state = self._load(cid)
            state.model.load_state_dict(
                {k: torch.from_numpy(np.array(v)) for k, v in weights.items()}
            )
            if not keep_optimizer:
                state.private_opt = make_optimizer(
                    state.model.parameters(),
                    self.config.private.optim,
                    torch_optimizer=self.config.dp is not None,  # Opacus wraps it
                )
            self._save(state)

    def keep(self, client_id: int, arrays: dict[str, np.ndarray]) -> None:
        """Keep `arrays` in the client's own state, in place of what it kept before (see
        `fedkd.learner.protocol.Learner`)."""
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        self.kept_arrays[client_id] = buffer.getvalue()

    def kept(self, client_id: int) -> dict[str, np.ndarray]:
        """What the client last kept with `keep` ({} if nothing)."""
        blob = self.kept_arrays.get(client_id)
        if blob is None:
            return {}
        with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}

    def label_histogram(self, client_id: int) -> dict[str, np.ndarray]:
        """``{"label_histogram": counts}`` when the teacher needs it, else ``{}``; drawn once
        per client (not per round) and kept: every round resends the same release."""
        noise = self.config.label_histogram_noise
        if noise is None:
            return {}
        kept = self.released.get(client_id)
        if kept is not None:
            return {"label_histogram": np.frombuffer(kept, dtype=np.float32).copy()}
        cfg = self.config
        seeded = lambda: seeded_generator(cfg.seed, client_id, PHASE_HISTOGRAM)  # noqa: E731
        counts = LabelHistogramRelease(noise).release(
            self.data.clients[client_id].y_train,
            self.data.num_classes,
            noise_source(cfg.noise_rng, seeded),
        )
        self.released[client_id] = counts.tobytes()
        return {"label_histogram": counts}

    def shard_teacher_votes(
        self, round_num: int, client_ids: list[int], num_teachers: int, inputs: np.ndarray
    ) -> dict[int, ClientResult]:
        """Teachers on disjoint shards, their votes on `inputs` (see
        `fedkd.learner.protocol.Learner`); on the loop in both learners. The teachers are the
        client's state (in place of its student)."""
        return {
            cid: self._teacher_votes(round_num, cid, num_teachers, inputs) for cid in client_ids
        }

    def _teacher_votes(
        self, round_num: int, cid: int, num_teachers: int, x_proxy: np.ndarray
    ) -> ClientResult:
        cfg, client = self.config, self.data.clients[cid]
        teachers = [
            init_student(
                cfg.arch_of(cid),
                self.data.input_shape,
                self.data.num_classes,
                cfg.seed,
                cid,
                PHASE_INIT,
                t,
            )
            for t in range(num_teachers)
        ]
        opts = [make_optimizer(m.parameters(), cfg.private.optim) for m in teachers]
        blob = self.states.get(cid)
        if blob is not None:
            for model, opt, sd in zip(teachers, opts, decode_teachers(blob), strict=True):
                model.load_state_dict(sd["model"])
                opt.load_state_dict(sd["opt"])
        # Each example's teacher is a function of the example alone: adding or removing one
        # changes one teacher's data, the relation PATE's accounting charges for.
        shards = teacher_shards(
            client.x_train,
            client.y_train,
            num_teachers,
            derive_seed(cfg.seed, cid, PHASE_INIT, -1),
        )
        votes = np.zeros((len(x_proxy), self.data.num_classes), dtype=np.float32)
        private = cfg.private.for_round(round_num)
        losses = []
        for t, (model, opt, shard) in enumerate(zip(teachers, opts, shards, strict=True)):
            if len(shard):  # a teacher with no examples votes as initialised
                gen = seeded_generator(cfg.seed, round_num, cid, PHASE_TRAIN, t)
                stats = train_supervised(
                    model, opt, client.x_train[shard], client.y_train[shard], private, gen
                )
                losses.append(stats["loss"])
            preds = predict_logits(model, x_proxy).argmax(dim=1).numpy()
            votes[np.arange(len(preds)), preds] += 1
        self.states[cid] = encode_teachers(
            [
                {"model": m.state_dict(), "opt": o.state_dict()}
                for m, o in zip(teachers, opts, strict=True)
            ]
        )
        return ClientResult(
            arrays={"votes": votes},
            metrics={
                "num_examples": float(client.num_examples),
                "train_loss": float(np.mean(losses)),
            },
        )

    def distill(
        self,
        round_num: int,
        client_ids: list[int],
        inputs: np.ndarray,
        targets: np.ndarray,
        regulariser: GroupRegulariser | None = None,
    ) -> dict[int, ClientResult]:
        """Distill towards the target logits on `inputs` (see `fedkd.learner.protocol.Learner`)."""
        results = {}
        for cid in client_ids:
            state = self._load(cid)
            gen = seeded_generator(self.config.seed, round_num, cid, PHASE_DISTILL)
            stats = distill(
                state.model,
                state.distill_opt,
                inputs,
                targets,
                self.config.distill,
                gen,
                self.config.distill_loss,
                self.config.distill_temperature,
                regulariser=regulariser,
                anchor=self._private_anchor(round_num, cid),
            )
            metrics = {"distill_loss": stats["loss"]}
            if not _finite_weights(state.model):
                # Kept unsaved: the stored student (and optimizers) from before the digest
                # stay, instead of a NaN student that would fail every round from now on.
                results[cid] = ClientResult(metrics={**metrics, DIGEST_DIVERGED: 1.0})
                continue
            self._save(state)
            results[cid] = ClientResult(metrics=metrics)
        return results

    def _private_anchor(self, round_num: int, cid: int) -> PrivateAnchor | None:
        """The client's private anchor of its digest (`CohortConfig.distill_private_weight`;
        None where the weight is 0 or the client holds no training examples)."""
        client, cfg = self.data.clients[cid], self.config
        anchor = PrivateAnchor.seeded(
            client.x_train, client.y_train, cfg.distill_private_weight, cfg.seed, round_num, cid
        )
        if anchor is not None and cfg.dp is not None:
            raise ValueError("the private anchor of distillation does not run under DP-SGD")
        return anchor

    def evaluate(self, client_ids: list[int], test_idx: np.ndarray) -> dict[int, ClientResult]:
        """Accuracy on the global test subset, the local held-out slice and the validation
        slice (NaN where a slice is empty), plus test logits."""
        results = {}
        for cid in client_ids:
            state = self._load(cid, read_only=True)
            client = self.data.clients[cid]
            test_logits = predict_logits(state.model, self.data.test_x[test_idx])
            local_logits = predict_logits(state.model, client.x_local_test)
            val_logits = predict_logits(state.model, client.x_val)
            results[cid] = ClientResult(
                arrays={"test_logits": test_logits.numpy().astype(np.float32)},
                metrics={
                    "test_acc": accuracy(test_logits, self.data.test_y[test_idx]),
                    "local_acc": accuracy(local_logits, client.y_local_test),
                    "val_acc": accuracy(val_logits, client.y_val),
                },
            )
        return results

    def export(self, client_ids: list[int]) -> dict[int, ClientResult]:
        """Each client's current student weights (for the privacy audit at the end of a run)."""
        results = {}
        for cid in client_ids:
            state = self._load(cid, read_only=True)
            results[cid] = ClientResult(
                arrays=_weights_of(state.model),
                metrics={"rounds_trained": float(state.rounds_trained)},
            )
        return results


def _weights_of(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


# What `CohortLearner.class_statistics` averages, by space.
_PREDICTORS = {"logits": predict_logits, "embeddings": predict_embeddings}
