"""A deployment site's own data: one client's private arrays from a site-local ``.npz``.

In a multi-site deployment each SuperNode trains on data that never leaves its site, while the
public proxy set and the global test set are the spec's (every party holds them). The site file
holds ``x_train`` and ``y_train`` and optionally ``x_test`` and ``y_test`` (the site's own
held-out data); without them a ``local_test_fraction`` slice of the training data is held out,
as for a spec partition. A ``validation_fraction`` slice of the training data is held out for
validation in either case.

Inputs must be in the units the spec's source has before standardisation (an ``npz`` source's
raw values; ``uint8`` images are scaled to [0, 1] as there), because they are standardised with
the statistics of the spec's training data: the site's model then sees its private data and the
public proxy set on one scale.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedkd.data.sources import DataError, _channels_first, _labels, _scale_uint8
from fedkd.data.splits import ClientData, held_out_counts

SITE_KEY = "data-path"  # the SuperNode node-config key naming the site file
_SITE_STREAM = 2  # a seed stream of its own (splits.py uses 0 and 1)


def _inputs(
    x: np.ndarray, input_shape: tuple[int, ...], mean: float, std: float, what: str
) -> np.ndarray:
    """Site inputs on the spec data's scale: uint8 to [0, 1], channels first, standardised."""
    x = _channels_first(_scale_uint8(np.asarray(x)), what)
    if tuple(x.shape[1:]) != tuple(input_shape):
        raise DataError(
            f"{what}: inputs of shape {tuple(x.shape[1:])}, but the spec's data has inputs of "
            f"shape {tuple(input_shape)}; the site's data must match the proxy and test sets"
        )
    try:
        x = np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise DataError(f"{what}: inputs are not numeric ({err})") from err
    if not np.all(np.isfinite(x)):
        raise DataError(f"{what}: inputs contain NaN or infinite values")
    return (x - np.float32(mean)) / np.float32(std)


def load_site_data(
    path: str | Path,
    *,
    client_id: int,
    input_shape: tuple[int, ...],
    num_classes: int,
    input_mean: float,
    input_std: float,
    local_test_fraction: float,
    seed: int,
    validation_fraction: float = 0.0,
) -> ClientData:
    """One client's private data from a site-local ``.npz``.

    Parameters
    ----------
    path : str or Path
        The site file: ``x_train``, ``y_train`` and optionally ``x_test``, ``y_test``.
    client_id : int
        The client this site is (its SuperNode's ``partition-id``).
    input_shape : tuple of int
        Shape of one input in the spec's data (channels first); the site's inputs must match.
    num_classes : int
        Number of classes in the spec's data; site labels must lie in ``[0, num_classes)``.
    input_mean, input_std : float
        The spec data's standardisation statistics, applied to the site's inputs.
    local_test_fraction : float
        Held-out fraction of ``x_train`` when the file has no ``x_test``.
    seed : int
        Run seed (the held-out slices are drawn from it and the client id).
    validation_fraction : float, optional
        Fraction of ``x_train`` held out as the site's validation slice.

    Returns
    -------
    ClientData
        The site's training, validation and local held-out data, standardised like the proxy
        set.

    Raises
    ------
    DataError
        If the file is missing, unreadable, or its arrays do not fit the spec's data.
    """
    what = f"node config {SITE_KEY} '{path}'"
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"{what}: file not found on this SuperNode")
    try:
        with np.load(file, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in ("x_train", "y_train", "x_test", "y_test") if k in npz}
    except (OSError, ValueError) as err:
        raise DataError(f"{what}: cannot read it as .npz ({err})") from err
    missing = [k for k in ("x_train", "y_train") if k not in arrays]
    if missing:
        raise DataError(f"{what}: lacks {', '.join(missing)} (needs x_train, y_train)")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise DataError(f"{what}: holds only one of x_test, y_test; give both or neither")

    x = _inputs(arrays["x_train"], input_shape, input_mean, input_std, f"{what} x_train")
    y = _labels(arrays["y_train"], len(x), f"{what} y_train")
    if len(x) == 0:
        raise DataError(f"{what}: x_train is empty")
    has_test = "x_test" in arrays
    if has_test:
        x_test = _inputs(arrays["x_test"], input_shape, input_mean, input_std, f"{what} x_test")
        y_test = _labels(arrays["y_test"], len(x_test), f"{what} y_test")
    top = max(int(y.max()), int(y_test.max()) if has_test and len(y_test) else -1)
    if top >= num_classes:
        raise DataError(
            f"{what}: has label {top}, but the spec's data has {num_classes} classes "
            f"(labels 0..{num_classes - 1})"
        )
    n_train, n_val, _ = held_out_counts(
        len(x), 0.0 if has_test else local_test_fraction, validation_fraction
    )
    if not has_test or n_val:
        order = np.random.default_rng((seed, _SITE_STREAM, client_id)).permutation(len(x))
        x, y = x[order], y[order]
    x, x_val, x_held = np.split(x, [n_train, n_train + n_val])
    y, y_val, y_held = np.split(y, [n_train, n_train + n_val])
    if not has_test:
        x_test, y_test = x_held, y_held
    return ClientData(
        client_id=client_id,
        x_train=x,
        y_train=y,
        x_local_test=x_test,
        y_local_test=y_test,
        x_val=x_val,
        y_val=y_val,
    )
