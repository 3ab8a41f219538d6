"""Which class an ``algorithm.name`` means: a built-in, an import path, or an entry point.

``algorithm.name`` is one of

- a built-in name (`BUILTIN`, e.g. ``"dsfl"``);
- an import path ``"package.module:ClassName"`` naming a `strategies.base.Strategy` subclass.
  The module is imported as Python finds it; where it is not found and the spec came from a
  file, the spec's folder is searched too: it is put on ``sys.path`` and on ``PYTHONPATH``, so
  that the processes started afterwards (Ray's workers, which parse the spec again) import it
  the same way;
- the name of a ``fedkd.algorithms`` entry point of an installed package, whose value is such
  an import path (``[project.entry-points."fedkd.algorithms"] myalgo = "mypkg.algo:MyAlgo"``).
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import os
import sys
from pathlib import Path
from types import ModuleType

from strategies.base import Strategy

# The built-in algorithms: name -> import path, one line each (the module holds the rest).
BUILTIN_PATHS: dict[str, str] = {
    "dsfl": "strategies.dsfl:DSFL",
    "fedmd": "strategies.fedmd:FedMD",
    "feddf": "strategies.feddf:FedDFLogit",
    "fd": "strategies.fd:FD",
    "fedproto": "strategies.fedproto:FedProto",
    "relation": "strategies.relation:Relation",
    "fedavg": "strategies.fedavg:FedAvg",
    "local_only": "strategies.local_only:LocalOnly",
    "centralized": "strategies.centralized:Centralized",
    "pate": "strategies.pate:PATE",
}

# What a spec that names no algorithm runs.
DEFAULT_ALGORITHM = "dsfl"
ENTRY_POINT_GROUP = "fedkd.algorithms"


# Entry points found so far: name -> import path.
_ENTRY_POINTS: dict[str, str] = {}


class AlgorithmNotFound(ValueError):
    """An ``algorithm.name`` that names no algorithm, phrased as one line."""


def entry_point_names() -> tuple[str, ...]:
    """Names of the algorithms installed packages register (``fedkd.algorithms`` entry points)."""
    found = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    return tuple(sorted({ep.name for ep in found}))


def algorithm_class(name: str, search_dir: str | Path | None = None) -> type[Strategy]:
    """The algorithm class ``name`` means (see the module docstring).

    Parameters
    ----------
    name : str
        A built-in name, ``"package.module:ClassName"``, or an entry point's name.
    search_dir : str or Path or None, default None
        Where an import path's module is also looked for (the spec file's folder).

    Returns
    -------
    type[Strategy]
        The class.

    Raises
    ------
    AlgorithmNotFound
        If ``name`` names nothing, its module does not import, lacks the attribute, or the
        attribute is not a `Strategy` subclass.
    """
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" in name:
        return _from_import_path(name, str(search_dir) if search_dir else "")
    if name not in _ENTRY_POINTS:  # metadata is scanned once per name found
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name == name:
                _ENTRY_POINTS[name] = ep.value
    if name in _ENTRY_POINTS:
        value = _ENTRY_POINTS[name]
        return _from_import_path(value, "", f"entry point '{name}' ({value})")
    registered = ", ".join((*BUILTIN, *entry_point_names()))
    raise AlgorithmNotFound(
        f"'{name}' is not one of {registered}, nor an import path 'package.module:ClassName'"
    )


@functools.lru_cache(maxsize=32)
def _from_import_path(path: str, search_dir: str, what: str = "") -> type[Strategy]:
    what = what or f"'{path}'"
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise AlgorithmNotFound(f"{what}: an import path reads 'package.module:ClassName'")
    module = _import(module_name, search_dir, what)
    cls = module
    for part in attr.split("."):
        if not hasattr(cls, part):
            raise AlgorithmNotFound(
                f"{what}: module '{module_name}' has no attribute '{attr}' "
                f"(it is {module.__file__})"
            )
        cls = getattr(cls, part)
    if not (isinstance(cls, type) and issubclass(cls, Strategy)) or cls is Strategy:
        raise AlgorithmNotFound(
            f"{what} is not an algorithm: name a subclass of strategies.base.Strategy"
        )
    return cls


def _import(module_name: str, search_dir: str, what: str) -> ModuleType:
    """Import `module_name`; where Python does not find it, look in `search_dir` too."""
    for looked_there in (False, True):
        try:
            return importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if not looked_there and search_dir and _is_missing(err, module_name):
                add_to_path(search_dir)
                continue
            where = f" (looked on Python's path and in {search_dir})" if looked_there else ""
            raise AlgorithmNotFound(f"{what} does not import: {err}{where}") from None
        except Exception as err:  # noqa: BLE001 - a user's module may fail in any way
            raise AlgorithmNotFound(
                f"{what} does not import: {type(err).__name__}: {err}"
            ) from None
    raise AssertionError  # unreachable: the second try returns or raises


def _is_missing(err: ModuleNotFoundError, module_name: str) -> bool:
    """Whether the module itself (or a package above it) was not found, rather than
    something it imports."""
    missing = err.name or ""
    return module_name == missing or module_name.startswith(f"{missing}.")


def add_to_path(folder: str) -> None:
    """Put `folder` first on ``sys.path`` and on ``PYTHONPATH`` (for processes started later)."""
    if folder not in sys.path:
        sys.path.insert(0, folder)
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if folder not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([folder, *parts])
    importlib.invalidate_caches()


def _builtin() -> dict[str, type[Strategy]]:
    classes = {name: _from_import_path(path, "") for name, path in BUILTIN_PATHS.items()}
    for name, cls in classes.items():
        if cls.name != name:
            raise AssertionError(f"BUILTIN_PATHS: '{name}' names {cls.__name__} ('{cls.name}')")
    return classes


BUILTIN: dict[str, type[Strategy]] = _builtin()
