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


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields in Linux's /proc/cpuinfo (empty elsewhere)."""
    try:
        return first_processor(Path("/proc/cpuinfo").read_text())
    except OSError:
        return {}


def first_processor(cpuinfo: str) -> dict[str, str]:
    """The fields of the first processor's block of a /proc/cpuinfo text."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():  # the first processor's block ends here
            break
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what `platform` knows."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_id() -> str | None:
    """The CPU's vendor, family, model and stepping numbers (Linux's /proc/cpuinfo), or None.

    A virtual machine may show a bare model name ("AMD EPYC") for CPUs of different
    generations; these numbers tell them apart.
    """
    info = _cpuinfo()
    parts = [
        f"{label} {info[key]}"
        for key, label in (("cpu family", "family"), ("model", "model"), ("stepping", "stepping"))
        if key in info
    ]
    if not parts:
        return None
    return " ".join([info.get("vendor_id", "")] + parts).strip()


def device_info() -> dict[str, Any]:
    """The machine: operating system, CPU model, identity and count, the vector instruction
    set torch's CPU kernels were chosen for, and the GPUs torch sees.

    ``cpu_capability`` (torch's ``get_cpu_capability``, e.g. ``AVX2`` or ``AVX512``) decides
    which of torch's CPU kernels run, and kernels for different instruction sets round
    differently (docs/reproducibility.md): two machines with the same model name and different
    capabilities do not give the same numbers.
    """
    import torch

    gpus = []
    if torch.cuda.is_available():
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_id": cpu_id(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
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
    """One line naming a run's machine: its GPUs if any, else its CPU model, count and torch's
    CPU capability where the run recorded it (runs from before the field show none)."""
    device = provenance.get("device") or {}
    if device.get("gpus"):
        return ", ".join(device["gpus"])
    cpu = device.get("cpu") or "unknown CPU"
    details = [f"{device['cpu_count']} CPUs"] if device.get("cpu_count") else []
    if device.get("cpu_capability"):
        details.append(device["cpu_capability"])
    return f"{cpu} ({', '.join(details)})" if details else cpu


def commit_label(provenance: dict[str, Any]) -> str:
    """A short commit id, ``+dirty`` when the tree had changes, or ``unknown``."""
    commit = provenance.get("git_commit")
    if not commit:
        return "unknown"
    return commit[:10] + ("+dirty" if provenance.get("git_dirty") else "")
