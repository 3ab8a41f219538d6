"""The results folder of a run (docs/results-files.md: keep these names stable).

- ``spec.toml``: the spec exactly as run, defaults filled in.
- ``metrics.jsonl``: one JSON object per round, appended and flushed as each round ends, so a
  crash never loses a finished round.
- ``summary.json``: the last round's metrics, run totals, and the round selected on validation
  data with its test accuracy (the reported result).
- ``*.png``: accuracy, bytes and (with DP) epsilon per round.
- ``.fedkd.lock``: present while a run writes the folder (see `claim_run_dir`).
- ``audit/``: with ``[audit] enabled = true``, the audited client's final student and the
  teachers it distilled from (`save_student`, `save_teachers`), which `fedkd.audit` reads.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

import fedkd
from fedkd.faults.record import fault_totals
from fedkd.provenance import run_provenance
from fedkd.spec import Spec, with_noise_rng

log = logging.getLogger("fedkd")

# Per-round keys every metrics.jsonl line carries (null where not applicable).
ROUND_KEYS = (
    "round",
    "server_test_acc",
    "teacher_test_acc",
    "client_test_acc_mean",
    "client_test_acc_min",
    "client_test_acc_max",
    "client_local_acc_mean",
    "bytes_up",
    "bytes_down",
    "bytes_up_per_client",
    "epsilon_max",
    "epsilon",
    "clients_ok",
    "clients_failed",
    "wall_s",
    "server_val_acc",
    "client_val_acc_mean",
)
SUMMARY_KEYS = (
    "spec_name",
    "algorithm",
    "rounds",
    "final",
    "best_server_test_acc",
    "total_bytes_up",
    "total_bytes_down",
    "total_clients_failed",
    "wall_s",
    "fedkd_version",
    "best_round_by_val",
    "selected_by",
    "best_val_acc",
    "test_acc_at_best_val_round",
    "test_acc_metric",
    "best_server_test_acc_test_selected",
)
# Validation metrics a round is selected by, in order of preference (docs/validation.md).
VALIDATION_KEYS = ("server_val_acc", "client_val_acc_mean")


def select_round_by_validation(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The round a run reports, chosen on validation data only.

    Parameters
    ----------
    rounds : list of dict
        The run's metrics rows.

    Returns
    -------
    dict
        ``selected_by``: ``server_val_acc`` where any round has it (the server's model on the
        proxy validation slice), else ``client_val_acc_mean`` (the clients' students on their
        own validation slices), else None; ``best_round_by_val``: the first round with the
        highest value of it; ``best_val_acc``: that value; ``test_acc_metric``:
        ``server_test_acc`` where the run has a global model, else ``client_test_acc_mean``;
        ``test_acc_at_best_val_round``: that metric at the selected round. All None when no
        round has a validation metric.
    """
    test_key = (
        "server_test_acc"
        if any(r.get("server_test_acc") is not None for r in rounds)
        else "client_test_acc_mean"
    )
    out: dict[str, Any] = {
        "best_round_by_val": None,
        "selected_by": None,
        "best_val_acc": None,
        "test_acc_at_best_val_round": None,
        "test_acc_metric": test_key,
    }
    for key in VALIDATION_KEYS:
        scored = [r for r in rounds if r.get(key) is not None]
        if scored:
            best = max(scored, key=lambda r: r[key])  # the first of equals: the earliest round
            out.update(
                best_round_by_val=best["round"],
                selected_by=key,
                best_val_acc=best[key],
                test_acc_at_best_val_round=best.get(test_key),
            )
            break
    return out


# Held while a run writes its folder: created atomically, so two runs never share one.
LOCK_NAME = ".fedkd.lock"
# Present for an instant while a run replaces a stale lock (see `_take_over_stale_lock`).
TAKEOVER_NAME = ".fedkd.lock.takeover"
# What may be in a folder before its run starts: `fedkd sweep` writes a point's log first.
PRE_RUN_FILES = frozenset({"run.log"})
# Statuses of summary.json.
STATUSES = ("completed", "failed", "interrupted")
# The run's cohort learner, as chosen when it started (`RunRecorder.record_learner`).
LEARNER_FILE = "learner.json"


class RunDirError(ValueError):
    """A results folder that a run cannot use, phrased as one line with the fix."""


def make_folder(path: Path, what: str) -> None:
    """Create `path` and its parents, or raise `RunDirError` naming `what` (e.g. ``--out``)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunDirError(
            f"{what} {path}: cannot create the folder ({err.strerror}); pass a new or "
            "writable folder"
        ) from None


def _lock_text() -> str:
    """What a lock file holds: the owner's pid and host, one per line."""
    return f"{os.getpid()}\n{socket.gethostname()}\n"


def _parse_lock(text: str) -> tuple[int | None, str | None]:
    """The pid and host a lock's text names (None where missing; older locks hold the pid only)."""
    fields = text.split()
    pid = int(fields[0]) if fields and fields[0].isdigit() else None
    return pid, fields[1] if len(fields) > 1 else None


def _read_lock(lock: Path) -> tuple[int | None, str | None]:
    try:
        return _parse_lock(lock.read_text())
    except OSError:
        return None, None


def _pid_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, under another user
        pass
    return True


def _lock_owner(lock: Path) -> str:
    pid, host = _read_lock(lock)
    if pid is None:
        return "a fedkd run"
    if host is not None and host != socket.gethostname():
        return f"fedkd run pid {pid} on host {host}"
    if host is None and not _pid_runs(pid):  # an older lock, which names no host
        return f"fedkd run pid {pid}, which no longer runs (killed?): remove {lock} if so"
    return f"fedkd run pid {pid}"


def _is_stale(lock: Path) -> bool:
    """True if the lock's owner ran on this host and no longer runs (a run killed by kill -9).

    A lock of another host, or one that names no host or pid, is never judged stale: its owner
    cannot be checked from here.
    """
    pid, host = _read_lock(lock)
    return pid is not None and host == socket.gethostname() and not _pid_runs(pid)


def _take_over_stale_lock(lock: Path) -> bool:
    """Replace a stale lock by this process's; False if it is not stale or another run won.

    Two runs may find the same stale lock: a takeover marker created with ``O_EXCL`` lets one
    of them replace it, and that one replaces it only if it still holds what was judged stale.
    """
    if not _is_stale(lock):
        return False
    stale_text = lock.read_text()
    marker = lock.with_name(TAKEOVER_NAME)
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        return False
    try:
        if lock.read_text() != stale_text:
            return False
        lock.unlink()
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w") as fh:
            fh.write(_lock_text())
    except FileExistsError:
        return False
    finally:
        marker.unlink(missing_ok=True)
    pid, _ = _parse_lock(stale_text)
    log.warning(
        "output folder %s: took over the lock of fedkd run pid %s, which no longer runs (killed?)",
        lock.parent,
        pid,
    )
    return True


def _acquire_lock(path: Path) -> Path:
    """Create `path` if needed and take its lock (``O_EXCL``; a stale lock is taken over)."""
    lock = path / LOCK_NAME
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        if not _take_over_stale_lock(lock):
            raise RunDirError(
                f"output folder {path} is in use by {_lock_owner(lock)}; pass another --out"
            ) from None
    except OSError as err:
        raise RunDirError(
            f"output folder {path}: cannot write there ({err.strerror}); pass a writable --out"
        ) from None
    else:
        with os.fdopen(fd, "w") as fh:
            fh.write(_lock_text())
    return lock


def claim_run_dir(path: str | Path) -> Path:
    """Create `path` (if needed) and claim it for one run; return the lock file.

    The lock is created with ``O_EXCL``, so of two runs started into the same folder exactly
    one gets it. It holds the owner's pid and host: a lock whose owner ran on this host and no
    longer runs (a run killed by ``kill -9``) is stale and taken over, with a warning. The
    folder must be new, empty, or hold only what a sweep writes before its point runs; a folder
    holding a run, or anything else, is refused.

    Parameters
    ----------
    path : str or Path
        The run's results folder.

    Returns
    -------
    Path
        The lock file; `RunRecorder.finish` removes it.

    Raises
    ------
    RunDirError
        If the folder cannot be created or written, is in use, holds a run or other files.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"output folder {path}: is a file; pass a folder path to --out")
    lock = _acquire_lock(path)
    lock_files = {LOCK_NAME, TAKEOVER_NAME}
    others = sorted(p.name for p in path.iterdir() if p.name not in PRE_RUN_FILES | lock_files)
    if others:
        lock.unlink()
        if "metrics.jsonl" in others:
            raise RunDirError(f"{path} already holds a run; pass another --out (or remove it)")
        raise RunDirError(
            f"output folder {path} is not empty and holds no run ({', '.join(others[:3])}"
            f"{', ...' if len(others) > 3 else ''}); pass a new or empty folder to --out"
        )
    return lock


def default_run_dir(spec: Spec, root: str | Path = "runs") -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{spec.name}-{stamp}"


def _clean(value: Any, keep_inf: bool = False) -> Any:
    """JSON has no NaN: write null instead. An infinite epsilon (an unprotected release) stays
    infinite (``Infinity``, which Python's json reads back): null means "no DP", not this."""
    if isinstance(value, float) and not math.isfinite(value):
        return value if keep_inf and math.isinf(value) else None
    if isinstance(value, dict):
        return {k: _clean(v, keep_inf or str(k).startswith("epsilon")) for k, v in value.items()}
    return value


def reclaim_run_dir(path: str | Path) -> Path:
    """Claim a folder that holds an unfinished run, to resume it; return the lock file.

    A lock left by a killed run of this host (its process no longer runs) is taken over, as in
    `claim_run_dir`; a live run's lock is refused.
    """
    return _acquire_lock(Path(path))


def recorded_learner(run_dir: str | Path) -> dict[str, Any] | None:
    """The learner choice a run recorded as it started (``learner.json``), or None."""
    try:
        return json.loads((Path(run_dir) / LEARNER_FILE).read_text())
    except (OSError, ValueError):
        return None


class RunRecorder:
    """Writes one run's results folder as the run goes.

    Parameters
    ----------
    out_dir : str or Path
        The results folder (claimed with `claim_run_dir`).
    spec : Spec
        The spec as run.
    keep_rows : int or None, default None
        Resume the run already in `out_dir` (`reclaim_run_dir`): keep its first `keep_rows`
        rows of ``metrics.jsonl`` (those a checkpoint has behind it), drop later ones, and
        append from there.
    """

    def __init__(self, out_dir: str | Path, spec: Spec, keep_rows: int | None = None) -> None:
        self.dir = Path(out_dir)
        self.spec = with_noise_rng(spec)  # as run: an unset noise source is the simulation's
        self.summary: dict[str, Any] | None = None
        self._finishing = threading.Lock()
        self.rounds: list[dict[str, Any]] = []
        self.started = time.perf_counter()
        self.provenance = run_provenance()  # the code as the run starts (fedkd.provenance)
        # The cohort learner the nodes run (`fedkd.assembly.learner_choice`); a resumed run
        # keeps the one it recorded as it started.
        self.learner: dict[str, Any] | None = None
        if keep_rows is None:
            self.lock: Path | None = claim_run_dir(self.dir)
            (self.dir / "spec.toml").write_text(self.spec.to_toml())
        else:
            self.lock = reclaim_run_dir(self.dir)
            self._keep_rows(keep_rows)
            self.learner = recorded_learner(self.dir)

    def _keep_rows(self, count: int) -> None:
        """Cut ``metrics.jsonl`` to its first `count` rows (a resumed run writes the rest)."""
        path = self.dir / "metrics.jsonl"
        lines = path.read_text().splitlines(keepends=True) if path.is_file() else []
        kept = [line for line in lines if line.endswith("\n")][:count]
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
        self.rounds = [json.loads(line) for line in kept]
        (self.dir / "summary.json").unlink(missing_ok=True)  # written again when it ends

    def record_round(self, metrics: dict[str, Any]) -> None:
        missing = [k for k in ROUND_KEYS if k not in metrics]
        if missing:
            raise KeyError(f"round metrics lack {missing}")
        row = _clean(metrics)
        self.rounds.append(row)
        with open(self.dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def record_learner(self, choice: dict[str, Any]) -> dict[str, Any]:
        """Keep the run's learner choice in ``learner.json`` (before the first round, so that
        a resumed run finds it) and, when the run ends, in ``summary.json``."""
        self.learner = choice
        self.write_extra(LEARNER_FILE, choice)
        return choice

    def write_extra(self, name: str, payload: Any) -> None:
        (self.dir / name).write_text(json.dumps(_clean(payload), indent=2))

    def finish(self, status: str = "completed", error: str | None = None) -> dict[str, Any]:
        """Write summary.json and release the folder; the first call decides the status.

        A run that is stopped while its server still works may be finished from two places
        (the signal's and the round loop's); the summary written first stays.
        """
        if status not in STATUSES:
            raise ValueError(f"status {status!r} is not one of {STATUSES}")
        with self._finishing:
            if self.summary is None:
                self.summary = self._finish(status, error)
        return self.summary

    def _finish(self, status: str, error: str | None) -> dict[str, Any]:
        server_accs = [r["server_test_acc"] for r in self.rounds]
        server_accs = [a for a in server_accs if a is not None]
        summary = {
            "spec_name": self.spec.name,
            "algorithm": self.spec.algorithm.name,
            "rounds": len(self.rounds),
            "rounds_planned": self.spec.rounds,
            "status": status,
            "error": error,
            "final": self.rounds[-1] if self.rounds else None,
            # Chosen by test accuracy: a diagnostic of how high the curve went, not a result
            # (best_server_test_acc_test_selected is the same number under a name that says so).
            "best_server_test_acc": max(server_accs) if server_accs else None,
            "best_server_test_acc_test_selected": max(server_accs) if server_accs else None,
            "total_bytes_up": sum(r["bytes_up"] for r in self.rounds),
            "total_bytes_down": sum(r["bytes_down"] for r in self.rounds),
            # Client-rounds lost to crashes, timeouts or non-finite uploads: a run that lost
            # some is not the run its spec describes.
            "total_clients_failed": sum(r["clients_failed"] for r in self.rounds),
            # Simulated faults, attacks and the defence's verdicts (docs/faults.md).
            **fault_totals(self.rounds),
            "wall_s": time.perf_counter() - self.started,
            "fedkd_version": fedkd.__version__,
            # Where the privacy mechanisms' noise came from (docs/noise.md): "seeded" epsilons
            # hold for the simulation only.
            "noise_rng": self.spec.privacy.noise,
            # Where the proxy inputs came from, with the parameters of that source and their
            # number (docs/proxy.md).
            "proxy": self.spec.proxy.record(self.spec.proxy_inputs),
            "provenance": self.provenance,
            # The cohort learner the nodes ran: requested, chosen, and the calibration behind
            # an "auto" choice (docs/scale.md).
            "learner": self.learner,
            # The result: the round selected on validation data, and its test accuracy.
            **select_round_by_validation(self.rounds),
        }
        self.write_extra("summary.json", summary)
        try:
            if self.spec.output.plots and self.rounds:
                from fedkd.plots import plot_run

                plot_run(self.rounds, self.dir, title=self.spec.name)
        finally:
            self.release()
        return summary

    def release(self) -> None:
        """Give the folder up (remove the lock); safe to call more than once."""
        if self.lock is not None:
            self.lock.unlink(missing_ok=True)
            self.lock = None


# -- what an audited run keeps for `fedkd audit` -----------------------------------------------


def student_path(run_dir: str | Path, client_id: int) -> Path:
    """Where a run keeps an audited client's final student."""
    return Path(run_dir) / "audit" / f"client-{client_id}.pt"


def save_student(
    run_dir: str | Path,
    client_id: int,
    arch: str,
    state: dict[str, np.ndarray],
    rounds_trained: int,
) -> Path:
    """Write a client's final student (weights as sent by its node) into the run folder."""
    path = student_path(run_dir, client_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    import torch  # here only: reading a results folder (fedkd report) needs no torch

    torch.save(
        {
            "client_id": int(client_id),
            "arch": arch,
            "rounds_trained": int(rounds_trained),
            "model": {k: torch.from_numpy(np.array(v)) for k, v in state.items()},
        },
        path,
    )
    return path


def save_teachers(run_dir: str | Path, teachers: dict[int, dict[str, np.ndarray]]) -> Path:
    """Keep the digests the audited client distilled from (round -> proxy_idx, teacher_logits).

    Only logit teachers are kept (other digests, e.g. FedAvg's weights, are not replayed).
    """
    path = Path(run_dir) / "audit" / "teachers.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        f"{rnd}.{key}": teachers[rnd][key]
        for rnd in sorted(teachers)
        if {"proxy_idx", "teacher_logits"} <= set(teachers[rnd])
        for key in ("proxy_idx", "teacher_logits")
    }
    np.savez(path, **arrays)
    return path


def load_teachers(run_dir: str | Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """The kept digests in round order, as (proxy indices, teacher logits); [] if none."""
    path = Path(run_dir) / "audit" / "teachers.npz"
    if not path.is_file():
        return []
    with np.load(path) as npz:
        rounds = sorted({int(k.split(".")[0]) for k in npz.files})
        return [(npz[f"{r}.proxy_idx"], npz[f"{r}.teacher_logits"]) for r in rounds]


def read_run(run_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A run's summary and per-round metrics, for reports and scripts.

    A last line without its newline is a row cut off by a killed run (each row is written and
    flushed whole): it is left out, since its round never finished being recorded.

    Raises
    ------
    FileNotFoundError
        If the folder holds no ``metrics.jsonl``.
    RunDirError
        If ``metrics.jsonl`` or ``summary.json`` is damaged (a row without its round number
        included).
    """
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (is this a fedkd run folder?)")
    text = _read_text(metrics_path)
    lines = text.split("\n")
    if lines and not text.endswith("\n"):
        lines = lines[:-1]  # the row a kill cut off
    rounds = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            row = _parse_json(metrics_path, line, f"line {number}")
            if not isinstance(row, dict):
                raise RunDirError(f"{metrics_path}: line {number} is not a metrics row")
            if not isinstance(row.get("round"), int):  # every row names its round
                raise RunDirError(f"{metrics_path}: line {number} has no round number")
            rounds.append(row)
    summary = {}
    if summary_path.is_file():
        summary = _parse_json(summary_path, _read_text(summary_path), "the file")
        if not isinstance(summary, dict):
            raise RunDirError(f"{summary_path}: not a fedkd summary (a JSON object)")
    return summary, rounds


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise RunDirError(f"{path}: cannot read it ({err}); is this a fedkd run folder?") from None


def _parse_json(path: Path, text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise RunDirError(
            f"{path}: {where} is not valid JSON ({err.msg}); the file was damaged or edited"
        ) from None
