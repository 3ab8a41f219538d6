"""Proxy sets that are not carved from the private source: another data set's inputs, or
synthetic inputs.

The in-domain proxy (``source = "in_domain"``, the default) is drawn from the private source's
training split by :func:`fedkd.data.splits.build_federated_data`. Every other source is one
function of :data:`PROXY_BUILDERS`: it makes ``size`` unlabelled inputs of the private inputs'
shape, on their scale, reproducibly from a seed. None of them has labels, and none is computed
from private data: such a proxy set is public by construction (docs/proxy.md). The generator
proxy (``synthetic = "generator"``) has no fixed inputs: the server's generator makes each
round's (`fedkd.learner.generator`).

External images (scikit-learn's digits, a local ``.npz``, a Hugging Face data set's input
column) are scaled the way the private sources scale their own: brought to ``[0, 1]`` (digits'
0..16 divided by 16, ``uint8`` divided by 255, floats as given), resized to the private inputs'
shape (antialiased linear interpolation; one channel repeated to three, three averaged to one)
and standardised to zero mean and unit standard deviation with scalar statistics of their own,
as the private inputs were with the private training split's. Their own, not the private ones:
nothing of the proxy then depends on private data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedkd.data.cache import cached_arrays
from fedkd.data.sources import (
    _HF_IMAGE_KEYS,
    DataError,
    _channels_first,
    _hf_column,
    _hf_federated,
    _hf_split,
    _pick_column,
    _scale_uint8,
)

PROXY_SOURCES = ("in_domain", "digits", "npz", "hf", "synthetic")
SYNTHETIC_PROXIES = ("noise", "mixup", "generator")
NOISE_DISTRIBUTIONS = ("gaussian", "uniform")
# The generator's keys (`fedkd.learner.generator`), recorded with its proxy.
GENERATOR_KEYS = (
    "latent_dim",
    "generator_hidden",
    "generator_steps",
    "generator_lr",
    "generator_batch",
    "generator_balance",
    "generator_disagreement",
)
# The keys of each public source, recorded with a proxy of its inputs (or a mixup seed set).
PUBLIC_KEYS = {"digits": (), "npz": ("path",), "hf": ("hf_name", "hf_split", "image_key")}
# Where mixup's seed set comes from: the public image sources above.
SEED_SOURCES = ("digits", "npz", "hf")
# A seed stream of its own (splits.py uses 0, 1 and 3, site.py 2, canaries.py 101).
_PROXY_SOURCE_STREAM = 4


@dataclass(frozen=True)
class ProxySource:
    """Where the public proxy inputs come from (the spec's ``[proxy]`` table).

    Attributes
    ----------
    source : str
        One of :data:`PROXY_SOURCES`: ``"in_domain"`` (carved from the private source's training
        split), ``"digits"`` (scikit-learn's 8x8 digits), ``"npz"`` (the ``x`` array of the
        ``.npz`` at ``path``), ``"hf"`` (the input column of a Hugging Face data set, see
        ``hf_name``) or ``"synthetic"`` (see ``synthetic``).
    size : int
        Proxy inputs of a source other than ``in_domain``; 0 means ``data.proxy_size``.
    path : str
        The ``.npz`` of ``source = "npz"`` or of mixup's ``seed_source = "npz"``.
    hf_name : str
        The data set of ``source = "hf"`` or of mixup's ``seed_source = "hf"``: a hub name or a
        local folder that ``datasets.load_dataset`` reads, as ``data.hf_name``.
    hf_split : str
        ``"hf"``: the split whose inputs are read.
    image_key : str
        ``"hf"``: the input column; ``""`` detects it as ``data.image_key`` does. Labels are
        never read.
    synthetic : str
        ``source = "synthetic"``: ``"noise"``, ``"mixup"`` or ``"generator"`` (made each round
        by the server's generator, `fedkd.learner.generator`: no fixed inputs).
    noise : str
        ``"noise"``: ``"gaussian"`` or ``"uniform"``.
    noise_std : float
        ``"noise"``: standard deviation of the noise, in units of the standardised inputs.
    seed_source : str
        ``"mixup"``: where the seed set comes from, ``"digits"``, ``"npz"`` (``path``) or
        ``"hf"`` (``hf_name``).
    seed_size : int
        ``"mixup"``: examples in the seed set (at least 2).
    mixup_alpha : float
        ``"mixup"``: each input is ``lam * a + (1 - lam) * b`` of two distinct seed examples,
        with ``lam ~ Beta(mixup_alpha, mixup_alpha)``.
    latent_dim : int
        ``"generator"``: size of the generator's latents.
    generator_hidden : int
        ``"generator"``: width of its two hidden layers.
    generator_steps : int
        ``"generator"``: its training steps after each round's distillation.
    generator_lr : float
        ``"generator"``: its Adam learning rate.
    generator_batch : int
        ``"generator"``: latents per training step.
    generator_balance : float
        ``"generator"``: weight of the batch-mean prediction's entropy (class balance).
    generator_disagreement : float
        ``"generator"``: weight of the disagreement with the earlier server student.
    """

    source: str = "in_domain"
    size: int = 0
    path: str = ""
    hf_name: str = ""
    hf_split: str = "train"
    image_key: str = ""
    synthetic: str = "noise"
    noise: str = "gaussian"
    noise_std: float = 1.0
    seed_source: str = "digits"
    seed_size: int = 100
    mixup_alpha: float = 1.0
    latent_dim: int = 64
    generator_hidden: int = 128
    generator_steps: int = 50
    generator_lr: float = 0.001
    generator_batch: int = 64
    generator_balance: float = 5.0
    generator_disagreement: float = 1.0

    @property
    def in_domain(self) -> bool:
        """Whether the proxy is carved from the private source (and so has labels)."""
        return self.source == "in_domain"

    @property
    def kind(self) -> str:
        """The key of :data:`PROXY_BUILDERS` (the synthetic kind for ``"synthetic"``)."""
        return self.synthetic if self.source == "synthetic" else self.source

    def uses_file(self) -> bool:
        """Whether ``path`` is read (``npz``, or mixup seeded from ``npz``)."""
        return self.kind == "npz" or (self.kind == "mixup" and self.seed_source == "npz")

    def public_sources(self) -> tuple[str, ...]:
        """The public data sets whose inputs this proxy is made of (none for noise)."""
        if self.kind in SEED_SOURCES:
            return (self.kind,)
        return (self.seed_source,) if self.kind == "mixup" else ()

    def record(self, size: int) -> dict[str, Any]:
        """The proxy's provenance for ``summary.json``: its source, the parameters that apply
        to it and `size`, the number of proxy inputs."""
        seed_keys = PUBLIC_KEYS.get(self.seed_source, ())
        keys = {
            "in_domain": (),
            **PUBLIC_KEYS,
            "noise": ("synthetic", "noise", "noise_std"),
            "mixup": ("synthetic", "seed_source", "seed_size", "mixup_alpha", *seed_keys),
            "generator": ("synthetic", *GENERATOR_KEYS),
        }[self.kind]
        return {"source": self.source, **{k: getattr(self, k) for k in keys}, "size": size}


def proxy_inputs(
    proxy: ProxySource, input_shape: tuple[int, ...], size: int, seed: int
) -> np.ndarray:
    """`size` proxy inputs of a source other than ``in_domain``, shaped like the private inputs
    and standardised.

    Parameters
    ----------
    proxy : ProxySource
        The proxy's source and parameters.
    input_shape : tuple of int
        The shape of one private input, channels first.
    size : int
        Number of proxy inputs.
    seed : int
        The run's seed; every draw (which public examples, the noise, the mixup pairs) comes
        from a stream of it of its own.

    Returns
    -------
    np.ndarray
        ``float32`` inputs of shape ``(size, *input_shape)``.

    Raises
    ------
    DataError
        If the source's inputs cannot be read or cannot take the private inputs' shape, or it
        holds fewer examples than asked for.
    """
    build = PROXY_BUILDERS.get(proxy.kind)
    if build is None:
        raise DataError(
            f"proxy.source: {proxy.source!r} is not one of {', '.join(PROXY_SOURCES[1:])} "
            "(in_domain is carved from the private data)"
        )
    x = build(proxy, input_shape, size, np.random.default_rng((seed, _PROXY_SOURCE_STREAM)))
    return np.ascontiguousarray(x, dtype=np.float32)


def _public_proxy(
    proxy: ProxySource, input_shape: tuple[int, ...], size: int, rng: np.random.Generator
) -> np.ndarray:
    """`size` examples of a public data set (``digits``, ``npz``, ``hf``), drawn without
    replacement."""
    raw = _draw(PUBLIC_INPUTS[proxy.kind](proxy), size, rng, f"proxy.source '{proxy.kind}'")
    return fit_to(raw, input_shape, f"proxy.source '{proxy.kind}'")


def _noise_proxy(
    proxy: ProxySource, input_shape: tuple[int, ...], size: int, rng: np.random.Generator
) -> np.ndarray:
    """Noise of mean 0 and standard deviation ``noise_std`` in the standardised input space."""
    shape = (size, *input_shape)
    if proxy.noise == "gaussian":
        return rng.normal(0.0, proxy.noise_std, shape)
    half_width = np.sqrt(3.0) * proxy.noise_std  # U(-w, w) has standard deviation w / sqrt(3)
    return rng.uniform(-half_width, half_width, shape)


def _mixup_proxy(
    proxy: ProxySource, input_shape: tuple[int, ...], size: int, rng: np.random.Generator
) -> np.ndarray:
    """Mixup of pairs of distinct examples of a small public seed set."""
    where = f"proxy.seed_source '{proxy.seed_source}'"
    seed_raw = _draw(PUBLIC_INPUTS[proxy.seed_source](proxy), proxy.seed_size, rng, where)
    seeds = fit_to(seed_raw, input_shape, where)
    first = rng.integers(0, proxy.seed_size, size)
    second = (first + rng.integers(1, proxy.seed_size, size)) % proxy.seed_size
    lam = rng.beta(proxy.mixup_alpha, proxy.mixup_alpha, size).reshape(-1, *[1] * (seeds.ndim - 1))
    return lam * seeds[first] + (1 - lam) * seeds[second]


def _generated_each_round(
    proxy: ProxySource, input_shape: tuple[int, ...], size: int, rng: np.random.Generator
) -> np.ndarray:
    """No fixed inputs: the server's generator makes each round's (`fedkd.learner.generator`)."""
    return np.empty((0, *input_shape), dtype=np.float32)


def _draw(x: np.ndarray, size: int, rng: np.random.Generator, where: str) -> np.ndarray:
    if size > len(x):
        raise DataError(
            f"{where}: holds {len(x)} examples, fewer than the {size} asked for; set "
            f"proxy.size (or proxy.seed_size for mixup) to at most {len(x)}"
        )
    return x[np.sort(rng.choice(len(x), size=size, replace=False))]


def _digits_inputs(proxy: ProxySource) -> np.ndarray:
    """scikit-learn's 1,797 digits, ``(N, 1, 8, 8)`` in ``[0, 1]``."""

    def load() -> dict[str, np.ndarray]:
        from sklearn.datasets import load_digits  # a second or two: cached below

        return {"x": load_digits().data.reshape(-1, 1, 8, 8) / 16.0}

    return cached_arrays("digits-inputs", [], load, library="scikit-learn")["x"]


def _npz_inputs(proxy: ProxySource) -> np.ndarray:
    """The ``x`` array of ``proxy.path``, channels first, ``uint8`` scaled to ``[0, 1]``."""
    hint = "point proxy.path at an .npz holding the proxy inputs as an array 'x'"
    if not proxy.path:
        raise DataError(f"proxy.path: required for an npz proxy; {hint}")
    file = Path(proxy.path).expanduser()
    if not file.is_file():
        raise DataError(f"proxy.path: file '{proxy.path}' not found; {hint}")
    try:
        with np.load(file, allow_pickle=False) as npz:
            files = list(npz.files)
            x = npz["x"] if "x" in files else None
    except (OSError, ValueError, EOFError) as err:  # EOFError: an empty file
        raise DataError(
            f"proxy.path: cannot read '{proxy.path}' as .npz ({err or 'empty file'}); {hint}"
        ) from err
    if x is None:
        raise DataError(
            f"proxy.path: '{proxy.path}' has no array 'x' (it holds "
            f"{', '.join(files) or 'nothing'}); {hint}"
        )
    return _numeric_inputs(x, f"proxy.path: 'x' in '{proxy.path}'", "proxy.path (x)")


def _hf_inputs(proxy: ProxySource) -> np.ndarray:
    """The input column of ``proxy.hf_split`` of ``proxy.hf_name``, channels first, ``uint8``
    scaled to ``[0, 1]``, in the split's stored order; no label column is read."""
    fds = _hf_federated(proxy.hf_name, "proxy.hf_name")
    split = _hf_split(fds, proxy.hf_name, proxy.hf_split, "proxy.hf_name", "proxy.hf_split")
    column = _pick_column(
        split.column_names, proxy.image_key or None, _HF_IMAGE_KEYS, "proxy.image_key"
    )
    return _numeric_inputs(
        _hf_column(split, column, "proxy.image_key"),
        f"proxy.image_key: column {column!r} of '{proxy.hf_name}'",
        f"proxy.image_key ({column!r})",
    )


def _numeric_inputs(x: np.ndarray, where: str, shape_key: str) -> np.ndarray:
    """A public source's inputs, checked: numbers, one input per row, made ``float32`` and
    channels first with ``uint8`` scaled to ``[0, 1]``. `where` begins the errors about the
    values, `shape_key` names the inputs in an error about their shape."""
    if x.dtype.kind not in "biuf" or len(x) == 0:
        raise DataError(
            f"{where} must hold numbers, one input per row; got dtype {x.dtype} and shape {x.shape}"
        )
    x = _channels_first(_scale_uint8(x).astype(np.float32), shape_key)
    if not np.all(np.isfinite(x)):
        raise DataError(f"{where} holds NaN or infinite values")
    return x


# The public data sets a proxy is made of: raw inputs in [0, 1], channels first.
PUBLIC_INPUTS: dict[str, Callable[[ProxySource], np.ndarray]] = {
    "digits": _digits_inputs,
    "npz": _npz_inputs,
    "hf": _hf_inputs,
}

# One builder per proxy kind (ProxySource.kind): (proxy, input shape, size, rng) -> inputs.
PROXY_BUILDERS: dict[
    str, Callable[[ProxySource, tuple[int, ...], int, np.random.Generator], np.ndarray]
] = {
    "digits": _public_proxy,
    "npz": _public_proxy,
    "hf": _public_proxy,
    "noise": _noise_proxy,
    "mixup": _mixup_proxy,
    "generator": _generated_each_round,
}


def fit_to(x: np.ndarray, input_shape: tuple[int, ...], where: str) -> np.ndarray:
    """Inputs ``(N, C, *spatial)`` brought to another input shape and standardised with their
    own scalar mean and standard deviation.

    Parameters
    ----------
    x : np.ndarray
        Channels-first inputs.
    input_shape : tuple of int
        The shape of one private input, channels first.
    where : str
        The spec key named in errors.

    Returns
    -------
    np.ndarray
        ``float32`` inputs of shape ``(N, *input_shape)``.

    Raises
    ------
    DataError
        If the inputs have another number of spatial dimensions, or channels that cannot be
        matched (only 1 <-> C and equal counts are).
    """
    channels, *spatial = input_shape
    if x.ndim - 2 != len(spatial):
        raise DataError(
            f"{where}: its inputs of shape {x.shape[1:]} cannot become the private inputs' shape "
            f"{input_shape}; use a proxy with {len(spatial)}-D inputs, or "
            "proxy.source = 'synthetic'"
        )
    if x.shape[1] != channels:
        if x.shape[1] == 1:
            x = np.repeat(x, channels, axis=1)
        elif channels == 1:
            x = x.mean(axis=1, keepdims=True)
        else:
            raise DataError(
                f"{where}: inputs with {x.shape[1]} channels cannot become the private inputs' "
                f"{channels}; give 1 or {channels} channels"
            )
    for axis, length in enumerate(spatial, start=2):
        if x.shape[axis] != length:
            x = np.moveaxis(
                np.tensordot(x, _resize_matrix(x.shape[axis], length), ([axis], [1])), -1, axis
            )
    std = float(x.std())
    return ((x - x.mean()) / (std if std > 0 else 1.0)).astype(np.float32)


def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` weights of a linear (triangle) filter whose support widens with the
    downscaling factor, as PIL's bilinear resize: antialiased when shrinking."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    centres = (np.arange(n_out) + 0.5) * scale
    pixels = np.arange(n_in) + 0.5
    weights = np.maximum(0.0, 1.0 - np.abs(pixels[None, :] - centres[:, None]) / support)
    return weights / weights.sum(axis=1, keepdims=True)
