"""The student zoo: small, DP-compatible classifiers for images and 1-D signals.

Every model takes channels-first inputs without the batch dimension in ``input_shape``:
``(C, H, W)`` for images (scikit-learn digits ``(1, 8, 8)``, MNIST ``(1, 28, 28)``) or
``(C, L)`` for 1-D signals (mnist1d ``(1, 40)``). Convolutions and pooling are picked by the
rank of ``input_shape``.

All models are usable with Opacus and ``torch.func``: no BatchNorm (GroupNorm instead), no
in-place activations or in-place tensor updates in ``forward``, no buffers, and no
data-dependent control flow.

Parameter counts, 10 classes:

===========  ===============  ==============  ==============
model        MNIST (1,28,28)  digits (1,8,8)  mnist1d (1,40)
===========  ===============  ==============  ==============
mlp                  199,210          55,210          50,410
cnn_small             52,138           6,058          11,386
cnn_small_tanh        52,138           6,058          11,386
cnn_large            611,146          58,186         128,746
resnet_gn             77,754          77,754          28,506
===========  ===============  ==============  ==============

``cnn_large`` is the FedAvg baseline model: its 611,146 float32 parameters (about 2.4 MB) are
what a weight-exchanging client uploads, against 1000 x 10 float32 logits (40 kB) for a
logit-exchanging one.

``cnn_small_tanh`` is ``cnn_small`` with tanh activations, for DP-SGD: clipped, noisy gradients
train bounded activations better than ReLU (Papernot et al. 2021, "Tempered sigmoid activations
for deep learning with differential privacy").
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import nn

MODEL_NAMES: tuple[str, ...] = ("mlp", "cnn_small", "cnn_small_tanh", "cnn_large", "resnet_gn")

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh}

# SimpleCNN's arguments per zoo name; cnn_small_tanh shares cnn_small's sizes by construction.
_CNN_SMALL: dict[str, Any] = {"widths": (8, 16), "hidden": 64}
_CNN_CONFIGS: dict[str, dict[str, Any]] = {
    "cnn_small": _CNN_SMALL,
    "cnn_small_tanh": {**_CNN_SMALL, "activation": "tanh"},
    "cnn_large": {"widths": (16, 32), "hidden": 384},
}


class ModelError(ValueError):
    """An unknown model name or an input shape a model cannot handle."""


def _conv(ndim: int) -> type[nn.Module]:
    return nn.Conv1d if ndim == 1 else nn.Conv2d


def _maxpool(ndim: int) -> type[nn.Module]:
    return nn.MaxPool1d if ndim == 1 else nn.MaxPool2d


def _avgpool(ndim: int) -> nn.Module:
    return nn.AdaptiveAvgPool1d(1) if ndim == 1 else nn.AdaptiveAvgPool2d(1)


def _check_shape(input_shape: tuple[int, ...], num_classes: int) -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) not in (2, 3):
        raise ModelError(
            f"input_shape must be (C, L) or (C, H, W) without the batch dimension, got {shape}"
        )
    if any(s < 1 for s in shape):
        raise ModelError(f"input_shape must have positive sizes, got {shape}")
    if int(num_classes) < 2:
        raise ModelError(f"num_classes must be at least 2, got {num_classes}")
    return shape


def _flat_features(features: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Size of ``features(x)`` flattened, for one example of ``input_shape``."""
    try:
        with torch.no_grad():
            out = features(torch.zeros(1, *input_shape))
    except RuntimeError as exc:
        raise ModelError(f"input_shape {input_shape} is too small for this model: {exc}") from exc
    return int(out[0].numel())


# Every zoo model's embedding (its penultimate activation, `EmbeddingOutput`) has this width.
EMBEDDING_WIDTH = 64
# Seeds the fixed projections of penultimate layers of another width.
_PROJECTION_SEED = 20220222


@functools.lru_cache(maxsize=16)
def fixed_projection(width: int, device: torch.device | None = None) -> torch.Tensor:
    """The fixed ``(width, EMBEDDING_WIDTH)`` projection of a penultimate layer of `width` units.

    A function of the width alone (same width, same matrix, in every process), drawn from its
    own generator so that building a model draws nothing from the global RNG; scaled by
    ``1 / sqrt(width)`` so that it keeps the features' scale. Cached per device.
    """
    gen = torch.Generator().manual_seed(_PROJECTION_SEED + width)
    projection = torch.randn(width, EMBEDDING_WIDTH, generator=gen) / math.sqrt(width)
    return projection.to(device) if device is not None else projection


class EmbeddingOutput(nn.Module):
    """Base of the zoo models: ``forward(x)`` gives logits, ``forward(x, embed=True)`` gives
    ``(logits, embedding)``, the embedding being the penultimate activation in
    `EMBEDDING_WIDTH` dimensions, so that embeddings of different architectures are comparable.

    Where the penultimate width differs (the MLP's 200, ``cnn_large``'s 384), it is multiplied
    by `fixed_projection`, a constant outside the module: no parameter and no buffer, so a
    model's weights, its state bytes, its optimizer, FedAvg's uploads and DP-SGD are the same
    as without it, and its logits do not depend on it. Gradients of a loss on the embedding
    flow through it into the layers below.
    """

    def _output(
        self, features: torch.Tensor, head: nn.Module, embed: bool
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        logits = head(features)
        if not embed:
            return logits
        width = features.shape[-1]
        if width != EMBEDDING_WIDTH:
            projection = fixed_projection(width, features.device)
            features = features @ projection.to(features.dtype)
        return logits, features


class MLP(EmbeddingOutput):
    """Flatten, then two hidden layers of ``hidden`` units with ReLU.

    Parameters
    ----------
    input_shape : tuple of int
        ``(C, L)`` or ``(C, H, W)``.
    num_classes : int
        Number of output logits.
    hidden : int, default 200
        Width of both hidden layers.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: int = 200) -> None:
        super().__init__()
        in_features = 1
        for s in input_shape:
            in_features *= s
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(
        self, x: torch.Tensor, embed: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if not embed:
            return self.net(x)
        return self._output(self.net[:-1](x), self.net[-1], embed)


class SimpleCNN(EmbeddingOutput):
    """Two conv3x3 + activation + max-pool stages, then a hidden linear layer.

    Parameters
    ----------
    input_shape : tuple of int
        ``(C, L)`` (1-D convolutions) or ``(C, H, W)`` (2-D convolutions).
    num_classes : int
        Number of output logits.
    widths : tuple of int
        Channels of the two convolutions.
    hidden : int
        Width of the hidden linear layer.
    activation : str, default "relu"
        ``"relu"`` or ``"tanh"``, after every convolution and the hidden layer.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        widths: tuple[int, int],
        hidden: int,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ModelError(
                f"unknown activation {activation!r}; choose one of {', '.join(_ACTIVATIONS)}"
            )
        act = _ACTIVATIONS[activation]
        ndim = len(input_shape) - 1
        conv, pool = _conv(ndim), _maxpool(ndim)
        w1, w2 = widths
        self.features = nn.Sequential(
            conv(input_shape[0], w1, kernel_size=3, padding=1),
            act(),
            pool(2),
            conv(w1, w2, kernel_size=3, padding=1),
            act(),
            pool(2),
        )
        flat = _flat_features(self.features, input_shape)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, hidden),
            act(),
            nn.Linear(hidden, num_classes),
        )

    def forward(
        self, x: torch.Tensor, embed: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if not embed:
            return self.head(self.features(x))
        return self._output(self.head[:-1](self.features(x)), self.head[-1], embed)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class BasicBlock(nn.Module):
    """ResNet basic block with GroupNorm: two conv3x3, projection shortcut on shape change.

    Parameters
    ----------
    ndim : int
        1 for signals, 2 for images.
    in_channels, out_channels : int
        Channels in and out.
    stride : int, default 1
        Stride of the first convolution and of the shortcut.
    """

    def __init__(self, ndim: int, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        conv = _conv(ndim)
        self.conv1 = conv(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _group_norm(out_channels)
        self.conv2 = conv(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = _group_norm(out_channels)
        self.act = nn.ReLU()
        self.shortcut: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                conv(in_channels, out_channels, 1, stride=stride, bias=False),
                _group_norm(out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        # Out-of-place add: Opacus hooks and torch.func need the activations left untouched.
        return self.act(out + self.shortcut(x))


class ResNetGN(EmbeddingOutput):
    """Small ResNet with GroupNorm: stem, blocks of 16, 32 (stride 2) and 64 (stride 2) channels.

    Parameters
    ----------
    input_shape : tuple of int
        ``(C, L)`` or ``(C, H, W)``.
    num_classes : int
        Number of output logits.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        ndim = len(input_shape) - 1
        conv = _conv(ndim)
        self.stem = nn.Sequential(
            conv(input_shape[0], 16, 3, padding=1, bias=False),
            _group_norm(16),
            nn.ReLU(),
        )
        self.blocks = nn.Sequential(
            BasicBlock(ndim, 16, 16),
            BasicBlock(ndim, 16, 32, stride=2),
            BasicBlock(ndim, 32, 64, stride=2),
        )
        self.pool = _avgpool(ndim)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, num_classes)

    def forward(
        self, x: torch.Tensor, embed: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self._output(self.flatten(self.pool(self.blocks(self.stem(x)))), self.fc, embed)


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build a student model from the zoo.

    Weights come from the global torch RNG, so the same ``torch.manual_seed`` gives the same
    weights.

    Parameters
    ----------
    name : str
        One of :data:`MODEL_NAMES`.
    input_shape : tuple of int
        One example's shape without the batch dimension: ``(C, L)`` or ``(C, H, W)``.
    num_classes : int
        Number of output logits.

    Returns
    -------
    torch.nn.Module
        Maps ``(N, *input_shape)`` float inputs to ``(N, num_classes)`` logits.

    Raises
    ------
    ModelError
        Unknown ``name`` or an ``input_shape`` the model cannot handle.
    """
    if name not in MODEL_NAMES:
        raise ModelError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    shape = _check_shape(input_shape, num_classes)
    num_classes = int(num_classes)
    if name == "mlp":
        return MLP(shape, num_classes)
    if name in _CNN_CONFIGS:
        return SimpleCNN(shape, num_classes, **_CNN_CONFIGS[name])
    return ResNetGN(shape, num_classes)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (elements of parameters with ``requires_grad``).

    Parameters
    ----------
    model : torch.nn.Module
        Any module.

    Returns
    -------
    int
        Total number of trainable scalars.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
