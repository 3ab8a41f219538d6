"""The vectorised cohort learner: clients of one architecture train together with ``torch.func``.

`VectorisedCohortLearner` has the public methods and results of `CohortLearner` (the per-client
reference loop) and computes the same numbers up to float rounding, many clients per kernel:

- Clients of a node are grouped by architecture (``config.arch_of``); a group's weights are
  stacked along a leading client dimension and every step is one ``vmap(grad(...))`` over
  ``functional_call`` (on a CPU, for the zoo's CNNs: one forward and backward pass of the
  model written out for the stack, `fedkd.learner.stacked_cnn`), followed by a functional SGD
  or Adam update that reproduces
  ``torch.optim.SGD`` / ``torch.optim.Adam`` exactly (`fedkd.learner.functional_optim`).
- Each client sees exactly the minibatches the loop would show it: the same
  ``torch.randperm(n, generator=seeded_generator(seed, round, cid, phase))`` per epoch, split
  into ``batch_size`` chunks, the last one shorter. Clients of different sizes are aligned step
  by step: a short batch is padded with weight-0 rows and averaged over its true size. Clients
  are stacked largest first, so the clients that still have a batch at a step are the first
  ones of the stack and the step computes on them alone; a client that has run out of steps
  keeps its weights and optimizer state untouched (masked out, where the steppers are not the
  first ones of the stack; `fedkd.learner.batch_plans`).
- Logits (uploads, evaluation) on inputs that every client shares come, on a CPU, from
  `fedkd.learner.stacked_cnn`'s stacked forward pass for the models it covers and from one
  client at a time at the loop's batch size for the others (faster there than ``vmap``'s
  batched convolutions); on a GPU, from ``vmap`` over the stack. Logits on each client's own
  rows (evaluation, class statistics) come from one client at a time on a CPU.
- On a CPU, a stacked training step runs in passes of at most ``stack_rows`` client-rows
  (clients times batch rows), logits in passes of twice as many (they keep no activations for
  a backward pass): a stack's activations are K times a client's, and beyond the caches and
  what the allocator keeps for reuse each step maps fresh pages, so a few clients per pass are
  faster per row than the whole stack.
- Client states are read and written through `fedkd.learner.state_codec`, the format the loop's
  `ClientState` uses too (the model's ``state_dict`` and both optimizers' ``state_dict`` in
  torch's format), so the loop and the vectorised learner can take turns on the same clients
  between rounds.
- Data and model templates live on the learner's device, cached once per process
  (`fedkd.learner.device`).
- DP-SGD (a config with ``dp`` set) runs `fedkd.privacy.vectorised_dpsgd`: Opacus's math
  (Poisson sampling, per-example clipping, Gaussian noise, the expected batch size as divisor)
  with per-sample norms and clipped sums from the layers' activations and backprops
  (`fedkd.privacy.layer_grads`), the same sample rate, steps and calibrated noise
  multiplier per client as the Opacus path, hence the same ledger events. Its random draws
  (batches, noise) come from the client's own seeded generators, not Opacus's, so weights
  agree with the loop in distribution, not bit for bit.
- Teachers on shards of a client's data (`shard_teacher_votes`), mutual learning of a
  client's student with its partner model (`train_mutual`) and distillation with a private
  anchor (``config.distill_private_weight > 0``, `fedkd.learner.loop.PrivateAnchor`) train in
  the reference loop.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from fedkd.data.splits import FederatedData
from fedkd.knowledge.losses import distillation_loss, soft_targets
from fedkd.learner.batch_plans import BatchPlan, most_steps_first, plan_batches
from fedkd.learner.cohort import (
    DIGEST_DIVERGED,
    TRAIN_DIVERGED,
    ClientResult,
    CohortConfig,
    CohortLearner,
    dp_step_metrics,
)
from fedkd.learner.device import (
    PRECISIONS,
    DeviceData,
    device_data,
    model_template,
    precision_context,
    resolve_device,
)
from fedkd.learner.functional_optim import (
    Params,
    functional_optimizer,
    num_clients,
)
from fedkd.learner.loop import (
    PHASE_DISTILL,
    PHASE_TRAIN,
    REGULARISER_SPACES,
    ClassRegulariser,
    GroupRegulariser,
    OptimConfig,
    StepConfig,
    accuracy,
    derive_seed,
    init_student,
    make_optimizer,
    seeded_generator,
)
from fedkd.learner.stacked_cnn import OutputLoss, stacked_forward, stacked_grad_and_value
from fedkd.learner.stacked_cnn import supports as stacked_supports
from fedkd.learner.state_codec import SavedClientState, decode_client_state, encode_client_state
from fedkd.models.zoo import EMBEDDING_WIDTH
from fedkd.privacy.ledger import DpSgdEvent
from fedkd.privacy.noise import noise_source


# -- stacked client states ---------------------------------------------------------------------
@dataclass
class StackedStates:
    """K clients of one architecture: weights and both optimizers, stacked on the device."""

    client_ids: list[int]
    arch: str
    params: Params
    private_state: dict[str, Any]
    distill_state: dict[str, Any]
    rounds_trained: list[int]
    # Each client's DP-SGD steps over the run (`ClientState.dp_steps`).
    dp_steps: list[int]
    # The optimizers' param_groups as saved (or a fresh optimizer's), written back unchanged.
    private_groups: list[list[dict[str, Any]]]
    distill_groups: list[list[dict[str, Any]]]


# -- the learner -------------------------------------------------------------------------------
class VectorisedCohortLearner(CohortLearner):
    """`CohortLearner` with clients of one architecture trained together by ``torch.func``.

    Parameters
    ----------
    data : FederatedData
        The run's data; each client only touches its own slice and the public proxy/test sets.
    config : CohortConfig
        Learning configuration shared by all clients of the run.
    states : MutableMapping[int, bytes]
        Where client states persist between phases and rounds (node state in Flower); the same
        bytes as the loop learner's `ClientState.to_bytes`.
    released : MutableMapping[int, bytes], optional
        What each client released once and resends (see `CohortLearner`).
    kept : MutableMapping[int, bytes], optional
        What each client's algorithm keeps across phases (see `CohortLearner`).
    partners : MutableMapping[int, bytes], optional
        Each client's partner model (see `CohortLearner.partner`; `train_mutual` runs the
        loop's, the partner's other phases this learner's).
    device : str, default "auto"
        ``auto``, ``cpu`` or ``cuda`` (the device Ray assigned to this actor).
    precision : str, default "fp32"
        ``fp32``, ``tf32`` (TF32 matmuls and convolutions on CUDA) or ``bf16`` (autocast).
    max_chunk : int or None, default None
        At most this many clients are stacked at once (bounds memory; numbers do not depend
        on it, each client's computation is independent). None: 64 on CPU, where larger
        stacks fall out of the caches and get slower, 1024 on a GPU.
    predict_rows : int or None, default None
        Bounds the activation memory of logits. On a GPU: client-rows per forward pass (rows
        per pass = this divided by the number of stacked clients); None: 32768. On a CPU,
        logits are computed one client at a time (a plain forward pass at a large batch is
        faster there than ``vmap``'s batched convolutions) in passes of this many rows; None:
        1024, the loop's batch.
    stacked : bool or None, default None
        Training steps (private training and distillation) and logits on shared inputs of the
        models that `fedkd.learner.stacked_cnn` supports run its stacked forward pass (grouped
        convolutions in ``channels_last`` memory, batched matmuls, autograd) instead of
        ``vmap`` over ``functional_call`` (logits on a CPU: instead of one client at a time);
        other models never do. None: on a CPU, where ``vmap``'s batched convolutions are slow;
        ``vmap`` on other devices. The numbers are the same up to float rounding either way.
    stack_rows : int or None, default None
        Client-rows per stacked training pass: a training step runs in passes of
        ``stack_rows // batch`` clients (at least one); logits on shared inputs, which keep no
        activations for a backward pass, in passes of ``2 * stack_rows // K`` rows of all K
        clients. Numbers do not depend on it. None: 128 on a CPU; on other devices, training
        steps in one pass and logits in passes of `predict_rows` client-rows.
    """

    def __init__(
        self,
        data: FederatedData,
        config: CohortConfig,
        states: MutableMapping[int, bytes],
        released: MutableMapping[int, bytes] | None = None,
        kept: MutableMapping[int, bytes] | None = None,
        partners: MutableMapping[int, bytes] | None = None,
        *,
        device: str = "auto",
        precision: str = "fp32",
        max_chunk: int | None = None,
        predict_rows: int | None = None,
        stacked: bool | None = None,
        stack_rows: int | None = None,
    ) -> None:
        super().__init__(data, config, states, released, kept, partners)
        if precision not in PRECISIONS:
            raise ValueError(f"precision '{precision}' is not one of {', '.join(PRECISIONS)}")
        self.device = resolve_device(device)
        if max_chunk is None:
            max_chunk = 64 if self.device.type == "cpu" else 1024
        if max_chunk < 1:
            raise ValueError(f"max_chunk must be >= 1, got {max_chunk}")
        self.precision = precision
        self.stacked = stacked
        self.max_chunk = max_chunk
        self.per_client_predict = self.device.type == "cpu"
        if predict_rows is None:
            predict_rows = 1024 if self.per_client_predict else 32768
        self.predict_rows = predict_rows
        if stack_rows is None and self.device.type == "cpu":
            stack_rows = 128
        if stack_rows is not None and stack_rows < 1:
            raise ValueError(f"stack_rows must be >= 1, got {stack_rows}")
        self.stack_rows = stack_rows
        self.private_opt = functional_optimizer(config.private.optim)
        self.distill_opt = functional_optimizer(config.distill.optim)
        self._param_groups: dict[tuple[str, OptimConfig], list[dict[str, Any]]] = {}

    # -- grouping and state --------------------------------------------------------------------
    @property
    def dev(self) -> DeviceData:
        return device_data(self.data, self.device)

    def _groups(self, client_ids: list[int]) -> Iterator[tuple[str, list[int]]]:
        """Clients by architecture (first-seen order), in chunks of at most `max_chunk`.

        Within an architecture, clients are ordered by private training set size, largest
        first (stable): a chunk holds clients with similar numbers of training steps, and in
        each step the clients that still have a batch are the first ones of the stack, so
        `_run_steps` computes on them alone instead of padding everyone to the largest client.
        """
        by_arch: dict[str, list[int]] = {}
        for cid in client_ids:
            by_arch.setdefault(self.config.arch_of(cid), []).append(cid)
        for arch, cids in by_arch.items():
            cids = most_steps_first(cids, lambda c: self.data.clients[c].num_examples)
            for start in range(0, len(cids), self.max_chunk):
                yield arch, cids[start : start + self.max_chunk]

    def _template(self, arch: str) -> nn.Module:
        return model_template(arch, self.data.input_shape, self.data.num_classes, self.device)

    def _fresh_groups(self, arch: str, cfg: OptimConfig) -> list[dict[str, Any]]:
        """A new optimizer's param_groups (what a client that never trained saves)."""
        key = (arch, cfg)
        if key not in self._param_groups:
            model = self._template(arch)
            groups = make_optimizer(model.parameters(), cfg).state_dict()["param_groups"]
            self._param_groups[key] = groups
        return self._param_groups[key]

    def _load_stack(
        self, arch: str, client_ids: list[int], weights_only: bool = False
    ) -> StackedStates:
        """Read the clients' bytes (or initialise them as `ClientState.create` does).

        `weights_only`: the optimizers' states are left empty (logits, evaluation and weights
        need none; such a stack is never saved), which keeps them out of memory.
        """
        cfg = self.config
        models, private, distill, rounds, pgroups, dgroups = [], [], [], [], [], []
        dp_steps = []
        for cid in client_ids:
            blob = self.states.get(cid)
            if blob is None:
                model = init_student(
                    arch,
                    self.data.input_shape,
                    self.data.num_classes,
                    cfg.seed,
                    cid,
                    self.init_phase,
                )
                models.append({k: v.detach() for k, v in model.state_dict().items()})
                private.append({})
                distill.append({})
                rounds.append(0)
                dp_steps.append(0)
                if not weights_only:
                    pgroups.append(self._fresh_groups(arch, cfg.private.optim))
                    dgroups.append(self._fresh_groups(arch, cfg.distill.optim))
                continue
            # Shared with the process's state cache: stacking below copies every tensor.
            saved = decode_client_state(blob, shared=True)
            if saved.arch != arch:
                raise ValueError(
                    f"client {cid}: saved student is '{saved.arch}', spec says '{arch}'"
                )
            models.append(saved.model)
            private.append(saved.private_opt["state"])
            distill.append(saved.distill_opt["state"])
            rounds.append(int(saved.rounds_trained))
            dp_steps.append(int(saved.dp_steps))
            pgroups.append(saved.private_opt["param_groups"])
            dgroups.append(saved.distill_opt["param_groups"])
        names = [n for n, _ in self._template(arch).named_parameters()]
        params = {n: torch.stack([m[n] for m in models]).to(self.device) for n in names}
        return StackedStates(
            client_ids=list(client_ids),
            arch=arch,
            params=params,
            private_state={} if weights_only else self.private_opt.from_torch(private, params),
            distill_state={} if weights_only else self.distill_opt.from_torch(distill, params),
            rounds_trained=rounds,
            dp_steps=dp_steps,
            private_groups=pgroups,
            distill_groups=dgroups,
        )

    def _save_stack(self, stack: StackedStates, keep: list[bool] | None = None) -> None:
        """Write each client (each with `keep[k]` true) back as its state's bytes."""
        cpu = {n: p.detach().cpu() for n, p in stack.params.items()}
        private = {k: _to_cpu(v) for k, v in stack.private_state.items()}
        distill = {k: _to_cpu(v) for k, v in stack.distill_state.items()}
        for k, cid in enumerate(stack.client_ids):
            if keep is not None and not keep[k]:
                continue
            # Remembered as decoded: every tensor below is a fresh copy nothing else holds.
            self.states[cid] = encode_client_state(
                SavedClientState(
                    client_id=cid,
                    arch=stack.arch,
                    # clone: a view would serialise the whole stacked storage
                    model=OrderedDict((n, p[k].clone()) for n, p in cpu.items()),
                    private_opt={
                        "state": self.private_opt.to_torch(private, k),
                        "param_groups": stack.private_groups[k],
                    },
                    distill_opt={
                        "state": self.distill_opt.to_torch(distill, k),
                        "param_groups": stack.distill_groups[k],
                    },
                    rounds_trained=stack.rounds_trained[k],
                    dp_steps=stack.dp_steps[k],
                ),
                remember=True,
            )

    # -- kernels -------------------------------------------------------------------------------
    def _forward(self, model: nn.Module, embed: bool = False) -> Callable[[Params, Tensor], Tensor]:
        """Logits, or (`embed`) embeddings, of `model` with weights `params` on `x`."""

        def forward(params: Params, x: Tensor) -> Tensor:
            if embed:
                return functional_call(model, params, (x,), {"embed": True})[1].float()
            return functional_call(model, params, (x,)).float()

        return forward

    def _step_fn(
        self, arch: str, loss: OutputLoss, embed: bool
    ) -> Callable[[Params, Tensor, Tensor, Tensor], tuple[Params, Tensor]]:
        """``(params, x, targets, weights) -> (grads, losses)`` of the stacked clients, for
        `loss` of each client's float outputs (and embeddings, with `embed`): `stacked_cnn`'s
        grouped convolutions where `_stacked` holds, else ``vmap`` over ``functional_call``."""
        model = self._template(arch)
        if self._stacked(model):
            return stacked_grad_and_value(model, loss, embed, self.stack_rows)

        def loss_fn(params: Params, xb: Tensor, tb: Tensor, wb: Tensor) -> Tensor:
            if not embed:
                return loss(functional_call(model, params, (xb,)).float(), None, tb, wb)
            out, embedding = functional_call(model, params, (xb,), {"embed": True})
            return loss(out.float(), embedding.float(), tb, wb)

        return vmap(grad_and_value(loss_fn))

    def _stacked(self, model: nn.Module) -> bool:
        """Whether training steps run `stacked_cnn` for `model` (see the `stacked` argument)."""
        wanted = self.device.type == "cpu" if self.stacked is None else self.stacked
        return wanted and stacked_supports(model)

    def _width(self, embed: bool) -> int:
        return EMBEDDING_WIDTH if embed else self.data.num_classes

    def _rows_per_pass(self, num_clients: int) -> int:
        return max(1, self.predict_rows // max(num_clients, 1))

    def _predict_one(
        self, model: nn.Module, params: Params, j: int, x: Tensor, embed: bool = False
    ) -> Tensor:
        """(N, C) logits (or embeddings) of stacked client `j` on `x`, `predict_rows` rows per
        pass."""
        own = {n: p[j] for n, p in params.items()}
        forward = self._forward(model, embed)
        step = self.predict_rows
        passes = [forward(own, x[i : i + step]) for i in range(0, len(x), step)]
        if not passes:
            return torch.zeros((0, self._width(embed)), device=self.device)
        return torch.cat(passes)

    @torch.no_grad()
    def _predict_shared(
        self, model: nn.Module, params: Params, x: Tensor, embed: bool = False
    ) -> Tensor:
        """(K, N, C) logits (or embeddings) of every client on the same inputs."""
        k = num_clients(params)
        if len(x) == 0:
            return torch.zeros((k, 0, self._width(embed)), device=self.device)
        if self._stacked(model):
            rows = self.predict_rows if self.stack_rows is None else 2 * self.stack_rows
            step = max(1, rows // k)
            passes = [
                stacked_forward(model, params, x[i : i + step].expand(k, -1, -1, -1, -1), embed)
                for i in range(0, len(x), step)
            ]
            return torch.cat([(p[1] if embed else p).float() for p in passes], dim=1)
        if self.per_client_predict:
            return torch.stack([self._predict_one(model, params, j, x, embed) for j in range(k)])
        fwd = vmap(self._forward(model, embed), in_dims=(0, None))
        return torch.cat(
            [
                fwd(params, x[i : i + self._rows_per_pass(k)])
                for i in range(0, len(x), self._rows_per_pass(k))
            ],
            dim=1,
        )

    @torch.no_grad()
    def _predict_own(
        self,
        model: nn.Module,
        params: Params,
        x: Tensor,
        offsets: np.ndarray,
        cids: list[int],
        embed: bool = False,
    ) -> list[Tensor]:
        """Each client's logits (or embeddings) on its own rows of `x` (rows
        ``offsets[c]:offsets[c+1]``)."""
        if self.per_client_predict:
            return [
                self._predict_one(model, params, j, x[int(offsets[c]) : int(offsets[c + 1])], embed)
                for j, c in enumerate(cids)
            ]
        lengths = [int(offsets[c + 1] - offsets[c]) for c in cids]
        longest = max(lengths, default=0)
        k = len(cids)
        out = torch.zeros((k, longest, self._width(embed)), device=self.device)
        fwd = vmap(self._forward(model, embed))
        starts = torch.tensor([int(offsets[c]) for c in cids], device=self.device)
        lens = torch.tensor(lengths, device=self.device)
        step = self._rows_per_pass(k)
        for i in range(0, longest, step):
            cols = torch.arange(i, min(i + step, longest), device=self.device)
            # Rows past a client's end re-read row 0 of x (always there); they are cut off below.
            rows = torch.where(cols[None] < lens[:, None], starts[:, None] + cols[None], 0)
            out[:, i : i + len(cols)] = fwd(params, x[rows])
        return [out[j, :n] for j, n in enumerate(lengths)]

    def _train_private(
        self,
        stack: StackedStates,
        round_num: int,
        regulariser: ClassRegulariser | None,
    ) -> Tensor:
        """Cross-entropy training (and a per-class regulariser, its temperature set) on each
        client's data; mean losses."""
        step: StepConfig = self.config.private.for_round(round_num)
        x_all, y_all, offsets = self.dev.train
        cids = stack.client_ids
        plan = plan_batches(
            [int(offsets[c + 1] - offsets[c]) for c in cids],
            [int(offsets[c]) for c in cids],
            step.epochs,
            step.batch_size,
            [seeded_generator(self.config.seed, round_num, c, PHASE_TRAIN) for c in cids],
            self.device,
        )
        on_embeddings = regulariser is not None and regulariser.space == "embeddings"
        if regulariser is not None:
            penalty = _penalty(regulariser, self.device)
            present = regulariser.present.to(self.device)
            weight = float(regulariser.weight)

        def loss_fn(out: Tensor, embedding: Tensor | None, yb: Tensor, wb: Tensor) -> Tensor:
            loss = (F.cross_entropy(out, yb, reduction="none") * wb).sum()
            if regulariser is not None:
                # As in the loop: the batch mean over the examples of classes with a target,
                # on real rows only.
                keep = (present[yb] & (wb > 0)).to(out.dtype)
                per_example = penalty(out, embedding, yb)
                loss = loss + weight * (per_example * keep).sum() / keep.sum().clamp(min=1)
                if regulariser.normalise:
                    loss = loss / (1.0 + weight)
            return loss

        step_fn = self._step_fn(stack.arch, loss_fn, on_embeddings)
        return self._run_steps(stack, plan, x_all, y_all, step_fn, "private")

    def _train_private_dp(
        self, stack: StackedStates, round_num: int
    ) -> tuple[Tensor, list[dict[str, float]]]:
        """DP-SGD on each client's data; mean losses and each client's ledger figures."""
        # Imported here, like Opacus on the loop path: clients without DP never need it.
        from fedkd.privacy.vectorised_dpsgd import train_dp_sgd

        settings, seed, rng = self.config.dp, self.config.seed, self.config.noise_rng
        step = self.config.private.for_round(round_num)
        x_all, y_all, offsets = self.dev.train
        cids = stack.client_ids

        def noise_generator(c: int) -> torch.Generator:  # seeded noise, drawn on the device
            gen = torch.Generator(device=self.device)
            gen.manual_seed(derive_seed(seed, round_num, c, PHASE_TRAIN, 1))
            return gen

        with precision_context(self.precision, self.device):
            out = train_dp_sgd(
                self._template(stack.arch),
                stack.params,
                self.private_opt,
                stack.private_state,
                x_all,
                y_all,
                [int(offsets[c + 1] - offsets[c]) for c in cids],
                [int(offsets[c]) for c in cids],
                epochs=step.epochs,
                batch_size=step.batch_size,
                max_grad_norm=settings.max_grad_norm,
                noise_multiplier=settings.noise_for,  # calibrated per client, as in the loop
                sample_generators=[
                    noise_source(rng, lambda c=c: seeded_generator(seed, round_num, c, PHASE_TRAIN))
                    for c in cids
                ],
                noise_generators=[noise_source(rng, lambda c=c: noise_generator(c)) for c in cids],
            )
        stack.params, stack.private_state = out.params, out.opt_state
        metrics = []
        for k, (q, sigma, steps) in enumerate(
            zip(out.sample_rates, out.noise_multipliers, out.steps, strict=True)
        ):
            stack.dp_steps[k] += steps
            event = DpSgdEvent(sample_rate=q, noise_multiplier=sigma, steps=steps, round=round_num)
            metrics.append(dp_step_metrics(event, stack.dp_steps[k]))
        return out.loss.cpu(), metrics

    def _run_steps(
        self,
        stack: StackedStates,
        plan: BatchPlan,
        x_all: Tensor,
        targets: Tensor,
        step_fn: Callable[..., tuple[Params, Tensor]],
        which: str,
    ) -> Tensor:
        """Apply `plan`'s steps; a client whose batch is empty keeps weights and state."""
        opt = self.private_opt if which == "private" else self.distill_opt
        state = stack.private_state if which == "private" else stack.distill_state
        params = dict(stack.params)
        total = torch.zeros(len(stack.client_ids), dtype=torch.float64, device=self.device)
        with precision_context(self.precision, self.device):
            for t, a in enumerate(plan.computed):
                # Clients are ordered by step count: only the first `a` still have batches, so
                # only they are computed (no rows of clients that have finished).
                if a == 0:
                    continue
                width = plan.width[t]
                idx = plan.index[t, :a, :width]
                size = plan.size[t, :a]
                grads, loss = step_fn(
                    {n: p[:a] for n, p in params.items()},
                    x_all[idx],
                    targets[idx],
                    plan.weight[t, :a, :width],
                )
                params, state = opt.step_first(params, grads, state, size > 0, a)
                total[:a] += loss.double() * size
        stack.params = params
        if which == "private":
            stack.private_state = state
        else:
            stack.distill_state = state
        seen = plan.size.sum(0).clamp(min=1)
        return total / seen

    def _distill(
        self,
        stack: StackedStates,
        round_num: int,
        proxy: Tensor,
        teacher: Tensor,
        regulariser: GroupRegulariser | None = None,
    ) -> Tensor:
        """Fit every client's outputs on the proxy subset to the teacher's logits (plus a group
        regulariser's term, on batches of whole groups)."""
        step = self.config.distill
        cids = stack.client_ids
        n = len(proxy)
        plan = plan_batches(
            [n] * len(cids),
            [0] * len(cids),
            step.epochs,
            step.batch_size,
            [seeded_generator(self.config.seed, round_num, c, PHASE_DISTILL) for c in cids],
            self.device,
            group_size=1 if regulariser is None else regulariser.group_size,
        )
        kind, temperature = self.config.distill_loss, self.config.distill_temperature
        classes = teacher.shape[1]
        if regulariser is not None:  # its targets travel beside the teacher's, row by row
            teacher = torch.cat([teacher, regulariser.targets.float().to(self.device)], dim=1)

        def loss_fn(out: Tensor, embedding: Tensor | None, tb: Tensor, wb: Tensor) -> Tensor:
            # All clients distill on the same n rows, so batches are never padded here and the
            # loss is exactly the loop's batch mean.
            del wb
            if regulariser is None:
                return distillation_loss(kind, out, tb, temperature)
            loss = distillation_loss(kind, out, tb[:, :classes], temperature)
            return loss + regulariser.penalty(out, embedding, tb[:, classes:])

        step_fn = self._step_fn(stack.arch, loss_fn, regulariser is not None)
        return self._run_steps(stack, plan, proxy, teacher, step_fn, "distill")

    # -- phases --------------------------------------------------------------------------------
    def train_private(
        self,
        round_num: int,
        client_ids: list[int],
        regulariser: ClassRegulariser | None = None,
    ) -> dict[int, ClientResult]:
        """Train each client on its private data (see `fedkd.learner.protocol.Learner`)."""
        if regulariser is not None:
            if self.config.dp is not None:
                raise ValueError("a class regulariser does not run under DP-SGD")
            regulariser = regulariser.with_temperature(self.config.distill_temperature)
        results: dict[int, ClientResult] = {}
        for arch, cids in self._groups(client_ids):
            stack = self._load_stack(arch, cids)
            dp_metrics: list[dict[str, float]] = [{} for _ in cids]
            if self.config.dp is None:
                losses = self._train_private(stack, round_num, regulariser).cpu()
            else:
                losses, dp_metrics = self._train_private_dp(stack, round_num)
            stack.rounds_trained = [r + 1 for r in stack.rounds_trained]
            finite = _finite_clients(stack)
            # As in the loop: a client whose student turned non-finite keeps its stored state.
            self._save_stack(stack, keep=finite)
            for j, cid in enumerate(cids):
                metrics = {
                    "num_examples": float(self.data.clients[cid].num_examples),
                    **dp_metrics[j],
                }
                if finite[j]:
                    metrics["train_loss"] = float(losses[j])
                else:
                    self._undo_training(cid, stack.dp_steps[j])
                    metrics[TRAIN_DIVERGED] = 1.0
                results[cid] = ClientResult(metrics=metrics)
        return {cid: results[cid] for cid in client_ids}

    def _on_shared_inputs(
        self, client_ids: list[int], inputs: np.ndarray, embed: bool
    ) -> dict[int, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(inputs)).to(self.device)
        out: dict[int, np.ndarray] = {}
        for arch, cids in self._groups(client_ids):
            stack = self._load_stack(arch, cids, weights_only=True)
            with precision_context(self.precision, self.device):
                values = self._predict_shared(self._template(arch), stack.params, x, embed).cpu()
            for j, cid in enumerate(cids):
                out[cid] = values[j].numpy().astype(np.float32)
        return {cid: out[cid] for cid in client_ids}

    def logits(self, client_ids: list[int], inputs: np.ndarray) -> dict[int, np.ndarray]:
        """Each client's logits on `inputs` (see `fedkd.learner.protocol.Learner`)."""
        return self._on_shared_inputs(client_ids, inputs, embed=False)

    def embeddings(self, client_ids: list[int], inputs: np.ndarray) -> dict[int, np.ndarray]:
        """Each client's embeddings on `inputs` (see `fedkd.learner.protocol.Learner`)."""
        return self._on_shared_inputs(client_ids, inputs, embed=True)

    def class_statistics(
        self, client_ids: list[int], space: str
    ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Per-class means on private data (see `fedkd.learner.protocol.Learner`)."""
        if space not in REGULARISER_SPACES:
            raise ValueError(f"space '{space}' is not one of {', '.join(REGULARISER_SPACES)}")
        x_all, _, offsets = self.dev.train
        out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for arch, cids in self._groups(client_ids):
            stack = self._load_stack(arch, cids, weights_only=True)
            model = self._template(arch)
            with precision_context(self.precision, self.device):
                own = self._predict_own(
                    model, stack.params, x_all, offsets, cids, space == "embeddings"
                )
            for j, cid in enumerate(cids):
                out[cid] = self._per_class_mean(cid, own[j].cpu())
        return {cid: out[cid] for cid in client_ids}

    def get_weights(self, client_ids: list[int]) -> dict[int, dict[str, np.ndarray]]:
        """Each client's student weights (see `fedkd.learner.protocol.Learner`)."""
        out: dict[int, dict[str, np.ndarray]] = {}
        for arch, cids in self._groups(client_ids):
            cpu = {
                n: p.detach().cpu()
                for n, p in self._load_stack(arch, cids, weights_only=True).params.items()
            }
            for j, cid in enumerate(cids):
                out[cid] = {n: p[j].numpy().copy() for n, p in cpu.items()}
        return {cid: out[cid] for cid in client_ids}

    def distill(
        self,
        round_num: int,
        client_ids: list[int],
        inputs: np.ndarray,
        targets: np.ndarray,
        regulariser: GroupRegulariser | None = None,
    ) -> dict[int, ClientResult]:
        """Distill towards the target logits on `inputs` (see `fedkd.learner.protocol.Learner`);
        with a private anchor (``config.distill_private_weight > 0``) in the reference loop."""
        if self.config.distill_private_weight > 0:
            return super().distill(round_num, client_ids, inputs, targets, regulariser)
        proxy = torch.from_numpy(np.ascontiguousarray(inputs)).to(self.device)
        teacher = torch.as_tensor(np.asarray(targets)).float().to(self.device)
        results: dict[int, ClientResult] = {}
        for arch, cids in self._groups(client_ids):
            stack = self._load_stack(arch, cids)
            losses = self._distill(stack, round_num, proxy, teacher, regulariser).cpu()
            finite = _finite_clients(stack)
            # As in the loop: a client whose student turned non-finite keeps its stored state.
            self._save_stack(stack, keep=finite)
            for j, cid in enumerate(cids):
                metrics = {"distill_loss": float(losses[j])}
                if not finite[j]:
                    metrics[DIGEST_DIVERGED] = 1.0
                results[cid] = ClientResult(metrics=metrics)
        return {cid: results[cid] for cid in client_ids}

    def evaluate(self, client_ids: list[int], test_idx: np.ndarray) -> dict[int, ClientResult]:
        """Accuracy on the global test subset, the local held-out slice and the validation
        slice (NaN where a slice is empty), plus test logits."""
        dev = self.dev
        idx = torch.from_numpy(np.asarray(test_idx, dtype=np.int64)).to(self.device)
        test_x = dev.test_x[idx]
        test_y = torch.from_numpy(np.asarray(self.data.test_y)[np.asarray(test_idx)])
        local_x, _, local_offsets = dev.local_test
        val_x, _, val_offsets = dev.validation
        results: dict[int, ClientResult] = {}
        for arch, cids in self._groups(client_ids):
            stack = self._load_stack(arch, cids, weights_only=True)
            model = self._template(arch)
            with precision_context(self.precision, self.device):
                test_logits = self._predict_shared(model, stack.params, test_x).cpu()
                local = self._predict_own(model, stack.params, local_x, local_offsets, cids)
                val = self._predict_own(model, stack.params, val_x, val_offsets, cids)
            for j, cid in enumerate(cids):
                client = self.data.clients[cid]
                results[cid] = ClientResult(
                    arrays={"test_logits": test_logits[j].numpy().astype(np.float32)},
                    metrics={
                        "test_acc": accuracy(test_logits[j], test_y),
                        "local_acc": accuracy(
                            local[j].cpu(), torch.from_numpy(client.y_local_test)
                        ),
                        "val_acc": accuracy(val[j].cpu(), torch.from_numpy(client.y_val)),
                    },
                )
        return {cid: results[cid] for cid in client_ids}


def _penalty(
    regulariser: ClassRegulariser, device: torch.device
) -> Callable[[Tensor, Tensor | None, Tensor], Tensor]:
    """A `ClassRegulariser`'s per-example penalty ``(logits, embeddings, labels) -> (B,)``, the
    loop's (`fedkd.learner.loop.train_supervised`) written for ``vmap``."""
    if regulariser.space == "embeddings":
        centres = regulariser.targets.float().to(device)

        def distance(out: Tensor, embedding: Tensor | None, yb: Tensor) -> Tensor:
            return (embedding - centres[yb]).square().mean(-1)

        return distance
    temperature = float(regulariser.temperature)
    targets = soft_targets(regulariser.targets.float(), temperature).to(device)

    def kl(out: Tensor, embedding: Tensor | None, yb: Tensor) -> Tensor:
        probs = targets[yb]
        log_q = torch.log_softmax(out / temperature, dim=-1)
        kl = (torch.special.xlogy(probs, probs) - probs * log_q).sum(-1)
        return kl * (temperature * temperature)

    return kl


def _finite_clients(stack: StackedStates) -> list[bool]:
    """Per client of `stack`, whether every weight of its student is finite."""
    return (
        torch.stack([torch.isfinite(p).flatten(1).all(1) for p in stack.params.values()])
        .all(0)
        .tolist()
    )


def _to_cpu(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value


__all__ = ["StackedStates", "VectorisedCohortLearner"]
