"""`fedkd run --resume RUN_DIR`: continue a stopped run from its last checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedkd.results import LEARNER_FILE, RunDirError, recorded_learner
from fedkd.rounds.checkpoint import CHECKPOINTS, checkpoint_info, last_checkpoint
from fedkd.run.sweep import read_summary, spec_mismatch
from fedkd.spec import Spec, load_spec, with_noise_rng


@dataclass(frozen=True)
class ResumePoint:
    """Where a run goes on: its spec, its last whole checkpoint, and the rows that stay."""

    spec: Spec
    checkpoint: Path
    rows: int


def run_status(run_dir: Path) -> str | None:
    """The status a run folder's ``summary.json`` records, or None (no summary)."""
    return (read_summary(run_dir) or {}).get("status")


def resume_point(run_dir: Path, spec_path: str | None, overrides: list[str]) -> ResumePoint:
    """The run in `run_dir` and where it resumes; the spec is the one the folder holds.

    A spec file or ``--set`` given with ``--resume`` must not change it: they are applied to
    the run's spec (a spec file instead of it) and compared key by key.

    Raises
    ------
    RunDirError
        If the folder holds no run, no whole checkpoint, or the given spec differs; or the
        run's spec says ``resources.learner = "auto"`` and its ``learner.json`` (the choice it
        started with, which the resumed run reuses) is missing.
    SpecError
        If the stored or the given spec does not load.
    """
    saved = run_dir / "spec.toml"
    if not saved.is_file():
        raise RunDirError(f"--resume {run_dir}: no spec.toml there; pass the folder of a fedkd run")
    spec = load_spec(saved)
    if spec_path is not None or overrides:
        given = load_spec(spec_path if spec_path is not None else saved, overrides)
        differ = spec_mismatch(saved, with_noise_rng(given).to_dict())
        if differ:
            raise RunDirError(
                f"--resume {run_dir}: spec key {differ[0]} differs from the run's spec.toml; "
                "resume with the run's own spec (leave out the spec and --set), or start a new "
                "run with --out"
            )
    checkpoint = last_checkpoint(run_dir)
    if checkpoint is None:
        raise RunDirError(
            f"--resume {run_dir}: no complete checkpoint under {CHECKPOINTS}/ (the run "
            "stopped before its first round ended, or predates checkpoints); start it again "
            "with fedkd run --out <new folder>"
        )
    if spec.resources.learner == "auto" and recorded_learner(run_dir) is None:
        # Calibrating again could choose the other learner: the rounds to come would not be
        # the rounds the run began with (docs/scale.md).
        raise RunDirError(
            f"--resume {run_dir}: resources.learner = 'auto' but the run's {LEARNER_FILE} is "
            "missing; start it again with fedkd run --out <new folder>"
        )
    return ResumePoint(spec, checkpoint, checkpoint_info(checkpoint)["rows"])
