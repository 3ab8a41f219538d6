"""Distillation losses between a student's logits and a teacher.

Pure tensor functions: they work on any device and dtype and are differentiable with respect to
the student's logits (also under ``torch.func.grad``/``vmap``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

DISTILL_LOSSES: tuple[str, ...] = ("kl", "mae", "mse")


def _check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not t > 0.0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return t


def _check_pair(student: Tensor, other: Tensor, other_name: str) -> None:
    if student.dim() != 2:
        raise ValueError(f"student_logits must have shape (N, C), got {tuple(student.shape)}")
    if student.shape != other.shape:
        raise ValueError(
            f"student_logits {tuple(student.shape)} and {other_name} {tuple(other.shape)} "
            "must have the same shape"
        )


def soft_targets(teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Teacher probabilities at temperature ``T``: ``softmax(teacher_logits / T)``.

    Parameters
    ----------
    teacher_logits : Tensor
        Shape ``(N, C)``.
    temperature : float, default 1.0
        Softening temperature, positive; ``T > 1`` flattens the distribution.

    Returns
    -------
    Tensor
        Shape ``(N, C)``, rows sum to one.
    """
    t = _check_temperature(temperature)
    return torch.softmax(teacher_logits / t, dim=-1)


def kl_distillation_loss(
    student_logits: Tensor, target_probs: Tensor, temperature: float = 1.0
) -> Tensor:
    """Hinton distillation loss ``T^2 * KL(target || softmax(student / T))``, batch mean.

    The ``T^2`` factor keeps the gradient with respect to the student's logits of the same order
    for every temperature (the softened softmax scales gradients by ``1/T^2``).

    Parameters
    ----------
    student_logits : Tensor
        Shape ``(N, C)``.
    target_probs : Tensor
        Shape ``(N, C)``, rows on the simplex, already at temperature ``T`` (see
        :func:`soft_targets`). Exact zeros are allowed.
    temperature : float, default 1.0
        Distillation temperature, positive.

    Returns
    -------
    Tensor
        Scalar: sum over classes, mean over the batch (``'batchmean'``).
    """
    t = _check_temperature(temperature)
    _check_pair(student_logits, target_probs, "target_probs")
    log_q = torch.log_softmax(student_logits / t, dim=-1)
    # xlogy(0, 0) = 0, so zero-probability targets contribute nothing instead of 0 * -inf = NaN.
    kl = torch.special.xlogy(target_probs, target_probs) - target_probs * log_q
    return kl.sum(dim=-1).mean() * (t * t)


def mae_logit_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Mean absolute error between logits, FedMD's digest loss.

    Parameters
    ----------
    student_logits, teacher_logits : Tensor
        Shape ``(N, C)``.

    Returns
    -------
    Tensor
        Scalar ``mean(|s - t|)`` over all ``N * C`` entries.
    """
    _check_pair(student_logits, teacher_logits, "teacher_logits")
    return (student_logits - teacher_logits).abs().mean()


def mse_logit_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Mean squared error between logits.

    Parameters
    ----------
    student_logits, teacher_logits : Tensor
        Shape ``(N, C)``.

    Returns
    -------
    Tensor
        Scalar ``mean((s - t)^2)`` over all ``N * C`` entries.
    """
    _check_pair(student_logits, teacher_logits, "teacher_logits")
    return F.mse_loss(student_logits, teacher_logits)


def distillation_loss(
    kind: str, student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0
) -> Tensor:
    """Distillation loss of the given kind, from teacher *logits*.

    Parameters
    ----------
    kind : str
        ``"kl"``: :func:`kl_distillation_loss` against ``soft_targets(teacher_logits, T)``;
        ``"mae"`` / ``"mse"``: on the raw logits (``temperature`` ignored).
    student_logits, teacher_logits : Tensor
        Shape ``(N, C)``. Teachers built in probability space are log-probabilities, which are
        valid logits.
    temperature : float, default 1.0
        Temperature for ``"kl"``.

    Returns
    -------
    Tensor
        Scalar loss.

    Raises
    ------
    ValueError
        Unknown ``kind``, mismatched shapes or a non-positive temperature.
    """
    if kind == "kl":
        _check_pair(student_logits, teacher_logits, "teacher_logits")
        return kl_distillation_loss(
            student_logits, soft_targets(teacher_logits, temperature), temperature
        )
    if kind == "mae":
        return mae_logit_loss(student_logits, teacher_logits)
    if kind == "mse":
        return mse_logit_loss(student_logits, teacher_logits)
    raise ValueError(
        f"unknown distillation loss {kind!r}; choose one of {', '.join(DISTILL_LOSSES)}"
    )
