"""The per-client reference learner: plain PyTorch loops, one model at a time.

Every randomness (init, shuffling) comes from generators seeded by (run seed, round, client id,
phase), never from global state, so a client computes the same thing whichever process, node
or cohort runs it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor, nn

from fedkd.knowledge.losses import distillation_loss, kl_distillation_loss, soft_targets
from fedkd.learner.batch_plans import batch_rows, shuffled_batches
from fedkd.learner.functional_optim import ParamSGD
from fedkd.learner.state_codec import SavedClientState, decode_client_state, encode_client_state
from fedkd.models.zoo import build_model

# Phase codes mixed into seeds so that each phase draws its own stream.
PHASE_INIT, PHASE_TRAIN, PHASE_DISTILL, PHASE_SERVER, PHASE_SAMPLE, PHASE_EVAL = range(6)
PHASE_HISTOGRAM = 6
# A client's partner model (`CohortLearner.partner`) draws its initial weights from its own
# stream, so that it does not start as a copy of the client's student.
PHASE_PARTNER = 7
# The private anchor's minibatches during distillation (`PrivateAnchor`): a stream of its own,
# so that the distillation's batches are the same with and without it (8 and 9 are the faults'
# and the data-free generator's phases).
PHASE_ANCHOR = 10


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (stable across processes and platforms).

    Negative keys (the server's models use ids -1, -2, -3) map to values no client id reaches.
    Each stream's keys must differ from every other stream's, position by position: a client's
    keys are ``(seed, round, client id, phase, ...)`` (its initial weights ``(seed, client id,
    phase)``), so a server-side stream takes a negative owner id in the client id's place rather
    than its phase there, and keys of at most 4 entries that differ only by trailing zeros give
    the same seed (``SeedSequence`` pads its entropy with zeros). ``tests/test_seed_streams.py``
    checks that no two call sites of a run share a seed.
    """
    entropy = [int(k) if k >= 0 else (1 << 40) - int(k) for k in keys]
    return int(np.random.SeedSequence(entropy).generate_state(2, np.uint64)[0] >> 1)


def seeded_generator(*keys: int) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(derive_seed(*keys))
    return gen


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0


@dataclass(frozen=True)
class StepConfig:
    """How one phase trains: epochs and batch size over its data, with which optimizer."""

    epochs: int = 1
    batch_size: int = 32
    optim: OptimConfig = OptimConfig()
    # "constant", or "cosine": each fit anneals the learning rate from optim.lr to 0 over its
    # steps (the next fit starts again from optim.lr).
    lr_schedule: str = "constant"
    # Epochs of rounds 1, 2, ... (the last value repeats); empty = `epochs` every round.
    epochs_schedule: tuple[int, ...] = ()

    def epochs_in(self, round_num: int) -> int:
        """Epochs of round `round_num` (1-based)."""
        if not self.epochs_schedule:
            return self.epochs
        return self.epochs_schedule[min(max(round_num, 1), len(self.epochs_schedule)) - 1]

    def epochs_through(self, rounds: int) -> int:
        """Epochs of rounds 1 to `rounds` together (what DP-SGD calibrates its noise for)."""
        return sum(self.epochs_in(r) for r in range(1, rounds + 1))

    def for_round(self, round_num: int) -> StepConfig:
        """This step with round `round_num`'s epochs."""
        return replace(self, epochs=self.epochs_in(round_num), epochs_schedule=())


# What the loop learner steps with: torch's optimizers, or fedkd's own SGD (`make_optimizer`).
LoopOptimizer = torch.optim.Optimizer | ParamSGD


def make_optimizer(
    params: Iterable[Tensor], cfg: OptimConfig, *, torch_optimizer: bool = False
) -> LoopOptimizer:
    """The optimizer `cfg` names, over `params`.

    SGD is `fedkd.learner.functional_optim.ParamSGD` (torch's update, bit for bit, without
    the ``torch._dynamo`` import that every ``torch.optim`` optimizer costs a process) where it
    is exact: on parameters all on the CPU (torch steps others with its multi-tensor kernels,
    which may round differently), unless `torch_optimizer`. Adam is ``torch.optim.Adam``.

    Parameters
    ----------
    params : iterable of Tensor
        The parameters to optimise.
    cfg : OptimConfig
        Which optimizer, and its settings.
    torch_optimizer : bool, default False
        A ``torch.optim.Optimizer`` whatever `cfg` says: for a caller that hands it to what
        insists on one (Opacus's DP-SGD, a learning-rate schedule of `fit_batches`).

    Returns
    -------
    torch.optim.Optimizer or ParamSGD
        A fresh optimizer (no state).
    """
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    params = list(params)
    if not torch_optimizer and all(p.device.type == "cpu" for p in params):
        return ParamSGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def init_student(
    arch: str, input_shape: tuple[int, ...], num_classes: int, *seed_keys: int
) -> nn.Module:
    """Build `arch` with weights drawn from a generator seeded by `seed_keys`."""
    # build_model draws from the global CPU RNG; fork it so callers' RNG state is untouched.
    # Only the CPU generator is seeded (the model is built on the CPU): torch.manual_seed
    # would also queue a seeding of every accelerator torch knows (CUDA, XPU, MTIA), each with
    # a formatted stack trace, on every call in a process where none is initialised.
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(derive_seed(*seed_keys))
        return build_model(arch, input_shape, num_classes)


@dataclass
class ClientState:
    """A client's student and both optimizers; lives across rounds as bytes in node state."""

    client_id: int
    arch: str
    model: nn.Module
    private_opt: LoopOptimizer
    distill_opt: LoopOptimizer
    rounds_trained: int = 0
    # DP-SGD steps taken over the run: the server charges any its ledger lacks (a late reply).
    dp_steps: int = 0

    @classmethod
    def create(
        cls,
        client_id: int,
        arch: str,
        input_shape: tuple[int, ...],
        num_classes: int,
        seed: int,
        private: OptimConfig,
        distill: OptimConfig,
        init_phase: int = PHASE_INIT,
        dp_sgd: bool = False,
    ) -> ClientState:
        """A client that never trained: its initial student and fresh optimizers.

        `dp_sgd`: the client trains privately with Opacus's DP-SGD, which wraps its private
        optimizer and needs a ``torch.optim`` one (`make_optimizer`'s `torch_optimizer`).
        """
        model = init_student(arch, input_shape, num_classes, seed, client_id, init_phase)
        return cls(
            client_id,
            arch,
            model,
            make_optimizer(model.parameters(), private, torch_optimizer=dp_sgd),
            make_optimizer(model.parameters(), distill),
        )

    def to_bytes(self) -> bytes:
        """The client's state in the one client-state format (`fedkd.learner.state_codec`)."""
        return encode_client_state(
            SavedClientState(
                client_id=self.client_id,
                arch=self.arch,
                model=self.model.state_dict(),
                private_opt=self.private_opt.state_dict(),
                distill_opt=self.distill_opt.state_dict(),
                rounds_trained=self.rounds_trained,
                dp_steps=self.dp_steps,
            )
        )

    def load_bytes(self, blob: bytes) -> None:
        """Load a state written by `to_bytes` (or by the vectorised learner) into this one."""
        saved = decode_client_state(blob)
        if saved.arch != self.arch:
            raise ValueError(
                f"client {self.client_id}: saved student is '{saved.arch}', spec says '{self.arch}'"
            )
        self.model.load_state_dict(saved.model)
        self.private_opt.load_state_dict(saved.private_opt)
        self.distill_opt.load_state_dict(saved.distill_opt)
        self.rounds_trained = saved.rounds_trained
        self.dp_steps = saved.dp_steps


def as_tensor(array: np.ndarray | Tensor) -> Tensor:
    return array if isinstance(array, Tensor) else torch.from_numpy(np.ascontiguousarray(array))


# Where a `ClassRegulariser` pulls an example: its logits (FD) or its embedding (FedProto).
REGULARISER_SPACES = ("logits", "embeddings")


def _check_space(owner: str, space: str) -> None:
    if space not in REGULARISER_SPACES:
        raise ValueError(f"{owner}.space: '{space}' is not one of {', '.join(REGULARISER_SPACES)}")


@dataclass(frozen=True)
class ClassRegulariser:
    """A per-class target regulariser of private training.

    Each training example of a class `c` with ``present[c]`` is pulled towards ``targets[c]``;
    the penalty, averaged over the batch's examples of present classes, is added to the
    cross-entropy with factor `weight`.

    Parameters
    ----------
    targets : Tensor
        ``(C, D)``: row c is class c's target (``D`` = C logits, or the embedding width).
    present : Tensor
        ``(C,)`` bool: classes that have a target.
    weight : float, default 1.0
        Factor of the penalty in the loss.
    space : {"logits", "embeddings"}, default "logits"
        ``"logits"``: KL from ``softmax(targets[c] / T)`` to the student's softmax at
        temperature T, times T^2 (bounded, unlike cross-entropy on raw averaged logits, which
        diverges). ``"embeddings"``: mean squared distance of the student's embedding
        (`fedkd.models.zoo.EmbeddingOutput`) to ``targets[c]``.
    temperature : float or None, default None
        T of ``"logits"``; None: the learner's distillation temperature.
    normalise : bool, default False
        Divide the loss (cross-entropy plus `weight` times the penalty) by ``1 + weight``: a
        convex mix of the two terms whose gradient keeps the scale of cross-entropy alone
        (where the targets agree with the labels, an added penalty would scale the step up).
    """

    targets: Tensor
    present: Tensor
    weight: float = 1.0
    space: str = "logits"
    temperature: float | None = None
    normalise: bool = False

    def __post_init__(self) -> None:
        _check_space("ClassRegulariser", self.space)

    def with_temperature(self, default: float) -> ClassRegulariser:
        """This regulariser with its temperature set (`default` where it names none)."""
        if self.temperature is not None:
            return self
        return replace(self, temperature=default)


@dataclass(frozen=True)
class GroupRegulariser:
    """An extra term of distillation on groups of inputs (the relations between them, say).

    Distillation takes its inputs in groups of `group_size` consecutive rows (their number a
    multiple of it): every minibatch holds whole groups, ``batch_size // group_size`` of them
    (at least one), in an order drawn per client. The batch's loss adds
    ``loss(outputs, targets)``, with the student's outputs on the batch in `space` shaped
    ``(G, group_size, D)`` and the batch's rows of `targets` shaped ``(G, group_size, W)``.

    Parameters
    ----------
    group_size : int
        Rows per group.
    targets : Tensor
        ``(N, W)``: what row i of the inputs brings to its group's loss.
    loss : callable
        ``(outputs, targets) -> scalar``, a pure tensor function (the vectorised learner runs
        it under ``torch.func.vmap``); it carries its own weights.
    space : {"logits", "embeddings"}, default "embeddings"
        The student's outputs it sees: logits, or its embedding
        (`fedkd.models.zoo.EmbeddingOutput`).
    """

    group_size: int
    targets: Tensor
    loss: Callable[[Tensor, Tensor], Tensor]
    space: str = "embeddings"

    def __post_init__(self) -> None:
        _check_space("GroupRegulariser", self.space)
        if self.group_size < 1 or self.targets.dim() != 2:
            raise ValueError("GroupRegulariser: group_size >= 1 and (N, W) targets")

    def penalty(self, logits: Tensor, embeddings: Tensor | None, targets: Tensor) -> Tensor:
        """The term of one batch: its logits ``(B, C)``, embeddings ``(B, D)`` (None where
        `space` is ``"logits"``) and rows of `targets` ``(B, W)``, B a multiple of
        `group_size`."""
        outputs = embeddings if self.space == "embeddings" else logits
        g = self.group_size
        return self.loss(
            outputs.reshape(-1, g, outputs.shape[-1]), targets.reshape(-1, g, targets.shape[-1])
        )


def fit_batches(
    model: nn.Module | Sequence[nn.Module],
    opt: LoopOptimizer | Sequence[LoopOptimizer],
    n: int,
    step: StepConfig,
    gen: torch.Generator,
    batch_loss: Callable[[Tensor], Tensor],
    group_size: int = 1,
) -> dict[str, float]:
    """`step.epochs` passes over n examples in seeded minibatches (of whole groups of
    `group_size` consecutive rows: `fedkd.learner.batch_plans.shuffled_batches`); `batch_loss(idx)`
    gives the loss of one batch. Returns the example-weighted mean loss and the number of steps.

    Several models (a sequence, each with its optimizer in `opt`) train on the same batches:
    `batch_loss` then gives each model's loss ``(len(model),)``, each a function of its own
    model's weights alone (the others' outputs detached); the first one is reported.

    A ``"cosine"`` learning-rate schedule runs torch's ``CosineAnnealingLR``, which needs
    ``torch.optim`` optimizers (`make_optimizer`'s `torch_optimizer`).
    """
    models = [model] if isinstance(model, nn.Module) else list(model)
    opts = list(opt) if isinstance(opt, Sequence) else [opt]
    for m in models:
        m.train()
    total, steps, seen = 0.0, 0, 0
    schedulers = []
    if step.lr_schedule == "cosine":
        if not all(isinstance(o, torch.optim.Optimizer) for o in opts):
            raise TypeError(
                "a cosine lr_schedule needs torch.optim optimizers: "
                "make_optimizer(..., torch_optimizer=True)"
            )
        planned = step.epochs * -(-n // batch_rows(step.batch_size, group_size))
        for o in opts:
            for group in o.param_groups:  # the last fit left it near 0: start again from lr
                group["lr"] = step.optim.lr
            schedulers.append(torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=max(planned, 1)))
    for _ in range(step.epochs):
        for idx in shuffled_batches(n, step.batch_size, gen, group_size):
            loss = batch_loss(idx)
            for o in opts:
                o.zero_grad(set_to_none=True)
            (loss if loss.dim() == 0 else loss.sum()).backward()
            for o in opts:
                o.step()
            for scheduler in schedulers:
                scheduler.step()
            total += loss.reshape(-1)[0].item() * len(idx)
            seen += len(idx)
            steps += 1
    return {"loss": total / max(seen, 1), "steps": float(steps)}


def random_shift(x: Tensor, max_shift: int, gen: torch.Generator) -> Tensor:
    """Images ``(N, C, H, W)`` each translated by up to `max_shift` pixels per axis, zero fill.

    Other shapes (vectors, 1-D signals) are returned unchanged.
    """
    if max_shift <= 0 or x.dim() != 4:
        return x
    n, c, h, w = x.shape
    shifts = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=gen)
    padded = nn.functional.pad(x, (max_shift,) * 4)
    rows = torch.arange(h)[None, :] + max_shift - shifts[:, :1]  # (N, H)
    cols = torch.arange(w)[None, :] + max_shift - shifts[:, 1:]  # (N, W)
    return padded[
        torch.arange(n)[:, None, None, None],
        torch.arange(c)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


def train_supervised(
    model: nn.Module,
    opt: LoopOptimizer,
    x: np.ndarray | Tensor,
    y: np.ndarray | Tensor,
    step: StepConfig,
    gen: torch.Generator,
    regulariser: ClassRegulariser | None = None,
    augment_shift: int = 0,
) -> dict[str, float]:
    """Cross-entropy training on (x, y); an optional per-class regulariser (its temperature
    set) and random shifts of the inputs (`random_shift`). Returns mean loss and steps."""
    x, y = as_tensor(x), as_tensor(y)
    on_embeddings = regulariser is not None and regulariser.space == "embeddings"

    def batch_loss(idx: Tensor) -> Tensor:
        xb, yb = random_shift(x[idx], augment_shift, gen), y[idx]
        out, embedding = model(xb, embed=True) if on_embeddings else (model(xb), None)
        loss = nn.functional.cross_entropy(out, yb)
        if regulariser is not None:
            keep = regulariser.present[yb]
            if keep.any():
                targets = regulariser.targets[yb[keep]]
                if embedding is not None:
                    penalty = (embedding[keep] - targets).square().mean(dim=1).mean()
                else:
                    temperature = regulariser.temperature
                    penalty = kl_distillation_loss(
                        out[keep], soft_targets(targets, temperature), temperature
                    )
                loss = loss + regulariser.weight * penalty
            if regulariser.normalise:
                loss = loss / (1.0 + regulariser.weight)
        return loss

    return fit_batches(model, opt, len(y), step, gen, batch_loss)


def train_mutual(
    models: tuple[nn.Module, nn.Module],
    opts: tuple[LoopOptimizer, LoopOptimizer],
    x: np.ndarray | Tensor,
    y: np.ndarray | Tensor,
    step: StepConfig,
    gen: torch.Generator,
    weights: tuple[float, float],
) -> dict[str, float]:
    """Deep mutual learning of two models on (x, y) (Zhang et al., 2018): on each batch, the
    same for both, each model minimises cross-entropy plus its weight in `weights` times the KL
    divergence from the other's detached softmax (temperature 1) to its own. Returns the first
    model's mean loss and the steps."""
    x, y = as_tensor(x), as_tensor(y)

    def batch_loss(idx: Tensor) -> Tensor:
        xb, yb = x[idx], y[idx]
        outs = [model(xb) for model in models]
        return torch.stack(
            [
                nn.functional.cross_entropy(out, yb)
                + weight * kl_distillation_loss(out, soft_targets(other.detach()))
                for out, other, weight in zip(outs, outs[::-1], weights, strict=True)
            ]
        )

    return fit_batches(models, opts, len(y), step, gen, batch_loss)


@dataclass
class PrivateAnchor:
    """Cross-entropy on a client's own labelled private examples, joined to its distillation.

    Each distillation batch of B proxy inputs adds ``weight`` times the mean cross-entropy of
    the student on B private examples (no augmentation): the next B of a stream of seeded
    random permutations of the private set (drawn from `gen`, a new permutation whenever one
    runs out), so every private example is seen once before any is seen twice.

    Parameters
    ----------
    x, y : ndarray or Tensor
        The client's private training inputs and labels (at least one example).
    weight : float
        Factor of the cross-entropy in each batch's loss (> 0).
    gen : torch.Generator
        The stream of the permutations (`PHASE_ANCHOR`'s, not the distillation's).
    """

    x: np.ndarray | Tensor
    y: np.ndarray | Tensor
    weight: float
    gen: torch.Generator

    def __post_init__(self) -> None:
        self.x, self.y = as_tensor(self.x), as_tensor(self.y)
        if len(self.y) == 0 or not self.weight > 0:
            raise ValueError("PrivateAnchor: needs private examples and a weight > 0")
        self._order = torch.empty(0, dtype=torch.long)

    def next_indices(self, size: int) -> Tensor:
        """The next `size` positions of the permutation stream."""
        while len(self._order) < size:
            fresh = torch.randperm(len(self.y), generator=self.gen)
            self._order = torch.cat([self._order, fresh])
        taken, self._order = self._order[:size], self._order[size:]
        return taken

    def loss(self, model: nn.Module, size: int) -> Tensor:
        """`weight` times the model's cross-entropy on the next `size` private examples."""
        idx = self.next_indices(size)
        return self.weight * nn.functional.cross_entropy(model(self.x[idx]), self.y[idx])

    @classmethod
    def seeded(
        cls, x: np.ndarray, y: np.ndarray, weight: float, seed: int, round_num: int, key: int
    ) -> PrivateAnchor | None:
        """The anchor of client (or shadow) `key`'s digest in round `round_num`, on its stream
        of `PHASE_ANCHOR`; None where `weight` is 0 or there are no examples."""
        if weight <= 0 or len(y) == 0:
            return None
        return cls(x, y, weight, seeded_generator(seed, round_num, key, PHASE_ANCHOR))


def distill(
    model: nn.Module,
    opt: LoopOptimizer,
    x: np.ndarray | Tensor,
    teacher_logits: np.ndarray | Tensor,
    step: StepConfig,
    gen: torch.Generator,
    loss_kind: str = "kl",
    temperature: float = 1.0,
    augment_shift: int = 0,
    regulariser: GroupRegulariser | None = None,
    anchor: PrivateAnchor | None = None,
) -> dict[str, float]:
    """Fit the model's outputs on x (optionally randomly shifted) to the teacher's logits, plus
    a `GroupRegulariser`'s term on batches of whole groups where one is given, plus a
    `PrivateAnchor`'s cross-entropy on as many private examples as each batch has inputs."""
    x, teacher = as_tensor(x), as_tensor(teacher_logits).float()
    targets = None if regulariser is None else regulariser.targets.float()

    def batch_loss(idx: Tensor) -> Tensor:
        xb = random_shift(x[idx], augment_shift, gen)
        if regulariser is None:
            loss = distillation_loss(loss_kind, model(xb), teacher[idx], temperature)
        else:
            out, embedding = model(xb, embed=True)
            loss = distillation_loss(loss_kind, out, teacher[idx], temperature)
            loss = loss + regulariser.penalty(out, embedding, targets[idx])
        if anchor is not None:
            loss = loss + anchor.loss(model, len(idx))
        return loss

    group_size = 1 if regulariser is None else regulariser.group_size
    return fit_batches(model, opt, len(x), step, gen, batch_loss, group_size=group_size)


@torch.no_grad()
def predict_embeddings(model: nn.Module, x: np.ndarray | Tensor, batch_size: int = 1024) -> Tensor:
    """Embeddings (`fedkd.models.zoo.EmbeddingOutput`) in eval mode, without gradients."""
    x = as_tensor(x)
    model.eval()
    passes = [model(x[i : i + batch_size], embed=True)[1] for i in range(0, len(x), batch_size)]
    return torch.cat(passes) if passes else torch.empty(0)


@torch.no_grad()
def predict_logits(model: nn.Module, x: np.ndarray | Tensor, batch_size: int = 1024) -> Tensor:
    """Logits in eval mode, without gradients."""
    x = as_tensor(x)
    model.eval()
    if len(x) == 0:
        return torch.empty(0)
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def accuracy(logits: Tensor, y: np.ndarray | Tensor) -> float:
    y = as_tensor(y)
    if len(y) == 0:
        return float("nan")
    return float((logits.argmax(dim=1) == y).float().mean())
