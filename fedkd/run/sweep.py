"""`fedkd sweep SPEC`: every point of the spec's ``[sweep] grid`` as a normal run, then a table.

A grid maps dotted spec keys to lists of values; the points are their cartesian product, in
the order the keys are written (the last key varies fastest). Each point is an ordinary
`fedkd run` of the same spec file with ``--set`` overrides, into ``OUT/<point>/`` (the usual
results folder), so any point can be inspected, reported or rerun on its own.

"none" is the point without a mechanism: for ``privacy.target_epsilon`` (or
``privacy.noise_multiplier``) it turns DP-SGD off (``privacy.dpsgd = false``, and a
class-weighted teacher's label histograms go out exact), for
``privacy.release_noise`` the Gaussian release, for ``privacy.budget_epsilon`` the budget
(`fedkd.spec.SWEEP_NONE_MEANS`).

Points run as separate ``fedkd run`` processes, ``--parallel N`` at a time. Why processes and
not Ray tasks: Flower's ``run_simulation`` starts and stops its own Ray runtime in the calling
process, so two simulations cannot share a process, and one started inside a Ray task would
try to start Ray inside a Ray worker. A process per point keeps each run exactly what
``fedkd run`` does, with its own Ray instance, and one crashing point cannot take the others
down.

Resumable: a point whose ``summary.json`` says ``completed`` is not rerun (after checking its
``spec.toml`` is the point's spec, name and grid aside: a ``fedkd run`` of the same settings
counts); a point that died or was stopped after a checkpoint resumes from it (``fedkd run
--resume``), and any other unfinished point folder is moved to ``OUT/_incomplete/`` and run
again.
``sweep.csv`` (one row per point) and ``accuracy_vs_epsilon.png`` (final accuracy against the
run's ``epsilon_max``, mean and standard deviation over seeds; points without DP as a
horizontal band) are rewritten as points finish.

Selection (``selection.csv``, written when the sweep ends): within each privacy budget (the
values of ``sweep.select_within``, by default the grid's ``privacy.*`` keys), the setting of the
other grid keys (``seed`` aside) with the best validation accuracy, averaged over seeds, and the
test accuracy of that pick (each run at its round selected on validation: its summary's
``test_acc_at_best_val_round``). Test accuracy never takes part in the pick; the setting that
test accuracy would have picked is shown beside it as a diagnostic (docs/validation.md).
"""

from __future__ import annotations

import csv
import functools
import itertools
import json
import math
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w

from fedkd.results import make_folder
from fedkd.rounds.checkpoint import last_checkpoint
from fedkd.spec import (
    LEGACY_ALGORITHM_DEFAULTS,
    SWEEP_NONE,
    SWEEP_NONE_MEANS,
    Spec,
    SpecError,
    load_spec,
    spec_from_dict,
    with_noise_rng,
)

__all__ = [
    "CSV_KEYS",
    "EpsilonPoints",
    "SweepError",
    "SweepPoint",
    "accuracy_vs_epsilon_points",
    "default_flat_spec",
    "expand_grid",
    "plot_accuracy_vs_epsilon",
    "run_sweep",
    "select_by_validation",
    "selection_of",
    "subprocess_runner",
    "sweep_table",
]

CSV_KEYS = (
    "status",
    "server_test_acc",
    "best_server_test_acc",
    "client_test_acc_mean",
    "epsilon_max",
    "clients_failed",
    "wall_s",
    "run_dir",
    "selected_by",
    "best_round_by_val",
    "val_acc",
    "test_acc_at_best_val_round",
)

# (spec file, --set overrides, results folder) -> exit status of the run.
Runner = Callable[[Path, list[str], Path], int]


class SweepError(RuntimeError):
    """A sweep cannot go on (e.g. a finished point was run with another spec)."""


@dataclass(frozen=True)
class SweepPoint:
    """One run of the grid.

    Attributes
    ----------
    name : str
        Folder name, e.g. ``target_epsilon=0.5,seed=0``.
    values : dict
        Grid key -> value, as written in the grid ("none" included).
    overrides : list of str
        The ``--set key=value`` items that make the point's spec from the sweep's spec.
    """

    name: str
    values: dict[str, Any]
    overrides: list[str]


def _toml_value(value: Any) -> str:
    """A value as ``--set`` reads it (TOML)."""
    if isinstance(value, dict):
        inner = ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + inner + " }"
    return tomli_w.dumps({"v": value}).split("=", 1)[1].strip()


def _label(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "+".join(_label(v) for v in value)
    text = str(value)
    return "".join(ch if ch.isalnum() or ch in "._+-" else "_" for ch in text)


def _short_names(keys: list[str]) -> dict[str, str]:
    """The last part of each key, unless two keys share it (train.lr, distill.lr)."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: s if last.count(s) == 1 else k for k, s in zip(keys, last, strict=True)}


def expand_grid(grid: dict[str, list[Any]], name: str = "") -> list[SweepPoint]:
    """The cartesian product of a (validated, flat) grid, as points with their overrides.

    Parameters
    ----------
    grid : dict
        Dotted spec key -> list of values (``Spec.sweep.grid`` after validation).
    name : str, optional
        The sweep spec's name; each point's run is named ``<name>-<point>``.

    Returns
    -------
    list of SweepPoint
        In grid order, the last key varying fastest.
    """
    keys = list(grid)
    short = _short_names(keys)
    points = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        values = dict(zip(keys, combo, strict=True))
        point = ",".join(f"{short[k]}={_label(v)}" for k, v in values.items())
        overrides = []
        for key, value in values.items():
            if value == SWEEP_NONE:
                overrides += [f"{k}={_toml_value(v)}" for k, v in SWEEP_NONE_MEANS[key].items()]
            else:
                overrides.append(f"{key}={_toml_value(value)}")
        # A point is a plain run: its spec.toml carries no grid of its own.
        overrides += [
            "sweep.grid={}",
            "sweep.select_within=[]",
            f"name={_toml_value(f'{name}-{point}' if name else point)}",
        ]
        points.append(SweepPoint(point, values, overrides))
    return points


def resumable(run_dir: Path) -> bool:
    """Whether a point's folder holds a run that died or was stopped after a checkpoint
    (``fedkd run --resume`` continues it); a failed run is not resumed."""
    status = (read_summary(run_dir) or {}).get("status")
    return status in (None, "interrupted") and last_checkpoint(run_dir) is not None


def subprocess_runner(spec_path: Path, overrides: list[str], out_dir: Path) -> int:
    """Run one point as ``fedkd run`` in its own process (own Ray runtime); log to run.log.

    A point that died after a checkpoint (`resumable`) resumes from it, its spec checked
    against the point's."""
    cmd = [sys.executable, "-m", "fedkd.run.cli", "run", str(spec_path)]
    for item in overrides:
        cmd += ["--set", item]
    resume = resumable(out_dir)
    cmd += ["--resume" if resume else "--out", str(out_dir), "--quiet"]
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "run.log", "a" if resume else "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False).returncode


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# Top-level spec keys that label or file a run, or plan a sweep: nothing a run computes.
_NOT_COMPARED = frozenset({"name", "output", "sweep"})


def spec_mismatch(saved_toml: Path, expected: dict[str, Any]) -> list[str]:
    """Keys where a finished point's spec.toml differs from the point's spec now.

    The run's name, its output settings and a ``[sweep]`` table change nothing a run computes,
    so a plain ``fedkd run`` of the point's settings, put into ``OUT/<point>/``, counts as done.
    """
    saved = _flat(tomllib.loads(saved_toml.read_text()))
    want = _flat(tomllib.loads(tomli_w.dumps(expected)))
    keys = {k for k in set(saved) | set(want) if k.split(".")[0] not in _NOT_COMPARED}
    # A run recorded before each algorithm had its own parameters holds the old flat
    # [algorithm] table: another algorithm's key at its old default changed nothing.
    keys -= {
        k
        for k in set(saved) - set(want)
        if k.startswith("algorithm.")
        and LEGACY_ALGORITHM_DEFAULTS.get(k.split(".", 1)[1], ...) == saved[k]
    }
    # A run recorded before a key existed lacks it: a key added since, at its default, changes
    # nothing (a new option's default keeps the old behaviour).
    defaults = default_flat_spec(want.get("algorithm.name"))
    keys -= {k for k in set(want) - set(saved) if k in defaults and defaults[k] == want[k]}
    return sorted(k for k in keys if saved.get(k) != want.get(k))


@functools.lru_cache(maxsize=32)
def default_flat_spec(algorithm_name: Any) -> dict[str, Any]:
    """Every key of a spec that sets only ``algorithm.name``, flattened; empty if none builds.

    A run recorded before a key existed lacks it; at this default the key changes nothing.
    """
    try:
        spec = spec_from_dict({"algorithm": {"name": algorithm_name}} if algorithm_name else {})
    except (SpecError, ValueError, ImportError):
        return {}
    flat = _flat(tomllib.loads(tomli_w.dumps(spec.to_dict())))
    del flat["algorithm.name"]  # the name picks the defaults: never a default itself
    return flat


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """A run folder's ``summary.json``, or None (none, or unreadable)."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def _row(point: SweepPoint, run_dir: Path, status: str | None = None) -> dict[str, Any]:
    summary = read_summary(run_dir) or {}
    final = summary.get("final") or {}
    row: dict[str, Any] = {"point": point.name, **point.values}
    row.update(
        {
            "status": status or summary.get("status", "not run"),
            "server_test_acc": final.get("server_test_acc"),
            "best_server_test_acc": summary.get("best_server_test_acc"),
            "client_test_acc_mean": final.get("client_test_acc_mean"),
            "epsilon_max": final.get("epsilon_max"),
            "clients_failed": summary.get("total_clients_failed"),
            "wall_s": summary.get("wall_s"),
            "run_dir": str(run_dir),
            "selected_by": summary.get("selected_by"),
            "best_round_by_val": summary.get("best_round_by_val"),
            "val_acc": summary.get("best_val_acc"),
            "test_acc_at_best_val_round": summary.get("test_acc_at_best_val_round"),
        }
    )
    return row


def _write_csv(path: Path, keys: list[str], rows: list[dict[str, Any]]) -> None:
    _write_table(path, ["point", *keys, *CSV_KEYS], rows)


def _write_table(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: "" if row.get(c) is None else row[c] for c in columns})


def _accuracy_key(rows: list[dict[str, Any]]) -> str:
    """Final server accuracy; the clients' mean for algorithms without a server model."""
    if any(r.get("server_test_acc") is not None for r in rows):
        return "server_test_acc"
    return "client_test_acc_mean"


def _seed_sd(values: Any) -> float:
    """Sample standard deviation over seeds (n - 1: a handful of seeds is a sample); 0 for one."""
    values = np.asarray(values, dtype=float)
    return float(values.std(ddof=1)) if len(values) > 1 else 0.0


@dataclass
class EpsilonPoints:
    """What `plot_accuracy_vs_epsilon` draws, grouped over seeds.

    Attributes
    ----------
    acc_key : str
        The accuracy plotted (`_accuracy_key`).
    series : dict
        Per series (the grid keys outside ``privacy.*``), its points with a finite epsilon:
        ``(epsilon mean, epsilon sd, accuracy mean, accuracy sd, privacy setting)``.
    flat : dict
        Per series, the point without DP (no epsilon): ``(accuracy mean, sd, runs)``.
    unprotected : list of str
        The points whose epsilon is infinite (an unprotected release): not plotted, named in
        the figure; the table shows their ``inf``.
    n_seeds : int
        The most runs in one point.
    """

    acc_key: str
    series: dict[tuple, list[tuple[float, float, float, float, str]]]
    flat: dict[tuple, tuple[float, float, int]]
    unprotected: list[str]
    n_seeds: int


def accuracy_vs_epsilon_points(rows: list[dict[str, Any]], keys: list[str]) -> EpsilonPoints:
    """The completed rows of a sweep grouped by every grid key but ``seed``, split into points
    with a finite epsilon, points without DP, and points with an infinite epsilon.

    Parameters
    ----------
    rows : list of dict
        The sweep's rows (as in ``sweep.csv``).
    keys : list of str
        The grid's keys.

    Returns
    -------
    EpsilonPoints
        The groups, by kind.
    """
    done = [r for r in rows if r["status"] == "completed"]
    acc_key = _accuracy_key(done)
    group_keys = [k for k in keys if k != "seed"]
    series_keys = [k for k in group_keys if not k.startswith("privacy.")]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in done:
        if r.get(acc_key) is not None:
            groups.setdefault(tuple(_label(r[k]) for k in group_keys), []).append(r)
    points = EpsilonPoints(acc_key, {}, {}, [], max((len(g) for g in groups.values()), default=0))
    for gkey, members in groups.items():
        values = dict(zip(group_keys, gkey, strict=True))
        skey = tuple(values[k] for k in series_keys)
        accs = np.array([m[acc_key] for m in members], dtype=float)
        eps = [m["epsilon_max"] for m in members if m.get("epsilon_max") is not None]
        if not eps:  # no DP at this point: a horizontal band at its accuracy
            points.flat[skey] = (float(accs.mean()), _seed_sd(accs), len(accs))
            continue
        if not all(math.isfinite(e) for e in eps):  # an unprotected release: no point to draw
            points.unprotected.append(",".join(f"{k}={values[k]}" for k in group_keys))
            continue
        # Each point is labelled with its privacy setting (e.g. the target epsilon).
        tag = ",".join(values[k] for k in group_keys if k.startswith("privacy."))
        points.series.setdefault(skey, []).append(
            (float(np.mean(eps)), _seed_sd(eps), float(accs.mean()), _seed_sd(accs), tag)
        )
    return points


def plot_accuracy_vs_epsilon(rows: list[dict[str, Any]], keys: list[str], path: Path) -> Path:
    """Final accuracy against ``epsilon_max``: mean and sample sd over seeds, no-DP as bands.

    Points are grouped by every grid key but ``seed``; groups that differ in keys outside
    ``privacy.*`` (e.g. the algorithm) are drawn as separate series. Points whose epsilon is
    infinite (an unprotected release) have no place on the axis: they are named below it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = accuracy_vs_epsilon_points(rows, keys)
    series, flat = points.series, points.flat
    series_keys = [k for k in keys if k != "seed" and not k.startswith("privacy.")]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, skey in enumerate(sorted(set(series) | set(flat))):
        color = colors[i % len(colors)]
        label = " ".join(
            f"{k.rsplit('.', 1)[-1]}={v}" for k, v in zip(series_keys, skey, strict=True)
        )
        if skey in series:
            pts = sorted(series[skey])
            x, xerr, y, yerr = (np.array([p[i] for p in pts]) for i in range(4))
            for px, py, p in zip(x, y, pts, strict=True):
                ax.annotate(p[4], (px, py), textcoords="offset points", xytext=(4, 4), fontsize=7)
            ax.errorbar(
                x,
                y,
                xerr=xerr,
                yerr=yerr,
                marker="o",
                ms=4,
                capsize=3,
                color=color,
                label=f"DP {label}".strip(),
            )
        if skey in flat:
            mean, std, n = flat[skey]
            ax.axhline(mean, ls="--", color=color, label=f"no DP {label}".strip() + f" (n={n})")
            ax.axhspan(mean - std, mean + std, color=color, alpha=0.12)
    if series:
        ax.set_xscale("log", base=2)
    ax.margins(x=0.15, y=0.15)
    ax.set(
        xlabel="epsilon_max (cumulative, largest over clients)",
        ylabel=f"final {points.acc_key}",
        title=f"accuracy vs epsilon (mean ± sample sd over {points.n_seeds} seeds)",
    )
    if points.unprotected:
        note = "not plotted, epsilon = inf (unprotected release): "
        fig.text(0.01, 0.01, note + "; ".join(points.unprotected), fontsize=7, wrap=True)
    ax.grid(alpha=0.3)
    if series or flat:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout(rect=(0, 0.05 if points.unprotected else 0, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def select_by_validation(
    rows: list[dict[str, Any]], keys: list[str], within: list[str]
) -> list[dict[str, Any]]:
    """Per privacy budget, the grid setting with the best validation accuracy, and its test
    accuracy.

    Parameters
    ----------
    rows : list of dict
        The sweep's rows (as in ``sweep.csv``), in grid order.
    keys : list of str
        The grid's keys.
    within : list of str
        The grid keys that make a budget; the others, ``seed`` aside, are the hyperparameters
        selected over.

    Returns
    -------
    list of dict
        One row per budget, in grid order: the budget's values; ``pick`` (the selected setting,
        ``key=value,...``); ``seeds`` (completed runs of it); ``candidates`` (settings with a
        validation score); ``selected_by``; ``val_acc`` (its mean over seeds, the score the
        pick maximises; ties go to the first in grid order); ``test_acc`` and ``test_acc_sd``
        (mean and sample sd over seeds of ``test_acc_at_best_val_round``; no sd from one
        seed); ``epsilon_max``
        (mean); and, as a diagnostic that took no part in the pick, ``test_selected_pick`` and
        ``test_selected_test_acc`` (the setting with the best mean test accuracy). Settings
        scored by different validation metrics are not compared: such a budget gets no pick.
    """
    hyper = [k for k in keys if k not in within and k != "seed"]
    short = _short_names(hyper)
    budgets: dict[tuple, dict[str, list[dict[str, Any]]]] = {}
    for r in rows:
        budget = budgets.setdefault(tuple(r[k] for k in within), {})
        if r["status"] == "completed" and r.get("val_acc") is not None:
            setting = ",".join(f"{short[k]}={_label(r[k])}" for k in hyper)
            budget.setdefault(setting, []).append(r)
    out = []
    for budget, settings in budgets.items():
        metrics = sorted({r["selected_by"] for runs in settings.values() for r in runs})
        row: dict[str, Any] = dict(zip(within, budget, strict=True))
        row.update(dict.fromkeys(_SELECTION_COLUMNS), candidates=len(settings))
        row["selected_by"] = "+".join(metrics) or None
        out.append(row)
        if len(metrics) != 1:  # nothing to pick from, or scores that are not comparable
            continue
        val = {s: _mean(_values(runs, "val_acc")) for s, runs in settings.items()}
        pick = max(val, key=val.__getitem__)  # the first of equals, in grid order
        tests = _values(settings[pick], "test_acc_at_best_val_round")
        row.update(
            pick=pick,
            seeds=len(settings[pick]),
            val_acc=val[pick],
            test_acc=_mean(tests),
            test_acc_sd=_seed_sd(tests) if len(tests) > 1 else None,
            epsilon_max=_mean(_values(settings[pick], "epsilon_max")),
        )
        tested = {
            s: _mean(_values(runs, "test_acc_at_best_val_round")) for s, runs in settings.items()
        }
        tested = {s: a for s, a in tested.items() if a is not None}
        if tested:
            oracle = max(tested, key=tested.__getitem__)
            row.update(test_selected_pick=oracle, test_selected_test_acc=tested[oracle])
    return out


_SELECTION_COLUMNS = (
    "pick",
    "selected_by",
    "val_acc",
    "test_acc",
    "test_acc_sd",
    "seeds",
    "candidates",
    "epsilon_max",
    "test_selected_pick",
    "test_selected_test_acc",
)


def _values(runs: list[dict[str, Any]], key: str) -> list[float]:
    return [r[key] for r in runs if r.get(key) is not None]


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def selection_within(spec: Spec) -> list[str]:
    """The grid keys that make a budget: ``sweep.select_within``, else the ``privacy.*`` keys."""
    return list(spec.sweep.select_within) or [
        k for k in spec.sweep.grid if k.startswith("privacy.")
    ]


def selection_of(spec: Spec, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`select_by_validation` for a (validated) sweep spec's rows."""
    return select_by_validation(rows, list(spec.sweep.grid), selection_within(spec))


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"  # an infinite epsilon: an unprotected release
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def sweep_table(rows: list[dict[str, Any]], title: str = "fedkd sweep") -> Any:
    """The rows of sweep.csv (or of the selection) as a Rich table (without the run folders)."""
    from rich.table import Table

    table = Table(title=title)
    columns = [c for c in (rows[0] if rows else {}) if c != "run_dir"]
    for col in columns:
        numeric = isinstance(next((r[col] for r in rows if r[col] is not None), ""), float | int)
        table.add_column(col, justify="right" if numeric else "left")
    digits = {"epsilon_max": 3, "wall_s": 1}
    for row in rows:
        table.add_row(*(_fmt(row[c], digits.get(c, 4)) for c in columns))
    return table


def run_sweep(
    spec_path: str | Path,
    out_dir: str | Path | None = None,
    *,
    overrides: list[str] | None = None,
    parallel: int = 1,
    runner: Runner = subprocess_runner,
    echo: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run (or resume) every point of a spec's sweep grid; write sweep.csv and the plot.

    Parameters
    ----------
    spec_path : str or Path
        A spec file with a ``[sweep]`` grid.
    out_dir : str or Path, optional
        The sweep folder (default ``runs/<name>-sweep``: the same folder on every call, so
        that calling again resumes).
    overrides : list of str, optional
        ``key=value`` overrides applied to every point (before the grid's values).
    parallel : int, default 1
        Points run at a time.
    runner : callable, default :func:`subprocess_runner`
        Runs one point into its folder and returns its exit status.
    echo : callable, default print
        Where progress lines go.

    Returns
    -------
    list of dict
        The rows of ``sweep.csv``, in grid order.

    Raises
    ------
    SpecError
        If the spec, its grid or any point's spec is invalid (nothing has run then).
    SweepError
        If a finished point in ``out_dir`` was run with a different spec.
    RunDirError
        If ``out_dir`` cannot be created.
    """
    spec_path = Path(spec_path)
    base = list(overrides or [])
    spec = load_spec(spec_path, base)
    grid = spec.sweep.grid
    if not grid:
        raise SpecError(
            f"sweep.grid: {spec_path} has no [sweep] grid; add one, e.g. "
            'grid = { "privacy.target_epsilon" = [1, 4, "none"], seed = [0, 1] }'
        )
    if parallel < 1:
        raise SpecError(f"--parallel: must be >= 1, got {parallel}")
    keys = list(grid)
    points = expand_grid(grid, spec.name)
    expected = {}
    for point in points:  # every point is checked before any runs
        try:
            point_spec = load_spec(spec_path, base + point.overrides)
            # As a run records it in spec.toml: an unset noise_rng is the simulation's.
            expected[point.name] = with_noise_rng(point_spec).to_dict()
        except SpecError as err:
            raise SpecError(f"sweep point {point.name}: {err}") from None

    out = Path(out_dir) if out_dir else Path("runs") / f"{spec.name}-sweep"
    make_folder(out, "sweep folder")
    rows: dict[str, dict[str, Any]] = {}
    todo: list[SweepPoint] = []
    for point in points:
        run_dir = out / point.name
        summary = read_summary(run_dir)
        if summary is not None and summary.get("status") == "completed":
            diff = spec_mismatch(run_dir / "spec.toml", expected[point.name])
            if diff:
                raise SweepError(
                    f"{run_dir} was completed with a different spec ({', '.join(diff[:5])} "
                    "differ); use another --out, or remove that folder to rerun it"
                )
            rows[point.name] = _row(point, run_dir)
            continue
        if resumable(run_dir) and not spec_mismatch(run_dir / "spec.toml", expected[point.name]):
            echo(f"{point.name}: resumes from {last_checkpoint(run_dir)}")
        elif run_dir.exists() and any(run_dir.iterdir()):
            # A failed point, or one that died before a checkpoint: keep it aside, never
            # overwrite it.
            stale = out / "_incomplete" / f"{point.name}-{time.strftime('%Y%m%d-%H%M%S')}"
            stale.parent.mkdir(exist_ok=True)
            run_dir.rename(stale)
            echo(f"{point.name}: unfinished earlier run moved to {stale}")
        todo.append(point)

    (out / "sweep.toml").write_text(spec.to_toml())  # the sweep as run, grid included

    def ordered() -> list[dict[str, Any]]:
        return [rows[p.name] for p in points if p.name in rows]

    _write_csv(out / "sweep.csv", keys, ordered())
    echo(
        f"sweep {spec.name}: {len(points)} points, {len(points) - len(todo)} already done, "
        f"{len(todo)} to run, {parallel} at a time -> {out}"
    )
    finished = 0
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        futures = {
            pool.submit(runner, spec_path, base + p.overrides, out / p.name): p for p in todo
        }
        for future in as_completed(futures):
            point = futures[future]
            try:
                code = future.result()
                status = None if code == 0 else "failed"
            except Exception as err:  # a runner that raises fails its point, not the sweep
                echo(f"{point.name}: runner error {type(err).__name__}: {err}")
                status = "failed"
            rows[point.name] = _row(point, out / point.name, status)
            finished += 1
            r = rows[point.name]
            echo(
                f"[{finished}/{len(todo)}] {point.name}: {r['status']}, "
                f"server acc {_fmt(r['server_test_acc'])}, epsilon_max "
                f"{_fmt(r['epsilon_max'], 3)}, {_fmt(r['wall_s'], 1)} s"
            )
            _write_csv(out / "sweep.csv", keys, ordered())
    result = ordered()
    plot_accuracy_vs_epsilon(result, keys, out / "accuracy_vs_epsilon.png")
    selection = selection_of(spec, result)
    _write_table(out / "selection.csv", list(selection[0]) if selection else [], selection)
    return result
