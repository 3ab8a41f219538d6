"""``resources.learner = "auto"``: the faster cohort learner, from a short calibration.

The loop (`fedkd.learner.cohort.CohortLearner`) and the vectorised learner
(`fedkd.learner.vectorised.VectorisedCohortLearner`) compute the same numbers up to float
rounding, at speeds that depend on the architecture, the input shape, the batch size and the
device. `choose_learner` times rounds of private training of each (after a warm-up round),
alternating between the two, on synthetic inputs of the run's shape, with a node's number of
clients and the run's batch size, through the learners' own ``train_private``, and picks the
one whose fastest round is faster. The run layer
calls it once per run, before the engine starts, and sends the choice to every node, so that
all nodes of a run use the same learner (a choice per node could differ between nodes, and a
choice per round between rounds).

A calibration is cached per machine in the data cache's folder (`fedkd.data.cache.cache_dir`),
keyed by everything its timing depends on (architecture, input shape, classes, batch size,
optimizer, DP-SGD or not, clients, device name, torch version, CPU count, torch threads), so
that repeated runs on a machine make the same choice. ``FEDKD_LEARNER_CALIBRATION=fresh``
neither reads nor writes the cache (each run calibrates again).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedkd.data.cache import cache_dir
from fedkd.data.splits import ClientData, FederatedData
from fedkd.learner.cohort import CohortConfig, CohortLearner
from fedkd.learner.device import set_up_torch
from fedkd.learner.loop import StepConfig
from fedkd.learner.vectorised import VectorisedCohortLearner
from fedkd.privacy.dpsgd import DpSgdSettings
from fedkd.provenance import cpu_id, cpu_model

__all__ = [
    "CALIBRATION_ENV",
    "LEARNER_CHOICES",
    "CalibrationTask",
    "calibrate",
    "choose_learner",
]

# The learners "auto" chooses between.
LEARNER_CHOICES = ("loop", "vectorised")
# ``fresh``: calibrate again, and leave the cache as it is.
CALIBRATION_ENV = "FEDKD_LEARNER_CALIBRATION"
# Steps each synthetic client takes in the timed round (and in the warm-up round before it).
# Enough that the per-step cost outweighs a round's fixed costs (state loads, stacking), which
# with 2 steps ranked the learners the wrong way round for cnn_small (results/scale.md).
CALIBRATION_STEPS = 8
# Timed rounds per learner, alternating between the learners; each learner's fastest counts.
# One timed round under load ranked the learners differently from one calibration to the next
# (vectorised / loop 0.93x, 0.84x, 0.62x for cnn_small against the 0.8 margin:
# results/scale.md); the fastest of several alternating rounds is what the learner costs when
# nothing else takes the CPU, and a burst of load slows one round of one learner, not the choice.
CALIBRATION_REPEATS = 3
# At most this many clients per calibration: enough to show the vectorised learner's gain,
# few enough to keep the calibration short.
MAX_CALIBRATION_CLIENTS = 8
# Bumped when what a calibration measures changes, so that older cache entries are not read.
_CACHE_VERSION = 4  # 2: grouped convolutions on a CPU; 3: 8 steps; 4: fastest of 3 rounds

Timer = Callable[[], float]


@dataclass(frozen=True)
class CalibrationTask:
    """What one calibration times: one architecture on one device, as a run trains it.

    Attributes
    ----------
    arch : str
        The student architecture (`fedkd.models.zoo`).
    input_shape : tuple of int
        One input's shape, channels first.
    num_classes : int
        Number of classes.
    step : StepConfig
        The run's private training step (batch size, optimizer); one epoch is timed.
    dp : DpSgdSettings or None
        DP-SGD as the run sets it (its noise level does not change the cost), or None.
    clients : int
        Clients trained together, as on one node of the run.
    device : str
        ``cpu`` or ``cuda``: where the run's nodes train.
    threads : int
        Torch intra-op threads of the run's nodes.
    """

    arch: str
    input_shape: tuple[int, ...]
    num_classes: int
    step: StepConfig
    dp: DpSgdSettings | None
    clients: int
    device: str
    threads: int

    @property
    def timed_clients(self) -> int:
        """The clients the calibration trains: the node's, at most `MAX_CALIBRATION_CLIENTS`."""
        return max(1, min(self.clients, MAX_CALIBRATION_CLIENTS))


def _device_name(device: str) -> str:
    """The device's model: the GPU's name, or the CPU's (``/proc/cpuinfo``) where known."""
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return cpu_model()


def _cache_key(task: CalibrationTask) -> dict[str, Any]:
    optim = task.step.optim
    return {
        "version": _CACHE_VERSION,
        "arch": task.arch,
        "input_shape": list(task.input_shape),
        "num_classes": task.num_classes,
        "batch_size": task.step.batch_size,
        "optimizer": optim.optimizer,
        "momentum": optim.momentum > 0,
        "dpsgd": task.dp is not None,
        "clients": task.timed_clients,
        "steps": CALIBRATION_STEPS,
        "repeats": CALIBRATION_REPEATS,
        "device": task.device,
        "device_name": _device_name(task.device),
        # A virtual machine's model name can hide another CPU generation (provenance.cpu_id).
        "cpu_id": cpu_id(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "threads": task.threads,
    }


def _cache_path(key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return cache_dir() / f"learner-calibration-{digest}.json"


def _read_cached(path: Path) -> dict[str, float] | None:
    try:
        saved = json.loads(path.read_text())
        return {name: float(saved[f"{name}_s"]) for name in LEARNER_CHOICES}
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not cached yet, or unreadable: calibrate


def _write_cached(path: Path, key: dict[str, Any], seconds: dict[str, float]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**key, **{f"{n}_s": s for n, s in seconds.items()}}))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home is no reason to fail a run


def _synthetic_data(task: CalibrationTask) -> FederatedData:
    """`timed_clients` clients of `CALIBRATION_STEPS` full batches of seeded random inputs."""
    rng = np.random.default_rng(0)
    rows = CALIBRATION_STEPS * task.step.batch_size
    empty_x = np.zeros((0, *task.input_shape), np.float32)
    empty_y = np.zeros(0, np.int64)
    clients = [
        ClientData(
            client_id=cid,
            x_train=rng.standard_normal((rows, *task.input_shape), dtype=np.float32),
            y_train=rng.integers(0, task.num_classes, rows, dtype=np.int64),
            x_local_test=empty_x,
            y_local_test=empty_y,
        )
        for cid in range(task.timed_clients)
    ]
    return FederatedData(
        dataset_name="calibration",
        num_classes=task.num_classes,
        input_shape=tuple(task.input_shape),
        proxy_x=empty_x,
        proxy_y=None,
        test_x=empty_x,
        test_y=empty_y,
        clients=clients,
    )


def _time_learners(task: CalibrationTask, timer: Timer) -> dict[str, float]:
    """Seconds of the fastest of `CALIBRATION_REPEATS` rounds of each learner's
    ``train_private`` on the synthetic clients, after a warm-up round of each.

    The learners' timed rounds alternate (loop first in even repeats, vectorised first in odd
    ones), so that load that comes and goes falls on both alike.
    """
    data = _synthetic_data(task)
    dp = task.dp
    if dp is not None:  # the noise level costs nothing: skip its calibration to a target
        dp = DpSgdSettings(max_grad_norm=dp.max_grad_norm, delta=dp.delta, noise_multiplier=1.0)
    config = CohortConfig(
        seed=0,
        arch_of=lambda cid: task.arch,
        private=replace(task.step, epochs=1, epochs_schedule=()),
        distill=replace(task.step, epochs=1, epochs_schedule=()),
        dp=dp,
    )
    learners: dict[str, CohortLearner] = {
        "loop": CohortLearner(data, config, {}),
        "vectorised": VectorisedCohortLearner(data, config, {}, device=task.device),
    }
    cids = list(range(task.timed_clients))
    for learner in learners.values():
        learner.train_private(1, cids)  # warm-up: first calls, allocations, compiled kernels
    fastest = dict.fromkeys(LEARNER_CHOICES, float("inf"))
    for repeat in range(CALIBRATION_REPEATS):
        order = LEARNER_CHOICES if repeat % 2 == 0 else LEARNER_CHOICES[::-1]
        for name in order:
            started = timer()
            learners[name].train_private(2 + repeat, cids)
            fastest[name] = min(fastest[name], timer() - started)
    return fastest


def calibrate(
    task: CalibrationTask, *, use_cache: bool = True, timer: Timer = time.perf_counter
) -> dict[str, Any]:
    """Seconds of one round of private training with each learner, from the cache or timed.

    Parameters
    ----------
    task : CalibrationTask
        The architecture, shapes, step and device to time.
    use_cache : bool, default True
        Read and write the machine's cache; also off when ``FEDKD_LEARNER_CALIBRATION=fresh``.
    timer : callable, default time.perf_counter
        The clock (wall seconds).

    Returns
    -------
    dict
        ``loop_s``, ``vectorised_s`` (seconds of each learner's fastest timed round),
        ``clients``, ``steps``, ``repeats``, ``batch_size``, ``device`` and ``cached``
        (whether the figures came from the cache).
    """
    use_cache = use_cache and os.environ.get(CALIBRATION_ENV, "") != "fresh"
    key = _cache_key(task)
    path = _cache_path(key)
    seconds = _read_cached(path) if use_cache else None
    cached = seconds is not None
    if seconds is None:
        threads = torch.get_num_threads()
        # As the run's nodes train: their threads, subnormals flushed (the flush stays set:
        # it changes no number of normal magnitude, and the server sets it anyway).
        set_up_torch(task.threads)
        try:
            seconds = _time_learners(task, timer)
        finally:
            torch.set_num_threads(threads)
        if use_cache:
            _write_cached(path, key, seconds)
    return {
        **{f"{name}_s": s for name, s in seconds.items()},
        "clients": key["clients"],
        "steps": CALIBRATION_STEPS,
        "repeats": CALIBRATION_REPEATS,
        "batch_size": task.step.batch_size,
        "device": task.device,
        "cached": cached,
    }


# The vectorised learner is chosen only below this fraction of the loop's calibrated time
# (results/scale.md: a calibration 10% in its favour came with full rounds 17% slower).
VECTORISED_MARGIN = 0.8


def choose_learner(
    tasks: list[CalibrationTask], *, use_cache: bool = True, timer: Timer = time.perf_counter
) -> tuple[str, dict[str, dict[str, Any]]]:
    """The faster learner for a run that trains `tasks` (one per architecture), and each
    task's calibration.

    One choice for the whole run: the vectorised learner where its time summed over the
    architectures (a node's learner trains all of them) is below `VECTORISED_MARGIN` times the
    loop's, else the loop. Nodes of one client have nothing to
    vectorise: the loop, with no calibration.

    Returns
    -------
    tuple
        The chosen learner (one of `LEARNER_CHOICES`), and `calibrate`'s result per
        architecture (empty when nothing was calibrated).
    """
    if all(task.clients <= 1 for task in tasks):
        return "loop", {}
    calibrations = {task.arch: calibrate(task, use_cache=use_cache, timer=timer) for task in tasks}
    totals = {name: sum(c[f"{name}_s"] for c in calibrations.values()) for name in LEARNER_CHOICES}
    # The calibration trains equal synthetic clients for a few steps; a real round adds costs
    # that fall on the vectorised learner (stacking and unstacking states, gathering unequal
    # clients' batches), so it must win by a margin. Otherwise (ties included) the reference.
    chosen = "vectorised" if totals["vectorised"] < VECTORISED_MARGIN * totals["loop"] else "loop"
    return chosen, calibrations
