"""The server student: a global model distilled from the teacher on the proxy set."""

from __future__ import annotations

import numpy as np
import torch

from fedkd.learner.loop import (
    PHASE_SERVER,
    StepConfig,
    accuracy,
    distill,
    init_student,
    make_optimizer,
    predict_logits,
    seeded_generator,
    train_supervised,
)


class ServerStudent:
    """A model the server trains from teacher logits (or, for the centralized bound, labels).

    Parameters
    ----------
    arch : str
        Architecture from the model zoo.
    input_shape, num_classes
        Shape of one input and number of classes.
    seed : int
        Run seed; the student's init and shuffling derive from it.
    step : StepConfig
        Epochs, batch size and optimizer for one round of distillation.
    temperature : float, default 1.0
        Distillation temperature (KL with the T^2 factor).
    distill_on : {"round", "seen"}, default "round"
        Distill on this round's proxy subset only, or on every proxy input labelled so far
        (each with its most recent teacher output).
    proxy_size : int, default 0
        Size of the proxy set (needed for ``distill_on="seen"``).
    augment_shift : int, default 0
        Random translations of up to this many pixels of the training images (0 = none).
    """

    def __init__(
        self,
        arch: str,
        input_shape: tuple[int, ...],
        num_classes: int,
        seed: int,
        step: StepConfig,
        temperature: float = 1.0,
        distill_on: str = "round",
        proxy_size: int = 0,
        augment_shift: int = 0,
    ) -> None:
        self.arch = arch
        self.seed = seed
        self.step = step
        self.temperature = temperature
        self.distill_on = distill_on
        self.augment_shift = augment_shift
        self._shape = (input_shape, num_classes)
        self.reset()
        self._labels = torch.zeros(proxy_size, num_classes)
        self._seen = torch.zeros(proxy_size, dtype=torch.bool)

    def reset(self) -> None:
        """Back to the initial weights and a fresh optimizer (same seed: same init)."""
        input_shape, num_classes = self._shape
        self.model = init_student(self.arch, input_shape, num_classes, self.seed, -1, PHASE_SERVER)
        self.opt = make_optimizer(
            self.model.parameters(),
            self.step.optim,
            torch_optimizer=self.step.lr_schedule != "constant",  # torch's scheduler runs it
        )

    def fit(
        self, round_num: int, proxy_x: np.ndarray, proxy_idx: np.ndarray, teacher_logits: np.ndarray
    ) -> dict[str, float]:
        """One round of distillation from the teacher's logits on `proxy_x[proxy_idx]`."""
        gen = seeded_generator(self.seed, round_num, -1, PHASE_SERVER)
        idx = torch.as_tensor(proxy_idx, dtype=torch.long)
        teacher = torch.as_tensor(teacher_logits, dtype=torch.float32)
        if self.distill_on == "seen":
            self._labels[idx] = teacher
            self._seen[idx] = True
            idx = self._seen.nonzero().squeeze(1)
            teacher = self._labels[idx]
        x = torch.from_numpy(np.ascontiguousarray(proxy_x))[idx]
        return distill(
            self.model,
            self.opt,
            x,
            teacher,
            self.step,
            gen,
            "kl",
            self.temperature,
            augment_shift=self.augment_shift,
        )

    def fit_labels(self, round_num: int, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        """One round of supervised training (the centralized reference: the clients' round
        `round_num` epochs)."""
        gen = seeded_generator(self.seed, round_num, -1, PHASE_SERVER)
        step = self.step.for_round(round_num)
        return train_supervised(
            self.model, self.opt, x, y, step, gen, augment_shift=self.augment_shift
        )

    def fit_self_training(
        self,
        round_num: int,
        x_labelled: np.ndarray,
        y_labelled: np.ndarray,
        x_unlabelled: np.ndarray,
        confidence: float,
        iterations: int = 1,
    ) -> int:
        """From initial weights: fit the labels; then, `iterations` times, label the unlabelled
        inputs this student is at least `confidence` sure of and fit both (confidence 0: no
        self-training). Returns how many inputs the student labelled itself in the last fit."""
        self.reset()
        self.fit_labels(round_num, x_labelled, y_labelled)
        pseudo_labelled = 0
        if confidence <= 0 or len(x_unlabelled) == 0:
            return pseudo_labelled
        for _ in range(iterations):
            conf, pseudo = torch.softmax(self.logits(x_unlabelled), dim=1).max(dim=1)
            keep = (conf >= confidence).numpy()
            if not keep.any():
                break
            x = np.concatenate([x_labelled, x_unlabelled[keep]])
            y = np.concatenate([y_labelled, pseudo.numpy()[keep]])
            self.fit_labels(round_num, x, y)
            pseudo_labelled = int(keep.sum())
        return pseudo_labelled

    def logits(self, x: np.ndarray) -> torch.Tensor:
        return predict_logits(self.model, x)

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        return accuracy(self.logits(x), y)
