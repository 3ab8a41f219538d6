"""Data sources: turn a named data set into normalised, channels-first numpy arrays.

Every source returns an :class:`ArrayDataset` with ``float32`` inputs of shape ``(N, C, H, W)``
(images) or ``(N, C, L)`` (1-D signals), standardised to zero mean and unit standard deviation
with scalar statistics of the training split, and ``int64`` labels.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedkd.data.cache import cached_arrays

SOURCES = ("digits", "mnist1d", "npz", "hf")

_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
# Bump when what `_read_npz` computes changes: cached standardised arrays are then recomputed.
_NPZ_CACHE_FORMAT = 1
_HF_IMAGE_KEYS = ("image", "img", "pixel_values", "x")
_HF_LABEL_KEYS = ("label", "labels", "y")


class DataError(ValueError):
    """Bad data configuration; the message names the key and the fix."""


@dataclass(frozen=True)
class ArrayDataset:
    """A data set held as numpy arrays.

    Attributes
    ----------
    name : str
        Short name of the data set (for logs and results).
    x_train, x_test : np.ndarray
        ``float32`` inputs, channels first: ``(N, C, H, W)`` or ``(N, C, L)``, standardised with
        the training split's scalar mean and standard deviation.
    y_train, y_test : np.ndarray
        ``int64`` labels of shape ``(N,)`` in ``[0, num_classes)``.
    num_classes : int
        Number of classes.
    input_mean, input_std : float
        The scalar statistics the inputs were standardised with, so that data arriving later
        (a deployment site's own file) can be brought to the same scale.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_mean: float = 0.0
    input_std: float = 1.0

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input, without the batch dimension."""
        return tuple(self.x_train.shape[1:])


def load_source(
    source: str,
    *,
    path: str | None = None,
    hf_name: str | None = None,
    image_key: str | None = None,
    label_key: str | None = None,
    seed: int = 0,
) -> ArrayDataset:
    """Load a data set as normalised, channels-first arrays.

    Parameters
    ----------
    source : str
        One of :data:`SOURCES`: ``"digits"`` (scikit-learn's bundled 8x8 digits),
        ``"mnist1d"`` (generated locally), ``"npz"`` (a local file, see ``path``) or ``"hf"``
        (a Hugging Face data set through flwr-datasets, see ``hf_name``).
    path : str, optional
        For ``"npz"``: the ``.npz`` file holding ``x_train``, ``y_train``, ``x_test``,
        ``y_test``.
    hf_name : str, optional
        For ``"hf"``: a hub data set name or a local folder that ``datasets.load_dataset``
        reads (for example one holding ``train.parquet`` and ``test.parquet``).
    image_key, label_key : str, optional
        For ``"hf"``: the input and label columns; detected automatically when omitted.
    seed : int, optional
        Seed for the ``digits`` train/test split and the ``mnist1d`` generator.

    Returns
    -------
    ArrayDataset
        The data set.

    Raises
    ------
    DataError
        If the source is unknown or its configuration or contents are invalid.
    """
    if not isinstance(seed, int | np.integer) or isinstance(seed, bool) or seed < 0:
        raise DataError(f"seed: expected a non-negative integer, got {seed!r}")
    if source == "digits":
        return _load_digits(seed)
    if source == "mnist1d":
        return _load_mnist1d(seed)
    if source == "npz":
        return _load_npz(path)
    if source == "hf":
        return _load_hf(hf_name, image_key=image_key, label_key=label_key)
    raise DataError(f"data.source: unknown source {source!r}; choose one of {', '.join(SOURCES)}")


def _load_digits(seed: int) -> ArrayDataset:
    def split() -> dict[str, np.ndarray]:
        from sklearn.datasets import load_digits  # a second or two: cached below
        from sklearn.model_selection import train_test_split

        x, y = load_digits(return_X_y=True)
        x = x.reshape(-1, 1, 8, 8) / 16.0
        x_train, x_test, y_train, y_test = train_test_split(
            x, y, test_size=0.2, stratify=y, random_state=seed
        )
        return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}

    d = cached_arrays("digits", [str(seed)], split, library="scikit-learn")
    return _finalise("digits", d["x_train"], d["y_train"], d["x_test"], d["y_test"])


def _load_mnist1d(seed: int) -> ArrayDataset:
    def generate() -> dict[str, np.ndarray]:
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        args.seed = seed
        # make_dataset reseeds the global `random` and `np.random` generators; restore them so
        # that loading data has no effect on anything else seeded in the process.
        np_state, py_state = np.random.get_state(), random.getstate()
        try:
            data = make_dataset(args)
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
        return {k: np.asarray(data[k]) for k in ("x", "y", "x_test", "y_test")}

    d = cached_arrays("mnist1d", [str(seed)], generate, library="mnist1d")
    x_train, x_test = d["x"][:, None, :], d["x_test"][:, None, :]
    return _finalise("mnist1d", x_train, d["y"], x_test, d["y_test"])


def _load_npz(path: str | None) -> ArrayDataset:
    hint = (
        "point data.path at an .npz holding x_train, y_train, x_test, y_test "
        "(for example ../shared/data/mnist.npz)"
    )
    if not path:
        raise DataError(f"data.path: required for source 'npz'; {hint}")
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"data.path: file '{path}' not found; {hint}")
    stat = file.stat()

    def standardised() -> dict[str, np.ndarray]:
        ds = _read_npz(file, path, hint)
        arrays = {k: getattr(ds, k) for k in _NPZ_KEYS}
        stats = {"num_classes": ds.num_classes, "mean": ds.input_mean, "std": ds.input_std}
        return {**arrays, **{k: np.asarray(v) for k, v in stats.items()}}

    # Every process of a run (the server, each Ray actor) loads the file: reading the
    # standardised float32 arrays back is several times faster than converting and
    # standardising uint8 images again. Keyed by the file's path, size and modification time.
    d = cached_arrays(
        f"npz-{_NPZ_CACHE_FORMAT}",
        [str(file.resolve()), str(stat.st_size), str(stat.st_mtime_ns)],
        standardised,
        library="numpy",
    )
    return ArrayDataset(
        name=file.stem,
        x_train=d["x_train"],
        y_train=d["y_train"],
        x_test=d["x_test"],
        y_test=d["y_test"],
        num_classes=int(d["num_classes"]),
        input_mean=float(d["mean"]),
        input_std=float(d["std"]),
    )


def _read_npz(file: Path, path: str, hint: str) -> ArrayDataset:
    """The .npz at `file`, checked, scaled to [0, 1] if uint8, and standardised."""
    try:
        with np.load(file, allow_pickle=False) as npz:
            files = list(npz.files)
            arrays = {key: npz[key] for key in _NPZ_KEYS if key in files}
    except (OSError, ValueError, EOFError) as err:  # EOFError: an empty file
        raise DataError(
            f"data.path: cannot read '{path}' as .npz ({err or 'empty file'}); {hint}"
        ) from err
    missing = [key for key in _NPZ_KEYS if key not in arrays]
    if missing:
        raise DataError(
            f"data.path: '{path}' lacks the arrays {', '.join(missing)} "
            f"(it holds {', '.join(files) or 'nothing'}); {hint}"
        )
    x_train = _channels_first(_scale_uint8(arrays["x_train"]), "data.path (x_train)")
    x_test = _channels_first(_scale_uint8(arrays["x_test"]), "data.path (x_test)")
    return _finalise(file.stem, x_train, arrays["y_train"], x_test, arrays["y_test"])


def _load_hf(hf_name: str | None, *, image_key: str | None, label_key: str | None) -> ArrayDataset:
    import datasets

    fds = _hf_federated(hf_name, "data.hf_name")
    train = _hf_split(fds, hf_name, "train", "data.hf_name")
    try:
        test = fds.load_split("test")
    except ValueError as err:
        raise DataError(
            f"data.hf_name: '{hf_name}' has no 'test' split ({err}); fedkd evaluates on the "
            "source's test split, so choose a data set that has one"
        ) from err

    columns = train.column_names
    image_col = _pick_column(columns, image_key, _HF_IMAGE_KEYS, "data.image_key")
    label_col = _pick_column(columns, label_key, _HF_LABEL_KEYS, "data.label_key")
    for split_name, split in (("test", test), ("train", train)):
        for col in (image_col, label_col):
            if col not in split.column_names:
                raise DataError(f"data.hf_name: the {split_name} split lacks column {col!r}")

    x_train, y_train = _hf_arrays(train, image_col, label_col)
    x_test, y_test = _hf_arrays(test, image_col, label_col)
    label_feature = train.features[label_col]
    num_classes = None
    if isinstance(label_feature, datasets.ClassLabel):
        num_classes = label_feature.num_classes
    elif y_train.dtype.kind in "USO":
        # String labels: index them by sorted name over both splits.
        names = np.unique(np.concatenate([y_train, y_test]).astype(str))
        y_train = np.searchsorted(names, y_train.astype(str))
        y_test = np.searchsorted(names, y_test.astype(str))
        num_classes = len(names)
    name = Path(hf_name).name if Path(hf_name).exists() else hf_name
    return _finalise(name, x_train, y_train, x_test, y_test, num_classes=num_classes)


def _hf_federated(hf_name: str | None, key: str) -> Any:
    """`hf_name` (a hub name or a local folder) behind flwr-datasets, unshuffled and not yet
    loaded; `key` is the spec key named in errors."""
    from flwr_datasets import FederatedDataset

    if not hf_name:
        raise DataError(
            f"{key}: required for source 'hf'; name a Hugging Face data set (for example "
            "'ylecun/mnist') or a local folder that datasets.load_dataset reads"
        )
    # One partition and no shuffling: fedkd partitions the arrays itself with flwr-datasets
    # partitioners (see fedkd.data.partition), reproducibly from the run's seed. The
    # partitioner's split matters only to load_partition, which fedkd never calls.
    return FederatedDataset(dataset=hf_name, partitioners={"train": 1}, shuffle=False)


def _hf_split(fds: Any, hf_name: str | None, split: str, key: str, split_key: str = "") -> Any:
    """The `split` of `fds` (loading the data set on first use), or one line naming `key` (or
    `split_key`, the key that chose the split, if there is one and the split is missing)."""
    try:
        return fds.load_split(split)
    except ValueError as err:
        raise DataError(
            f"{split_key or key}: '{hf_name}' has no usable '{split}' split ({err})"
        ) from err
    except Exception as err:  # the hub client raises many types (offline, not found, auth)
        raise DataError(
            f"{key}: cannot load '{hf_name}' ({type(err).__name__}: {err}); check the "
            "name, or point it at a local folder (set HF_DATASETS_OFFLINE=1 without network)"
        ) from err


def _pick_column(
    columns: list[str], given: str | None, candidates: tuple[str, ...], key: str
) -> str:
    """The column `given`, else the first of `candidates` the data set has."""
    if given is not None:
        if given not in columns:
            raise DataError(f"{key}: column {given!r} not found; the data set has {columns}")
        return given
    for name in candidates:
        if name in columns:
            return name
    raise DataError(
        f"{key}: none of the columns {list(candidates)} found in {columns}; set {key} to the "
        "right column"
    )


def _hf_column(split: Any, column: str, key: str) -> np.ndarray:
    """One column of a split as one array, values as stored (``uint8`` images stay ``uint8``);
    `key` is the spec key named in errors."""
    # The numpy format decodes PIL images and nested lists alike into one stacked array.
    values = split.with_format("numpy", columns=[column])[:][column]
    if isinstance(values, list) or values.dtype == object:
        try:
            values = np.stack([np.asarray(v) for v in values])
        except ValueError as err:
            raise DataError(
                f"{key}: inputs in column {column!r} have different shapes; fedkd needs "
                "inputs of one shape"
            ) from err
    return values


def _hf_arrays(split: Any, column: str, label_column: str) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(split.with_format("numpy", columns=[label_column])[:][label_column])
    values = _scale_uint8(_hf_column(split, column, "data.image_key"))
    return _channels_first(values, f"data.image_key ({column!r})"), labels


def _scale_uint8(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x


def _channels_first(x: np.ndarray, key: str) -> np.ndarray:
    """Give a batch of inputs an explicit, leading channel dimension.

    ``(N, L)`` becomes ``(N, 1, L)``, ``(N, H, W)`` becomes ``(N, 1, H, W)``, and
    ``(N, H, W, C)`` with ``C`` in {1, 3} becomes ``(N, C, H, W)``; ``(N, C, H, W)`` stays.
    """
    if x.ndim in (2, 3):
        return x[:, None]
    if x.ndim == 4:
        if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
            return np.moveaxis(x, -1, 1)
        return x
    raise DataError(
        f"{key}: expected inputs of shape (N, L), (N, H, W), (N, H, W, C) or (N, C, H, W), "
        f"got {x.shape}"
    )


def _labels(y: Any, n: int, what: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        raise DataError(f"{what}: expected {n} labels of shape ({n},), got shape {y.shape}")
    if y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        y = y.astype(np.int64)
    if y.dtype.kind not in "iu":
        raise DataError(f"{what}: labels must be integers, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if n and y.min() < 0:
        raise DataError(f"{what}: labels must be non-negative, got {y.min()}")
    return y


def _finalise(
    name: str,
    x_train: np.ndarray,
    y_train: Any,
    x_test: np.ndarray,
    y_test: Any,
    *,
    num_classes: int | None = None,
) -> ArrayDataset:
    """Validate, standardise with training statistics and cast to the canonical dtypes."""
    if len(x_train) == 0 or len(x_test) == 0:
        raise DataError(
            f"data: '{name}' has {len(x_train)} training and {len(x_test)} test examples; both "
            "splits must be non-empty"
        )
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"data: '{name}' train inputs have shape {x_train.shape[1:]} but test inputs "
            f"{x_test.shape[1:]}"
        )
    y_train = _labels(y_train, len(x_train), f"data: '{name}' y_train")
    y_test = _labels(y_test, len(x_test), f"data: '{name}' y_test")
    # float32 storage with float64 statistics: MNIST-sized float64 copies would cost ~0.4 GB.
    try:
        x_train = np.asarray(x_train, dtype=np.float32)
        x_test = np.asarray(x_test, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise DataError(f"data: '{name}' inputs are not numeric ({err})") from err
    mean = float(x_train.mean(dtype=np.float64))
    std = float(x_train.std(dtype=np.float64))
    if not np.isfinite(mean) or not np.isfinite(std) or not np.all(np.isfinite(x_test)):
        raise DataError(f"data: '{name}' inputs contain NaN or infinite values")
    std = std if std > 0 else 1.0
    x_train = (x_train - np.float32(mean)) / np.float32(std)
    x_test = (x_test - np.float32(mean)) / np.float32(std)
    seen = int(max(y_train.max(), y_test.max())) + 1
    if num_classes is None:
        num_classes = seen
    elif seen > num_classes:
        raise DataError(f"data: '{name}' has label {seen - 1} but only {num_classes} classes")
    return ArrayDataset(
        name=name,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=int(num_classes),
        input_mean=mean,
        input_std=std,
    )
