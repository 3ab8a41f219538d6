"""PNG plots of a run and of several runs side by side."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedkd.stats import describe  # noqa: E402


def _series(rounds: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    # Not plotted: null, and an infinite epsilon (an unprotected release; the run's files say so).
    pts = [(r["round"], r[key]) for r in rounds if r.get(key) is not None]
    pts = [p for p in pts if not (isinstance(p[1], float) and not math.isfinite(p[1]))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(rounds: list[dict[str, Any]], out_dir: Path, title: str = "") -> list[Path]:
    """accuracy.png, bytes.png and (with DP) epsilon.png for one run."""
    out: list[Path] = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label, style in (
        ("server_test_acc", "server model", "-"),
        ("teacher_test_acc", "teacher (ensemble)", "-"),
        ("client_test_acc_mean", "clients (mean)", "-"),
        ("server_val_acc", "server model, validation", "--"),
        ("client_val_acc_mean", "clients (mean), validation", "--"),
    ):
        x, y = _series(rounds, key)
        if x:
            ax.plot(x, y, style, marker="o", ms=3, label=label)
    x, lo = _series(rounds, "client_test_acc_min")
    _, hi = _series(rounds, "client_test_acc_max")
    if x and len(lo) == len(hi):
        ax.fill_between(x, lo, hi, alpha=0.15, label="clients (min-max)")
    ax.set(xlabel="round", ylabel="accuracy (test; dashed: validation)", title=f"{title}: accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    out.append(_save(fig, out_dir / "accuracy.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("bytes_up", "bytes_down"):
        x, y = _series(rounds, key)
        ax.plot(x, y, marker="o", ms=3, label=key.replace("_", " "))
    ax.set(xlabel="round", ylabel="bytes per round (all clients)", title=f"{title}: traffic")
    ax.set_yscale("symlog")
    ax.grid(alpha=0.3)
    ax.legend()
    out.append(_save(fig, out_dir / "bytes.png"))

    x, y = _series(rounds, "epsilon_max")
    if x:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(x, y, marker="o", ms=3, label="max over clients")
        ax.set(xlabel="round", ylabel="cumulative epsilon", title=f"{title}: privacy")
        ax.grid(alpha=0.3)
        ax.legend()
        out.append(_save(fig, out_dir / "epsilon.png"))
    return out


def plot_comparison(
    groups: dict[str, list[list[dict[str, Any]]]], path: Path, key: str = "server_test_acc"
) -> Path:
    """One curve per group of runs (seeds of one setting): the mean over its runs per round,
    with a band of plus and minus the sample standard deviation where two or more runs have
    the round. Falls back to the clients' mean where a group has no server model."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, runs in groups.items():
        metric, style = key, "-"
        if not any(_series(rounds, key)[0] for rounds in runs):
            metric, style, label = "client_test_acc_mean", "--", f"{label} (clients' mean)"
        per_round: dict[int, list[float]] = {}
        for rounds in runs:
            for rnd, value in zip(*_series(rounds, metric), strict=True):
                per_round.setdefault(rnd, []).append(value)
        x = sorted(per_round)
        stats = [(s.mean, s.sd) for s in (describe(per_round[r]) for r in x)]
        n = max((len(v) for v in per_round.values()), default=0)
        (line,) = ax.plot(
            x, [m for m, _ in stats], style, marker="o", ms=3, label=f"{label} (n={n})"
        )
        banded = [(r, m, sd) for r, (m, sd) in zip(x, stats, strict=True) if sd is not None]
        if banded:
            ax.fill_between(
                [b[0] for b in banded],
                [b[1] - b[2] for b in banded],
                [b[1] + b[2] for b in banded],
                color=line.get_color(),
                alpha=0.15,
            )
    ax.set(
        xlabel="round",
        ylabel="global test accuracy",
        title="comparison: mean over seeds, band ± sample sd",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
