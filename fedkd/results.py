"""The results folder of a run (docs/results-files.md: keep these names stable).

- ``spec.toml``: the spec exactly as run, defaults filled in.
- ``metrics.jsonl``: one JSON object per round, appended and flushed as each round ends, so a
  crash never loses a finished round.
- ``summary.json``: the last round's metrics, run totals, and the round selected on validation
  data with its test accuracy (the reported result).
- ``*.png``: accuracy, bytes and (with DP) epsilon per round.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import fedkd
from fedkd.provenance import run_provenance
from fedkd.spec import Spec, with_noise_rng

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


class RunRecorder:
    """Writes one run's results folder as the run goes."""

    def __init__(self, out_dir: str | Path, spec: Spec) -> None:
        self.dir = Path(out_dir)
        if (self.dir / "metrics.jsonl").exists():
            raise FileExistsError(
                f"{self.dir} already holds a run; choose another output.dir (or remove it)"
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        self.spec = with_noise_rng(spec)  # as run: an unset noise source is the simulation's
        self.rounds: list[dict[str, Any]] = []
        self.started = time.perf_counter()
        self.provenance = run_provenance()  # the code as the run starts (fedkd.provenance)
        (self.dir / "spec.toml").write_text(self.spec.to_toml())

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

    def write_extra(self, name: str, payload: Any) -> None:
        (self.dir / name).write_text(json.dumps(_clean(payload), indent=2))

    def finish(self, status: str = "completed", error: str | None = None) -> dict[str, Any]:
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
            "wall_s": time.perf_counter() - self.started,
            "fedkd_version": fedkd.__version__,
            # Where the privacy mechanisms' noise came from (docs/noise.md): "seeded" epsilons
            # hold for the simulation only.
            "noise_rng": self.spec.privacy.noise,
            "provenance": self.provenance,
            # The result: the round selected on validation data, and its test accuracy.
            **select_round_by_validation(self.rounds),
        }
        self.write_extra("summary.json", summary)
        if self.spec.output.plots and self.rounds:
            from fedkd.plots import plot_run

            plot_run(self.rounds, self.dir, title=self.spec.name)
        return summary


def read_run(run_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A run's summary and per-round metrics, for reports and scripts."""
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (is this a fedkd run folder?)")
    rounds = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return summary, rounds
