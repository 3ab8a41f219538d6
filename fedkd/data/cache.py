"""A small on-disk cache for arrays that are pure functions of their arguments.

A deployed SuperNode starts a fresh ClientApp process for every message, and a Ray actor
starts with an empty memory: recomputing a partition (flwr-datasets with ``datasets``, scipy and
seaborn behind it) or a bundled data set (scikit-learn) costs seconds of imports there. Entries
are keyed by everything the result depends on, including the producing library's version, and
written atomically, so concurrent processes never read half a file; deleting the folder is
always safe.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import numpy as np

__all__ = ["cache_dir", "cached_arrays"]


def cache_dir() -> Path:
    """``$FEDKD_CACHE_DIR``, else ``$XDG_CACHE_HOME/fedkd`` (default ``~/.cache/fedkd``)."""
    if os.environ.get("FEDKD_CACHE_DIR"):
        return Path(os.environ["FEDKD_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedkd"


def cached_arrays(
    kind: str,
    key: list[bytes | str],
    compute: Callable[[], dict[str, np.ndarray]],
    *,
    library: str,
) -> dict[str, np.ndarray]:
    """``compute()``, read back from the cache when the same `kind`, `key` and `library` version
    were computed before.

    A computation that warns is not cached, so that its warnings are given every time.
    """
    digest = hashlib.sha256(f"{kind}\0{library}=={version(library)}".encode())
    for part in key:
        digest.update(b"\0" + (part.encode() if isinstance(part, str) else part))
    path = cache_dir() / f"{kind}-{digest.hexdigest()[:32]}.npz"
    try:
        with np.load(path) as saved:
            return {name: saved[name] for name in saved.files}
    except (OSError, KeyError, ValueError):
        pass  # not cached yet, or unreadable: compute it

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        arrays = compute()
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if not caught:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
            np.savez(tmp, **arrays)
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only home is no reason to fail a run
    return arrays
