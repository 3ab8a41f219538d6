"""One private-training step of K clients: the loop against stacked (vectorised) variants.

Times one SGD step (forward, backward, update) of K clients of a zoo CNN on full-size inputs
(28x28 MNIST shape, synthetic data) per variant, after checking that each variant computes the
loop's gradients (``allclose``):

- ``loop``: K torch modules and K SGD optimizers (`fedkd.learner.loop.make_optimizer`'s), as
  the loop learner steps them;
- ``vmap``: the vectorised learner's current step, ``vmap(grad_and_value(loss))`` over
  ``functional_call`` and the functional SGD (`fedkd.learner.functional_optim`);
- ``grouped`` / ``grouped_cl``: the stacked model written out, convolutions as one grouped
  convolution over the clients' channels stacked (``[B, K*C, H, W]``, ``groups=K``), in
  contiguous / ``channels_last`` memory; linear layers as batched matmuls; autograd backward
  (``grouped_cl`` is `fedkd.learner.stacked_cnn`'s forward pass, the vectorised learner's on a CPU,
  which also splits the stack into passes of a few clients);
- ``im2col``: convolutions as ``F.unfold`` and a batched matmul over the client dimension;
  autograd backward (``F.fold`` for the input gradient);
- ``closed``: convolutions as a custom autograd Function: forward a batched matmul over input
  patches (`fedkd.privacy.layer_grads`'s strided patches), backward the closed forms (weight
  gradient: a batched matmul of the output gradients and the patches; input gradient: the
  transposed convolution per client, skipped for the first layer);
- ``convloop``: the stacked model with each client's convolution called on its own slice (K
  plain convolutions, oneDNN's fast path), everything else batched.

Variants run interleaved (A B C ... A B C ...) and the median CPU seconds per client-step
(``time.process_time``) are printed per thread count. ``--profile`` prints torch.profiler's top
operators by CPU time for the loop and the vmap step.

``--phase distill`` and ``--phase logits`` time the learners' own calls instead, the phases of
DS-FL's round beside private training: the loop learner (`fedkd.learner.cohort.CohortLearner`)
against the vectorised learner on a CPU, K clients of one architecture, with the configuration of
``simulations/mnist/dsfl.toml`` (its data, distillation batch size and optimizer, one epoch; 2K
clients, of which one node hosts K: K=10 is ``simulations/bench_cohort.py``'s per-phase node) on
a proxy subset of its ``proxy_per_round`` inputs (``--synthetic``, or without MNIST: random
28x28 inputs): ``distill`` is one epoch of `Learner.distill` towards fixed teacher logits,
``logits`` one `Learner.logits` call. Both learners start from the same client states (after a
round of private training); the check compares their logits (and the weights after one
distillation call, ``allclose``). The table gives the median CPU seconds per call (all
K clients, states read and written included) and vectorised / loop; ``--profile`` prints
torch.profiler's top operators of one call of each.

Run: ``PYTHONPATH=. python simulations/bench_vectorised_step.py --arch cnn_small --clients 10``
(``--phase distill --threads 1``: one node's distillation, as a Ray actor runs it)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from fedkd.learner.functional_optim import FunctionalSGD
from fedkd.learner.loop import OptimConfig, make_optimizer
from fedkd.learner.stacked_cnn import stacked_forward as learner_forward
from fedkd.models.zoo import MODEL_NAMES, build_model
from fedkd.privacy.layer_grads import _patches

Params = dict[str, Tensor]
PHASES = ("train", "distill", "logits")
# --phase distill / logits: the DS-FL workload of bench_cohort.py's --workload mnist
DSFL_SPEC = Path(__file__).resolve().parent / "mnist" / "dsfl.toml"
INPUT_SHAPE = (1, 28, 28)
NUM_CLASSES = 10
OPTIM = OptimConfig()  # the run's default private optimizer: SGD, lr 0.05, momentum 0.9


# -- stacked forward passes --------------------------------------------------------------------
def _conv_args(module: nn.Conv2d) -> tuple[int, int]:
    (ph, pw) = module.padding
    return ph, pw


def _linear(w: Tensor, b: Tensor, h: Tensor) -> Tensor:
    """(K, B, in) -> (K, B, out) with stacked weights."""
    return torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))


class _PatchConv(torch.autograd.Function):
    """Convolution of K clients as a batched matmul over patches, closed-form backward."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor, padding: tuple[int, int]) -> Tensor:  # type: ignore[override]
        k, n = x.shape[:2]
        o = w.shape[1]
        u = _patches(_FakeConv(w.shape[-2:], padding), x.flatten(0, 1))  # (K B, C k k, P)
        u = u.reshape(k, n, u.shape[1], u.shape[2])
        out = torch.einsum("koc,kncp->knop", w.flatten(2), u) + b[:, None, :, None]
        ctx.save_for_backward(x, w, u)
        ctx.padding = padding
        h_out, w_out = (
            x.shape[-2] + 2 * padding[0] - w.shape[-2] + 1,
            (x.shape[-1] + 2 * padding[1] - w.shape[-1] + 1),
        )
        return out.reshape(k, n, o, h_out, w_out)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        x, w, u = ctx.saved_tensors
        k, n, o = g.shape[:3]
        go = g.reshape(k, n, o, -1)
        grad_w = torch.einsum("knop,kncp->koc", go, u).reshape(w.shape)
        grad_b = go.sum((1, 3))
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.stack(
                [
                    torch.nn.grad.conv2d_input(x.shape[1:], w[j], g[j], padding=ctx.padding)
                    for j in range(k)
                ]
            )
        return grad_x, grad_w, grad_b, None


class _FakeConv(nn.Conv2d):
    """The attributes `_patches` reads, without parameters."""

    def __init__(self, kernel: tuple[int, int], padding: tuple[int, int]) -> None:
        nn.Module.__init__(self)
        self.kernel_size, self.padding = tuple(kernel), tuple(padding)
        self.stride, self.dilation = (1, 1), (1, 1)


def stacked_forward(model: nn.Module, params: Params, x: Tensor, conv: str) -> Tensor:
    """(K, B, classes) logits of a SimpleCNN for K stacked clients on x (K, B, C, H, W)."""
    if conv == "grouped_cl":  # the vectorised learner's path on a CPU
        return learner_forward(model, params, x)
    k, n = x.shape[:2]
    grouped = conv == "grouped"
    if grouped:  # (B, K C, H, W)
        h = x.transpose(0, 1).reshape(n, -1, *x.shape[3:])
    else:  # (K, B, C, H, W)
        h = x
    for name, module in model.features.named_children():
        if isinstance(module, nn.Conv2d):
            w, b = params[f"features.{name}.weight"], params[f"features.{name}.bias"]
            pad = _conv_args(module)
            if grouped:
                h = F.conv2d(h, w.flatten(0, 1), b.flatten(), padding=pad, groups=k)
            elif conv == "im2col":
                c, hh, ww = h.shape[2:]
                u = F.unfold(h.flatten(0, 1), w.shape[-2:], padding=pad).reshape(k, n, -1, hh * ww)
                h = (torch.einsum("koc,kncp->knop", w.flatten(2), u) + b[:, None, :, None]).reshape(
                    k, n, -1, hh, ww
                )
            elif conv == "closed":
                h = _PatchConv.apply(h, w, b, pad)
            elif conv == "convloop":
                h = torch.stack([F.conv2d(h[j], w[j], b[j], padding=pad) for j in range(k)])
            else:
                raise ValueError(conv)
        else:
            h = module(h) if grouped else module(h.flatten(0, 1)).unflatten(0, (k, n))
    if grouped:
        h = h.reshape(n, k, -1).transpose(0, 1)
    else:
        h = h.flatten(2)
    for name, module in model.head.named_children():
        if isinstance(module, nn.Linear):
            h = _linear(params[f"head.{name}.weight"], params[f"head.{name}.bias"], h)
        elif not isinstance(module, nn.Flatten):
            h = module(h)
    return h


# -- the variants ------------------------------------------------------------------------------
class Variant:
    """One way to take a step of K clients; `grads` for the equivalence check."""

    def __init__(self, arch: str, weights: list[Params], x: Tensor, y: Tensor) -> None:
        self.model = build_model(arch, INPUT_SHAPE, NUM_CLASSES)
        self.x, self.y = x, y

    def grads(self) -> Params:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError


class Loop(Variant):
    def __init__(self, arch: str, weights: list[Params], x: Tensor, y: Tensor) -> None:
        super().__init__(arch, weights, x, y)
        self.models = []
        for w in weights:
            m = build_model(arch, INPUT_SHAPE, NUM_CLASSES)
            m.load_state_dict(w)
            self.models.append(m)
        self.opts = [make_optimizer(m.parameters(), OPTIM) for m in self.models]

    def _backward(self, j: int) -> None:
        self.opts[j].zero_grad()
        F.cross_entropy(self.models[j](self.x[j]), self.y[j]).backward()

    def grads(self) -> Params:
        out: dict[str, list[Tensor]] = {}
        for j, m in enumerate(self.models):
            self._backward(j)
            for n, p in m.named_parameters():
                out.setdefault(n, []).append(p.grad.clone())
        return {n: torch.stack(v) for n, v in out.items()}

    def step(self) -> None:
        for j in range(len(self.models)):
            self._backward(j)
            self.opts[j].step()


class Stacked(Variant):
    conv = "vmap"

    def __init__(self, arch: str, weights: list[Params], x: Tensor, y: Tensor) -> None:
        super().__init__(arch, weights, x, y)
        self.params = {n: torch.stack([w[n] for w in weights]) for n in weights[0]}
        self.opt = FunctionalSGD(OPTIM.lr, OPTIM.momentum, OPTIM.weight_decay)
        self.state = self.opt.init(self.params)
        self.active = torch.ones(len(weights), dtype=torch.bool)

    def _grads(self, params: Params) -> Params:
        leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
        logits = stacked_forward(self.model, leaves, self.x, self.conv)
        # Sum over clients of each client's batch-mean loss: each client's gradient is its own.
        loss = F.cross_entropy(logits.flatten(0, 1), self.y.flatten(), reduction="none")
        loss.view(self.x.shape[0], -1).mean(1).sum().backward()
        return {n: p.grad for n, p in leaves.items()}

    def grads(self) -> Params:
        return self._grads(self.params)

    def step(self) -> None:
        self.params, self.state = self.opt.step(
            self.params, self._grads(self.params), self.state, self.active
        )


class Vmap(Stacked):
    def __init__(self, arch: str, weights: list[Params], x: Tensor, y: Tensor) -> None:
        super().__init__(arch, weights, x, y)
        model = self.model

        def loss_fn(p: Params, xb: Tensor, yb: Tensor) -> Tensor:
            return F.cross_entropy(functional_call(model, p, (xb,)), yb)

        self.fn = vmap(grad_and_value(loss_fn))

    def _grads(self, params: Params) -> Params:
        return self.fn(params, self.x, self.y)[0]


def _stacked(conv: str) -> type[Stacked]:
    return type(f"Stacked_{conv}", (Stacked,), {"conv": conv})


VARIANTS: dict[str, type[Variant]] = {
    "loop": Loop,
    "vmap": Vmap,
    **{c: _stacked(c) for c in ("grouped", "grouped_cl", "im2col", "closed", "convloop")},
}


# -- measurement -------------------------------------------------------------------------------
def _setup(arch: str, clients: int, batch: int) -> tuple[list[Params], Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    weights = []
    for j in range(clients):
        torch.manual_seed(1000 + j)
        model = build_model(arch, INPUT_SHAPE, NUM_CLASSES)
        weights.append({n: p.detach() for n, p in model.named_parameters()})
    x = torch.randn(clients, batch, *INPUT_SHAPE, generator=gen)
    y = torch.randint(0, NUM_CLASSES, (clients, batch), generator=gen)
    return weights, x, y


def check(variants: dict[str, Variant]) -> None:
    """Every variant's gradients equal the loop's (before any step)."""
    reference = variants["loop"].grads()
    for name, v in variants.items():
        got = v.grads()
        for n, g in reference.items():
            if not torch.allclose(got[n], g, rtol=1e-4, atol=1e-6):
                err = (got[n] - g).abs().max().item()
                raise SystemExit(f"{name}: gradient of {n} differs from the loop's (max {err:.2e})")


def time_variants(variants: dict[str, Variant], steps: int, repeats: int) -> dict[str, float]:
    """Median CPU seconds per client-step, variants interleaved."""
    samples: dict[str, list[float]] = {n: [] for n in variants}
    clients = variants["loop"].x.shape[0]
    for _ in range(repeats):
        for name, v in variants.items():
            start = time.process_time()
            for _ in range(steps):
                v.step()
            samples[name].append((time.process_time() - start) / (steps * clients))
    return {n: statistics.median(s) for n, s in samples.items()}


def profile(variant: Variant, steps: int, top: int) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            variant.step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


# -- --phase distill / logits: the learners' own calls --------------------------------------
def _phase_setup(
    arch: str, clients: int, synthetic: bool
) -> tuple[Any, Any, list[int], dict[int, bytes], np.ndarray, np.ndarray]:
    """DS-FL's configuration for one node of `clients` clients of `arch` (one distillation
    epoch): the spec's MNIST, 2K clients of which node 0 hosts K (K=10: bench_cohort.py's
    per-phase node), or `synthetic` 28x28 data (also where MNIST is missing); the K clients'
    states after one round of private training, a proxy subset of ``proxy_per_round`` inputs
    and fixed teacher logits."""
    from fedkd.assembly import cohort_config, federated_data, hosted_clients
    from fedkd.data.sources import ArrayDataset
    from fedkd.data.splits import build_federated_data
    from fedkd.learner.cohort import CohortLearner
    from fedkd.spec import SpecError, load_spec

    overrides = [f'clients.students=["{arch}"]', "distill.epochs=1", "rounds=1"]
    spec = None
    if not synthetic:
        try:
            spec = load_spec(
                DSFL_SPEC,
                [
                    *overrides,
                    f"clients.num_clients={2 * clients}",
                    f"clients.clients_per_node={clients}",
                ],
            )
        except SpecError as err:  # no MNIST here
            print(f"synthetic data: {err}")
    rng = np.random.default_rng(0)
    if spec is not None:
        data = federated_data(spec)
        cids = hosted_clients(spec, 0, spec.num_nodes)
    else:  # the spec's training settings; its data source swapped for one that needs no file
        spec = load_spec(
            DSFL_SPEC, [*overrides, "data.source=digits", f"clients.num_clients={clients}"]
        )
        train = 500 * clients + spec.distill.proxy_per_round

        def images(n: int) -> np.ndarray:
            return rng.standard_normal((n, *INPUT_SHAPE), dtype=np.float32)

        dataset = ArrayDataset(
            "synthetic",
            images(train),
            rng.integers(0, NUM_CLASSES, train),
            images(100),
            rng.integers(0, NUM_CLASSES, 100),
            NUM_CLASSES,
        )
        data = build_federated_data(
            dataset,
            num_clients=clients,
            partition="iid",
            proxy_size=spec.distill.proxy_per_round,
            seed=0,
        )
        cids = list(range(clients))
    proxy = np.arange(spec.distill.proxy_per_round)
    config = cohort_config(spec)
    states: dict[int, bytes] = {}
    CohortLearner(data, config, states).train_private(1, cids)
    teacher = rng.standard_normal((len(proxy), NUM_CLASSES), dtype=np.float32)
    return data, config, cids, states, data.proxy_x[proxy], teacher


def _phase_learners(
    data: Any, config: Any, states: dict[int, bytes], stack_rows: list[int] | None = None
) -> dict[str, Any]:
    """The loop and the vectorised learner (on a CPU; one per `stack_rows` value where given)
    on copies of the same client states."""
    from fedkd.learner.cohort import CohortLearner
    from fedkd.learner.vectorised import VectorisedCohortLearner

    learners: dict[str, Any] = {"loop": CohortLearner(data, config, dict(states))}
    for rows in stack_rows or [None]:
        name = "vectorised" if rows is None else f"vectorised {rows} rows"
        kwargs = {} if rows is None else {"stack_rows": rows}
        learners[name] = VectorisedCohortLearner(data, config, dict(states), device="cpu", **kwargs)
    return learners


def _phase_call(
    learner: Any, phase: str, cids: list[int], inputs: np.ndarray, teacher: np.ndarray
) -> Any:
    if phase == "logits":
        return learner.logits(cids, inputs)
    return learner.distill(2, cids, inputs, teacher)


def check_phase(
    learners: dict[str, Any],
    phase: str,
    cids: list[int],
    inputs: np.ndarray,
    teacher: np.ndarray,
) -> None:
    """Each vectorised learner's logits (`phase` logits) or weights after one distillation
    call equal the loop's."""
    got = [_phase_call(learner, phase, cids, inputs, teacher) for learner in learners.values()]
    if phase != "logits":  # a distillation call returns its losses: compare the weights
        got = [learner.get_weights(cids) for learner in learners.values()]
    for other in got[1:]:
        _check_same(phase, cids, got[0], other)


def _check_same(phase: str, cids: list[int], loop: dict[int, Any], other: dict[int, Any]) -> None:
    for cid in cids:
        ref, vec = loop[cid], other[cid]
        for name in ref if isinstance(ref, dict) else [None]:
            a, b = (ref, vec) if name is None else (ref[name], vec[name])
            if not np.allclose(a, b, rtol=1e-4, atol=1e-4):
                err = np.abs(a - b).max()
                raise SystemExit(f"{phase}: client {cid} {name or 'logits'} differ (max {err:.2e})")


def time_phase(
    learners: dict[str, Any],
    phase: str,
    cids: list[int],
    inputs: np.ndarray,
    teacher: np.ndarray,
    repeats: int,
) -> dict[str, float]:
    """Median CPU seconds of one call (all clients), learners interleaved."""
    samples: dict[str, list[float]] = {n: [] for n in learners}
    for _ in range(repeats):
        for name, learner in learners.items():
            start = time.process_time()
            _phase_call(learner, phase, cids, inputs, teacher)
            samples[name].append(time.process_time() - start)
    return {n: statistics.median(s) for n, s in samples.items()}


def profile_phase(learner: Any, phase: str, cids: list[int], inputs: Any, teacher: Any) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        _phase_call(learner, phase, cids, inputs, teacher)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


def main_phase(args: argparse.Namespace) -> int:
    """``--phase distill`` / ``logits``: the table of the loop against the vectorised learner."""
    print(
        f"--phase {args.phase}: K={args.clients} clients, inputs {INPUT_SHAPE}, "
        f"{DSFL_SPEC.relative_to(DSFL_SPEC.parents[2])} (distillation: 1 epoch); CPU s per call "
        f"of all K clients (process_time, median of {args.repeats}, interleaved), measured "
        "under load"
    )
    header = None
    for arch in args.arch:
        data, config, cids, states, inputs, teacher = _phase_setup(
            arch, args.clients, args.synthetic
        )
        for threads in args.threads:
            torch.set_num_threads(threads)
            check_phase(
                _phase_learners(data, config, states, args.stack_rows),
                args.phase,
                cids,
                inputs,
                teacher,
            )
            learners = _phase_learners(data, config, states, args.stack_rows)
            others = [n for n in learners if n != "loop"]
            if header is None:
                header = ["arch", "data", "threads", "proxy rows", "loop s"]
                header += [f"{n} s" for n in others] + [f"{n}/loop" for n in others]
                print("| " + " | ".join(header) + " |")
                print("|" + "---|" * len(header))
            for learner in learners.values():  # warm-up
                _phase_call(learner, args.phase, cids, inputs, teacher)
            times = time_phase(learners, args.phase, cids, inputs, teacher, args.repeats)
            cells = [arch, data.dataset_name, str(threads), str(len(inputs))]
            cells.append(f"{times['loop']:.3f}")
            cells += [f"{times[n]:.3f}" for n in others]
            cells += [f"{times[n] / times['loop']:.2f}x" for n in others]
            print("| " + " | ".join(cells) + " |", flush=True)
            if args.profile:
                for name, learner in learners.items():
                    print(f"\n{arch}, {threads} thread(s), {name}, one {args.phase} call:")
                    print(profile_phase(learner, args.phase, cids, inputs, teacher))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", nargs="+", default=["cnn_small", "cnn_large"])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed sample")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved samples per variant")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--profile", action="store_true", help="profile loop and vmap steps")
    parser.add_argument(
        "--phase",
        choices=PHASES,
        default="train",
        help="train: one private step of each variant; distill / logits: the learners' calls",
    )
    parser.add_argument(
        "--stack-rows",
        type=int,
        nargs="+",
        help="--phase distill / logits: one vectorised learner per value of its stack_rows "
        "(default: one, with the learner's default)",
    )
    parser.add_argument(
        "--synthetic",
        action="store_true",
        help="--phase distill / logits: synthetic 28x28 data instead of the spec's MNIST",
    )
    args = parser.parse_args(argv)
    for arch in args.arch:
        if arch not in MODEL_NAMES or not arch.startswith("cnn"):
            print(f"error: --arch {arch}: use cnn_small or cnn_large", file=sys.stderr)
            return 2
    if args.stack_rows and min(args.stack_rows) < 1:
        print("error: --stack-rows: values of at least 1", file=sys.stderr)
        return 2
    if args.phase != "train":
        return main_phase(args)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or "loop" not in args.variants:
        print(f"error: --variants: loop and any of {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    names = [v for v in VARIANTS if v in args.variants]
    print(
        f"K={args.clients} clients, batch {args.batch}, inputs {INPUT_SHAPE}, SGD momentum "
        f"{OPTIM.momentum}; CPU ms per client-step (process_time, median of {args.repeats}), "
        "measured under load"
    )
    print("| arch | threads | " + " | ".join(names) + " | best/loop |")
    print("|---|---|" + "---|" * len(names) + "---|")
    for arch in args.arch:
        weights, x, y = _setup(arch, args.clients, args.batch)
        for threads in args.threads:
            torch.set_num_threads(threads)
            variants = {n: VARIANTS[n](arch, weights, x, y) for n in names}
            check(variants)
            for v in variants.values():  # warm-up
                v.step()
            times = time_variants(variants, args.steps, args.repeats)
            best = min((t, n) for n, t in times.items() if n != "loop")
            cells = " | ".join(f"{1000 * times[n]:.2f}" for n in names)
            ratio = best[0] / times["loop"]
            print(f"| {arch} | {threads} | {cells} | {best[1]} {ratio:.2f}x |", flush=True)
            if args.profile:
                for n in ("loop", "vmap"):
                    if n in variants:
                        print(f"\n{arch}, {threads} thread(s), {n}, {args.steps} steps:")
                        print(profile(variants[n], args.steps, 12))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
