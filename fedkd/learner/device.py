"""What the vectorised learner keeps on its device, once per process.

The device itself (CUDA when Ray assigned one), the numerics of a phase on it (fp32, TF32,
bf16), the run's data as device tensors and the model templates that ``functional_call`` runs.
Data and templates are cached per process: a Ray actor serves many nodes and rounds of the
same run, and gathering every batch straight from device memory avoids copying the data set
from the host again in each phase.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import cached_property

import numpy as np
import torch
from torch import Tensor, nn

from fedkd.data.splits import FederatedData
from fedkd.models.zoo import build_model

PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "bf16")


# -- device and precision ----------------------------------------------------------------------
def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when available (the GPU Ray assigned to this actor), else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("resources.device = 'cuda' but no CUDA device is visible here")
    return torch.device(name)


@contextlib.contextmanager
def precision_context(precision: str, device: torch.device) -> Iterator[None]:
    """Numerics for one phase: strict fp32, TF32 matmuls/convolutions, or bf16 autocast.

    The global backend flags are restored afterwards, so the setting never leaks into other
    code of the process (the server student, the loop learner).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision '{precision}' is not one of {', '.join(PRECISIONS)}")
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if precision == "bf16"
        else contextlib.nullcontext()
    )
    try:
        with autocast:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def set_up_torch(threads: int) -> None:
    """Set this thread's torch for training: `threads` intra-op threads, and subnormal floats
    flushed to zero.

    A long-lived optimizer state decays into subnormals: a momentum buffer whose gradient
    stays zero (a unit that no longer fires) shrinks by the momentum factor every step and
    passes through the subnormal range after some hundred steps, where every arithmetic
    operation on it takes a slow path of the CPU. Flushed, such a value becomes zero, which
    changes no weight of normal magnitude: a subnormal step is far below its rounding (the
    algorithm fingerprints hold the numbers). Called by every process that trains (each node
    message, the server), so that a run computes the same whether its nodes share the
    server's process or not.

    Parameters
    ----------
    threads : int
        Torch intra-op threads (``resources.torch_threads``).
    """
    torch.set_num_threads(threads)
    # A per-thread setting (the CPU's control register): set in the thread that trains. With
    # more than one intra-op thread, pool threads started before this call keep their own
    # setting; that costs speed only, never other numbers.
    torch.set_flush_denormal(True)


# -- data on the device, cached per process ----------------------------------------------------
class DeviceData:
    """A `FederatedData` as device tensors: every client's rows concatenated, plus offsets.

    Built lazily, one attribute at a time, and cached per (data, device) by `device_data`, so
    every round after the first gathers batches straight from device memory.
    """

    def __init__(self, data: FederatedData, device: torch.device) -> None:
        self.data = data
        self.device = device

    def _put(self, array: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def _concat(self, xs: list[np.ndarray], shape: tuple[int, ...]) -> Tensor:
        # np.concatenate of zero-length parts keeps their trailing shape and dtype.
        return self._put(np.concatenate(xs) if xs else np.zeros((0, *shape), np.float32))

    @staticmethod
    def _offsets(lengths: list[int]) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

    @cached_property
    def train(self) -> tuple[Tensor, Tensor, np.ndarray]:
        cs = self.data.clients
        x = self._concat([c.x_train for c in cs], self.data.input_shape)
        y = self._concat([c.y_train for c in cs], ())
        return x, y, self._offsets([len(c.y_train) for c in cs])

    def _own_rows(self, x_of: str, y_of: str) -> tuple[Tensor, Tensor, np.ndarray]:
        """One per-client slice (e.g. ``x_local_test``) of every client, concatenated."""
        cs = self.data.clients
        x = self._concat([getattr(c, x_of) for c in cs], self.data.input_shape)
        y = self._concat([getattr(c, y_of) for c in cs], ())
        return x, y, self._offsets([len(getattr(c, y_of)) for c in cs])

    @cached_property
    def local_test(self) -> tuple[Tensor, Tensor, np.ndarray]:
        return self._own_rows("x_local_test", "y_local_test")

    @cached_property
    def validation(self) -> tuple[Tensor, Tensor, np.ndarray]:
        return self._own_rows("x_val", "y_val")

    @cached_property
    def proxy_x(self) -> Tensor:
        return self._put(self.data.proxy_x)

    @cached_property
    def test_x(self) -> Tensor:
        return self._put(self.data.test_x)


_DEVICE_DATA: dict[tuple[int, str], DeviceData] = {}


def device_data(data: FederatedData, device: torch.device) -> DeviceData:
    """The process-wide `DeviceData` of `data` on `device` (the data objects are cached too)."""
    key = (id(data), str(device))
    cached = _DEVICE_DATA.get(key)
    if cached is None or cached.data is not data:
        if len(_DEVICE_DATA) >= 4:  # a process rarely sees more than one data set
            _DEVICE_DATA.pop(next(iter(_DEVICE_DATA)))
        cached = _DEVICE_DATA[key] = DeviceData(data, device)
    return cached


# -- model templates ---------------------------------------------------------------------------
_TEMPLATES: dict[tuple[str, tuple[int, ...], int, str], nn.Module] = {}


def model_template(
    arch: str, input_shape: tuple[int, ...], num_classes: int, device: torch.device
) -> nn.Module:
    """A module whose structure `functional_call` uses; its own weights are never read."""
    key = (arch, tuple(input_shape), int(num_classes), str(device))
    if key not in _TEMPLATES:
        with torch.random.fork_rng(devices=[]):
            _TEMPLATES[key] = build_model(arch, input_shape, num_classes).to(device).eval()
    return _TEMPLATES[key]


__all__ = [
    "PRECISIONS",
    "DeviceData",
    "device_data",
    "model_template",
    "precision_context",
    "resolve_device",
]
