"""Functional optimizers: ``torch.optim.SGD`` and ``torch.optim.Adam`` on stacked weights.

The vectorised learner keeps the weights of K clients stacked along a leading client dimension
and steps them all at once. These optimizers compute torch's own update, operation for
operation, on such stacks, with a per-client mask (a client without a batch at a step keeps its
weights and state), and convert their state to and from torch's ``Optimizer.state_dict``
format, so a client's optimizer state is the same whichever learner wrote it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

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
                g = grads[name]
                if self.weight_decay != 0:
                    g = g.add_(p, alpha=self.weight_decay)
                if self.momentum != 0:
                    g = state["momentum_buffer"][i].mul_(self.momentum).add_(g)
                p.add_(g, alpha=-self.lr)
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
    "Params",
    "StepFirst",
    "functional_optimizer",
    "num_clients",
    "state_prefix",
    "write_state_prefix",
]
