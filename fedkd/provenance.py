"""Where a run's numbers came from: the code, the libraries and the machine that made them.

A run's ``summary.json`` carries this as ``provenance`` so that a table built from runs
(`fedkd report`) can say which commit and machine produced each figure, and a reader can tell
whether two runs that differ ran the same code.
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import fedkd

# Distributions whose versions decide a run's numbers (import names differ: dp_accounting).
PACKAGES = ("torch", "flwr", "opacus", "dp-accounting", "numpy", "ray")
# The folder fedkd's code is imported from; a git checkout when fedkd is installed editable.
CODE_DIR = Path(fedkd.__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    """A git command's output in `CODE_DIR`, or None (not a checkout, or no git)."""
    try:
        proc = subprocess.run(
            ["git", "-C", str(CODE_DIR), *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def git_state() -> dict[str, Any]:
    """``git_commit`` of the code fedkd runs from (None outside a checkout) and ``git_dirty``:
    whether tracked or new, not ignored files differ from that commit (None if unknown)."""
    # Only a checkout whose root holds fedkd: an installed copy in a venv inside some other
    # repository is not that repository's code.
    top = _git("rev-parse", "--show-toplevel")
    commit = _git("rev-parse", "HEAD") if top and Path(top).resolve() == CODE_DIR else None
    status = _git("status", "--porcelain") if commit else None
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status)}


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info() -> dict[str, Any]:
    """The machine: operating system, CPU model and count, and the GPUs torch sees."""
    import torch

    gpus = []
    if torch.cuda.is_available():
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "gpus": gpus,
    }


def run_provenance() -> dict[str, Any]:
    """Everything above for the current process: git state, fedkd, Python and package
    versions, and the device (see `git_state`, `device_info`)."""
    return {
        **git_state(),
        "fedkd_version": fedkd.__version__,
        "python": platform.python_version(),
        "packages": {name: _package_version(name) for name in PACKAGES},
        "device": device_info(),
    }


def machine_label(provenance: dict[str, Any]) -> str:
    """One line naming a run's machine: its GPUs if any, else its CPU model and count."""
    device = provenance.get("device") or {}
    if device.get("gpus"):
        return ", ".join(device["gpus"])
    cpu = device.get("cpu") or "unknown CPU"
    count = device.get("cpu_count")
    return f"{cpu} ({count} CPUs)" if count else cpu


def commit_label(provenance: dict[str, Any]) -> str:
    """A short commit id, ``+dirty`` when the tree had changes, or ``unknown``."""
    commit = provenance.get("git_commit")
    if not commit:
        return "unknown"
    return commit[:10] + ("+dirty" if provenance.get("git_dirty") else "")
