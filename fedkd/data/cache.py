"""A small on-disk cache for arrays that are pure functions of their arguments.

A deployed SuperNode starts a fresh ClientApp process for every message, and a Ray actor
starts with an empty memory: recomputing a partition (flwr-datasets with ``datasets``, scipy and
seaborn behind it) or a bundled data set (scikit-learn) costs seconds of imports there. Entries
are keyed by everything the result depends on, including the producing library's version, and
written atomically, so concurrent processes never read half an entry; deleting the folder is
always safe.

An entry is a folder of ``.npy`` files, one per array. Large arrays are memory-mapped
copy-on-write when read back: a process then reads from disk (or shares from the page cache)
only the rows it touches, and a node hosting a few clients of a large data set does not copy
the whole set at start-up; writing to such an array changes only the process's own copy.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import warnings
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import numpy as np

__all__ = ["cache_dir", "cached_arrays"]

# Arrays at least this large are memory-mapped when read back; smaller ones are read whole, so
# that an entry of many small arrays (a partition's index lists) does not hold a mapping each.
MMAP_MIN_BYTES = 1 << 20


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
    path = cache_dir() / f"{kind}-{digest.hexdigest()[:32]}"
    try:
        return _read_entry(path)
    except FileNotFoundError:
        pass  # not cached yet: compute it
    except (OSError, ValueError):
        # Unreadable (a damaged file): computed again, and the entry replaced by the new one.
        shutil.rmtree(path, ignore_errors=True)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        arrays = compute()
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if not caught:
        _write_entry(path, arrays)
    return arrays


def _read_entry(path: Path) -> dict[str, np.ndarray]:
    """The arrays of the entry folder `path`; ``FileNotFoundError`` when there is none."""
    arrays = {}
    for file in path.iterdir():
        if file.suffix == ".npy":
            mmap = "c" if file.stat().st_size >= MMAP_MIN_BYTES else None
            arrays[file.stem] = np.load(file, mmap_mode=mmap, allow_pickle=False)
    return arrays


def _write_entry(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write `arrays` as the entry folder `path`: into a private folder renamed into place, so
    that a reader sees a whole entry or none."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", np.asarray(array), allow_pickle=False)
        os.rename(tmp, path)
    except OSError:
        pass  # a read-only home, or another process wrote the entry first: no reason to fail
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
