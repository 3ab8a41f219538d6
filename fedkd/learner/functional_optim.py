"""``torch.optim.SGD`` and ``torch.optim.Adam`` without ``torch.optim``: on stacked weights,
and SGD on a model's own parameters.

The vectorised learner keeps the weights of K clients stacked along a leading client dimension
and steps them all at once. Its functional optimizers compute torch's own update, operation for
operation, on such stacks, with a per-client mask (a client without a batch at a step keeps its
weights and state), and convert their state to and from torch's ``Optimizer.state_dict``
format, so a client's optimizer state is the same whichever learner wrote it.

`ParamSGD` is the loop learner's SGD: torch's update on one model's parameters, with torch's
optimizer interface and ``state_dict`` format. Every ``torch.optim`` optimizer imports
``torch._dynamo`` when it is built and at its first step, a second or more of each process's
start-up; `ParamSGD` does not. Both SGDs step through `sgd_update_`.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

if TYPE_CHECKING:  # loop imports this module for `ParamSGD`
    from fedkd.learner.loop import OptimConfig

Params = dict[str, Tensor]  # parameter name -> (K, *shape), K clients stacked


def _per_client(mask: Tensor, like: Tensor) -> Tensor:
    """A (K,) tensor reshaped to broadcast against a (K, *shape) tensor."""
    return mask.view(-1, *([1] * (like.dim() - 1)))


class FunctionalOptimizer(Protocol):
    """An optimizer over stacked parameters whose state converts to/from torch's format."""

    def init(self, params: Params) -> dict[str, Any]:
        """The state of clients that never stepped (a fresh torch optimizer's)."""
        ...

    def step(
        self, params: Params, grads: Params, state: dict[str, Any], active: Tensor
    ) -> tuple[Params, dict[str, Any]]:
        """One update of every client with ``active[k]`` true; the others are unchanged."""
        ...

    def step_first(
        self, params: Params, grads: Params, state: dict[str, Any], active: Tensor, a: int
    ) -> tuple[Params, dict[str, Any]]:
        """`step` of the first `a` clients only (`grads`, `active`: theirs); see `StepFirst`."""
        ...

    def from_torch(
        self, client_states: Sequence[dict[int, dict[str, Tensor]]], params: Params
    ) -> dict[str, Any]:
        """The stacked state of K clients from their torch ``state_dict()["state"]``."""
        ...

    def to_torch(self, state: dict[str, Any], k: int) -> dict[int, dict[str, Tensor]]:
        """Client `k`'s state as torch's ``state_dict()["state"]`` (fresh tensors)."""
        ...


class StepFirst:
    """`step_first`: an optimizer step computed on the first `a` stacked clients only.

    When the clients that take a step are the first ones of the stack (clients ordered by step
    count), the others need no computation at all: their weights and state are left as they
    are. The first `a` clients' new weights and state are written into `params` and `state` in
    place (which must therefore not be shared with a caller that still needs them), and
    `grads` may be overwritten; only where ``a`` is the whole stack and the optimizer cannot
    step in place (`step_in_place`) is it `step`, which returns new tensors.
    """

    def step_in_place(
        self, params: Params, grads: Params, state: dict[str, Any], active: Tensor
    ) -> bool:
        """`step` written into `params`, `state` and `grads` in place, where the optimizer
        can (none by default); whether it did.

        Where it can, this is torch's own single-tensor update (``buf.mul_(m).add_(g)``,
        ``p.add_(buf, alpha=-lr)``), the same operations with the same results as `step`'s,
        without `step`'s new tensors: on a CPU a new tensor the size of a stack is fresh memory
        that every step faults in again.
        """
        return False

    def step_first(
        self, params: Params, grads: Params, state: dict[str, Any], active: Tensor, a: int
    ) -> tuple[Params, dict[str, Any]]:
        """One update of the first `a` clients (``active[k]`` true), the rest untouched.

        Parameters
        ----------
        params : dict of str to Tensor
            The whole stack, ``(K, *shape)`` each.
        grads : dict of str to Tensor
            Gradients of the first `a` clients, ``(a, *shape)`` each.
        state : dict
            The whole stack's optimizer state.
        active : Tensor
            ``(a,)`` bool: which of the first `a` clients take the step.
        a : int
            How many leading clients of the stack are computed.

        Returns
        -------
        tuple of (dict, dict)
            The stack's weights and state after the step.
        """
        whole = a == num_clients(params)
        head_params = params if whole else {n: p[:a] for n, p in params.items()}
        head_state = state if whole else state_prefix(state, a)
        if self.step_in_place(head_params, grads, head_state, active):
            return params, state  # the views wrote through to the whole stack
        step = self.step  # type: ignore[attr-defined]  # FunctionalSGD's or FunctionalAdam's
        if whole:
            return step(params, grads, state, active)
        head, head_state = step(head_params, grads, head_state, active)
        for n, p in head.items():
            params[n][:a] = p
        write_state_prefix(state, head_state, a)
        return params, state


def sgd_update_(
    param: Tensor,
    grad: Tensor,
    buf: Tensor | None,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    grad_is_scratch: bool = False,
) -> Tensor | None:
    """torch's SGD update of one tensor, in place (torch 2.13's ``_single_tensor_sgd`` with
    dampening 0, no Nesterov, not maximize: its operations in its order).

    Parameters
    ----------
    param : Tensor
        The weights, updated in place (under ``torch.no_grad``, as torch steps).
    grad : Tensor
        Their gradient.
    buf : Tensor or None
        The momentum buffer, updated in place; None before the first step (a new buffer is
        then the decayed gradient's ``detach().clone()``). Ignored without momentum.
    lr, momentum, weight_decay : float
        The update's settings.
    grad_is_scratch : bool, default False
        `grad` may be overwritten: weight decay is added into it rather than into a new tensor
        (the same values; torch leaves ``param.grad`` as it was, so only a caller that owns
        `grad` may say so).

    Returns
    -------
    Tensor or None
        The momentum buffer after the step (`buf`, or the new one); None without momentum.
    """
    if weight_decay != 0:
        if grad_is_scratch:
            grad = grad.add_(param, alpha=weight_decay)
        else:
            grad = grad.add(param, alpha=weight_decay)
    if momentum != 0:
        if buf is None:
            buf = grad.detach().clone()
        else:
            buf.mul_(momentum).add_(grad)
        grad = buf
    param.add_(grad, alpha=-lr)
    return buf


@dataclass(frozen=True)
class FunctionalSGD(StepFirst):
    """``torch.optim.SGD(lr, momentum, weight_decay)`` (dampening 0, no Nesterov), stacked.

    torch's update, per parameter: ``g = grad + wd * p``; the momentum buffer is ``g.clone()``
    on the parameter's first step and ``buf * momentum + g`` afterwards; ``p -= lr * buf``. The
    buffer exists per parameter only after a step, so a per-client flag says whether it has
    been created (torch's state dict then holds ``{"momentum_buffer": buf}`` for that index).
    """

    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0

    def init(self, params: Params) -> dict[str, Any]:
        return self.from_torch([{} for _ in range(num_clients(params))], params)

    def step(
        self, params: Params, grads: Params, state: dict[str, Any], active: Tensor
    ) -> tuple[Params, dict[str, Any]]:
        new_params, bufs, has = {}, {}, {}
        # On a CPU, where reading a flag costs nothing, a step of every client skips the masks
        # (each a pass over the stack); the values are the same.
        every = active.device.type == "cpu" and bool(active.all())
        for i, (name, p) in enumerate(params.items()):
            act = _per_client(active, p)
            g = grads[name]
            if self.weight_decay != 0:
                g = torch.add(g, p, alpha=self.weight_decay)
            if self.momentum != 0:
                started = state["has_buffer"][i]
                buf = state["momentum_buffer"][i]
                # First step: buf = g (torch clones the gradient); later: buf * m + g.
                if every and bool(started.all()):
                    upd = bufs[i] = buf.mul(self.momentum).add_(g)
                else:
                    upd = torch.where(_per_client(started, p), buf.mul(self.momentum).add(g), g)
                    bufs[i] = torch.where(act, upd, buf)
                has[i] = started | active
                g = upd
            step = torch.add(p, g, alpha=-self.lr)
            new_params[name] = step if every else torch.where(act, step, p)
        if self.momentum != 0:
            state = {"momentum_buffer": bufs, "has_buffer": has}
        return new_params, state

    def step_in_place(
        self, params: Params, grads: Params, state: dict[str, Any], active: Tensor
    ) -> bool:
        # Only where `step` takes its unmasked path: on a CPU, every client stepping, and
        # every momentum buffer already created (from a client's second step on).
        if active.device.type != "cpu" or not bool(active.all()):
            return False
        if self.momentum != 0 and not all(bool(h.all()) for h in state["has_buffer"].values()):
            return False
        with torch.no_grad():
            for i, (name, p) in enumerate(params.items()):
                sgd_update_(
                    p,
                    grads[name],
                    state["momentum_buffer"][i] if self.momentum != 0 else None,
                    lr=self.lr,
                    momentum=self.momentum,
                    weight_decay=self.weight_decay,
                    grad_is_scratch=True,
                )
        return True

    def from_torch(
        self, client_states: Sequence[dict[int, dict[str, Tensor]]], params: Params
    ) -> dict[str, Any]:
        if self.momentum == 0:
            return {}  # torch keeps no state for plain SGD
        bufs, has = {}, {}
        for i, p in enumerate(params.values()):
            flags = [s.get(i, {}).get("momentum_buffer") is not None for s in client_states]
            rows = [
                s[i]["momentum_buffer"] if flag else torch.zeros(p.shape[1:])
                for s, flag in zip(client_states, flags, strict=True)
            ]
            bufs[i] = torch.stack(rows).to(device=p.device, dtype=p.dtype)
            has[i] = torch.tensor(flags, dtype=torch.bool, device=p.device)
        return {"momentum_buffer": bufs, "has_buffer": has}

    def to_torch(self, state: dict[str, Any], k: int) -> dict[int, dict[str, Tensor]]:
        if self.momentum == 0:
            return {}
        return {
            i: {"momentum_buffer": buf[k].detach().clone()}
            for i, buf in state["momentum_buffer"].items()
            if bool(state["has_buffer"][i][k])
        }


class ParamSGD:
    """``torch.optim.SGD(params, lr, momentum, weight_decay)`` on CPU parameters, without
    ``torch.optim`` (dampening 0, no Nesterov, not maximize).

    The same update as torch's on the CPU, bit for bit (`sgd_update_`, one parameter after
    another as torch's single-tensor path steps them), and the part of torch's optimizer
    interface that fedkd uses: `param_groups` (one group, with torch's keys), `state` (per
    parameter, ``{"momentum_buffer": buf}`` once it has stepped), `zero_grad`, `step`,
    `state_dict` and `load_state_dict`, in torch's format: a state written by either loads
    into the other. It is not a ``torch.optim.Optimizer``, so what insists on one (Opacus's
    DP-SGD, torch's learning-rate schedulers) takes ``torch.optim.SGD`` instead
    (`fedkd.learner.loop.make_optimizer`).

    Parameters
    ----------
    params : iterable of Tensor
        The parameters to optimise (leaf tensors on the CPU).
    lr : float
        Learning rate.
    momentum : float, default 0.0
        Momentum factor.
    weight_decay : float, default 0.0
        L2 penalty factor (added to the gradient).
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        params = list(params)
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        # torch.optim.SGD's defaults, in its order: the keys of its saved param_groups.
        self.defaults: dict[str, Any] = {
            "lr": lr,
            "momentum": momentum,
            "dampening": 0,
            "weight_decay": weight_decay,
            "nesterov": False,
            "maximize": False,
            "foreach": None,
            "differentiable": False,
            "fused": None,
        }
        self.param_groups: list[dict[str, Any]] = [{"params": params, **self.defaults}]
        self.state: defaultdict[Tensor, dict[str, Any]] = defaultdict(dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the parameters' gradients (`set_to_none`) or zero them, as torch does."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                    continue
                if p.grad.grad_fn is not None:
                    p.grad.detach_()
                else:
                    p.grad.requires_grad_(False)
                p.grad.zero_()

    def step(self) -> None:
        """One update of every parameter that has a gradient (the others are skipped)."""
        with torch.no_grad():
            for group in self.param_groups:
                momentum = group["momentum"]
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    # torch creates a parameter's state entry at its first step with a
                    # gradient, and only with momentum: the order of `state_dict()["state"]`.
                    state = self.state[p] if momentum != 0 else {}
                    buf = sgd_update_(
                        p,
                        p.grad,
                        state.get("momentum_buffer"),
                        lr=group["lr"],
                        momentum=momentum,
                        weight_decay=group["weight_decay"],
                    )
                    if momentum != 0:
                        state["momentum_buffer"] = buf

    def state_dict(self) -> dict[str, Any]:
        """torch's ``Optimizer.state_dict``: ``{"state": {index: ...}, "param_groups": [...]}``
        with parameters as their indices (the state's tensors are the live ones, as torch's)."""
        index: dict[int, int] = {}
        groups, start = [], 0
        for group in self.param_groups:  # torch's numbering (Optimizer.state_dict's pack_group)
            packed = {k: v for k, v in group.items() if k != "params"}
            index.update(
                {id(p): i for i, p in enumerate(group["params"], start) if id(p) not in index}
            )
            packed["params"] = [index[id(p)] for p in group["params"]]
            start += len(packed["params"])
            groups.append(packed)
        state = {(index[id(k)] if isinstance(k, Tensor) else k): v for k, v in self.state.items()}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state written by `state_dict` or by ``torch.optim.SGD.state_dict``.

        As torch's: the groups must have as many parameters as this optimizer's; state tensors
        take their parameter's device and floating dtype (no copy where they have them).

        Raises
        ------
        ValueError
            The groups do not match, or they ask for what `ParamSGD` does not do (dampening,
            Nesterov momentum, maximising).
        """
        saved_groups = copy.deepcopy(state_dict["param_groups"])
        if [len(g["params"]) for g in saved_groups] != [
            len(g["params"]) for g in self.param_groups
        ]:
            raise ValueError("loaded state dict's parameter groups do not match the optimizer's")
        for g in saved_groups:
            if g.get("dampening", 0) != 0 or g.get("nesterov") or g.get("maximize"):
                raise ValueError(
                    "ParamSGD does not do dampening, Nesterov momentum or maximize: "
                    "load this state into torch.optim.SGD"
                )
        id_map = {
            saved: p
            for sg, g in zip(saved_groups, self.param_groups, strict=True)
            for saved, p in zip(sg["params"], g["params"], strict=True)
        }
        state: defaultdict[Tensor, dict[str, Any]] = defaultdict(dict)
        for k, v in state_dict["state"].items():
            if k not in id_map:
                state[k] = v  # kept as is, as torch keeps it
                continue
            p = id_map[k]
            state[p] = {
                key: _like_param(value, p) if isinstance(value, Tensor) else value
                for key, value in v.items()
            }
        for sg, g in zip(saved_groups, self.param_groups, strict=True):
            sg["params"] = g["params"]
            # What torch.optim.SGD sets on a loaded group that lacks them (its __setstate__).
            for key, default in (
                ("nesterov", False),
                ("maximize", False),
                ("foreach", None),
                ("differentiable", False),
                ("fused", False),
            ):
                sg.setdefault(key, default)
        self.state = state
        self.param_groups = saved_groups


def _like_param(value: Tensor, param: Tensor) -> Tensor:
    """A loaded state tensor on `param`'s device (and in its dtype, where both are floating),
    as ``torch.optim.Optimizer.load_state_dict`` casts it."""
    if param.is_floating_point():
        return value.to(dtype=param.dtype, device=param.device)
    return value.to(device=param.device)


@dataclass(frozen=True)
class FunctionalAdam(StepFirst):
    """``torch.optim.Adam(lr, weight_decay)`` with default betas and eps, no AMSGrad, stacked.

    torch's update (single-tensor path), per parameter: ``step += 1``; ``g = grad + wd * p``;
    ``m = lerp(m, g, 1 - b1)``; ``v = v * b2 + (1 - b2) * g * g``;
    ``p += -(lr / (1 - b1^step)) * m / (sqrt(v) / sqrt(1 - b2^step) + eps)``. The bias
    corrections use each client's own step count (in float64, as torch does in Python), so
    clients with different numbers of steps stay exact. State per parameter index in torch's
    format: ``{"step": float32 scalar, "exp_avg", "exp_avg_sq"}``, absent before the first step.
    """

    lr: float
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def init(self, params: Params) -> dict[str, Any]:
        return self.from_torch([{} for _ in range(num_clients(params))], params)

    def step(
        self, params: Params, grads: Params, state: dict[str, Any], active: Tensor
    ) -> tuple[Params, dict[str, Any]]:
        new_params: Params = {}
        new_state: dict[str, dict[int, Tensor]] = {"step": {}, "exp_avg": {}, "exp_avg_sq": {}}
        for i, (name, p) in enumerate(params.items()):
            act = _per_client(active, p)
            steps = state["step"][i] + active.to(torch.float64)
            g = grads[name]
            if self.weight_decay != 0:
                g = torch.add(g, p, alpha=self.weight_decay)
            m = torch.lerp(state["exp_avg"][i], g, 1 - self.beta1)
            v = state["exp_avg_sq"][i].mul(self.beta2).addcmul(g, g, value=1 - self.beta2)
            # Inactive clients may still be at step 0; clamp so their (discarded) update is finite.
            safe = steps.clamp(min=1)
            step_size = self.lr / (1 - self.beta1**safe)
            bc2_sqrt = (1 - self.beta2**safe).sqrt()
            denom = (v.sqrt() / _per_client(bc2_sqrt.to(p.dtype), p)).add(self.eps)
            # addcdiv computes p + (m * value) / denom, the order torch's kernel uses.
            upd = torch.addcdiv(p, m * _per_client((-step_size).to(p.dtype), p), denom)
            new_params[name] = torch.where(act, upd, p)
            new_state["step"][i] = steps
            new_state["exp_avg"][i] = torch.where(act, m, state["exp_avg"][i])
            new_state["exp_avg_sq"][i] = torch.where(act, v, state["exp_avg_sq"][i])
        return new_params, new_state

    def from_torch(
        self, client_states: Sequence[dict[int, dict[str, Tensor]]], params: Params
    ) -> dict[str, Any]:
        state: dict[str, dict[int, Tensor]] = {"step": {}, "exp_avg": {}, "exp_avg_sq": {}}
        for i, p in enumerate(params.values()):
            zeros = torch.zeros(p.shape[1:])
            entries = [s.get(i) for s in client_states]
            state["step"][i] = torch.tensor(
                [float(e["step"]) if e else 0.0 for e in entries],
                dtype=torch.float64,
                device=p.device,
            )
            for key in ("exp_avg", "exp_avg_sq"):
                rows = [e[key] if e else zeros for e in entries]
                state[key][i] = torch.stack(rows).to(device=p.device, dtype=p.dtype)
        return state

    def to_torch(self, state: dict[str, Any], k: int) -> dict[int, dict[str, Tensor]]:
        out = {}
        for i, steps in state["step"].items():
            step = float(steps[k])
            if step == 0:
                continue  # torch creates the state lazily at the first step
            out[i] = {
                "step": torch.tensor(step, dtype=torch.float32),
                "exp_avg": state["exp_avg"][i][k].detach().clone(),
                "exp_avg_sq": state["exp_avg_sq"][i][k].detach().clone(),
            }
        return out


def functional_optimizer(cfg: OptimConfig) -> FunctionalSGD | FunctionalAdam:
    """The functional twin of `fedkd.learner.loop.make_optimizer`."""
    if cfg.optimizer == "adam":
        return FunctionalAdam(lr=cfg.lr, weight_decay=cfg.weight_decay)
    return FunctionalSGD(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def num_clients(params: Params) -> int:
    """K, the number of clients stacked in `params`."""
    return next(iter(params.values())).shape[0]


def state_prefix(state: dict[str, Any], a: int) -> dict[str, Any]:
    """An optimizer state (``{key: {param index: (K, ...)}}``) of the first `a` clients (views)."""
    return {key: {i: t[:a] for i, t in per_param.items()} for key, per_param in state.items()}


def write_state_prefix(state: dict[str, Any], new: dict[str, Any], a: int) -> None:
    """Write `new`, the state of the first `a` clients, into `state` in place."""
    for key, per_param in new.items():
        for i, t in per_param.items():
            state[key][i][:a] = t


__all__ = [
    "FunctionalAdam",
    "FunctionalOptimizer",
    "FunctionalSGD",
    "ParamSGD",
    "Params",
    "StepFirst",
    "functional_optimizer",
    "num_clients",
    "sgd_update_",
    "state_prefix",
    "write_state_prefix",
]
