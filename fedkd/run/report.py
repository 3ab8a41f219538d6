"""`fedkd report`: runs grouped by setting, with their spread over seeds and their provenance.

Runs whose ``spec.toml`` agree on every key but ``seed``, ``name``, ``output`` and ``sweep``
are one group: the same experiment with different seeds. Each headline metric of a group is
reported as its number of runs, mean, sample standard deviation (n - 1) and 95% confidence
interval of the mean from Student's t distribution (`fedkd.stats`). A group of one run has no
spread: its sd and interval are None (printed n/a).
"""

from __future__ import annotations

import csv
import io
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedkd.provenance import commit_label, machine_label
from fedkd.results import read_run

# The sweep's flattening of specs, and its keys that label or file a run (not compared).
from fedkd.run.sweep import _NOT_COMPARED, _flat, default_flat_spec
from fedkd.stats import CONFIDENCE, Stats, describe

# Keys a seed-only difference may change (besides what the sweep already ignores).
NOT_GROUPED = frozenset({"seed"})


@dataclass
class Run:
    """One run folder as the report reads it."""

    dir: Path
    summary: dict[str, Any]
    rounds: list[dict[str, Any]]
    spec: dict[str, Any]  # flat: dotted key -> value

    @property
    def provenance(self) -> dict[str, Any]:
        return self.summary.get("provenance") or {}

    @property
    def seeded_noise(self) -> bool:
        """Its privacy noise came from the spec's seed (runs made before the choice existed drew
        seeded noise): anyone who knows the seed can remove it (docs/noise.md)."""
        return self.summary.get("noise_rng", "seeded") == "seeded"


def _final(key: str) -> Callable[[Run], float | None]:
    return lambda run: (run.rounds[-1] if run.rounds else {}).get(key)


def _up_per_client_round(run: Run) -> float | None:
    """Bytes one client sends in a round, averaged over the rounds where clients took part."""
    per_client = [r["bytes_up_per_client"] for r in run.rounds if r.get("clients_ok")]
    return sum(per_client) / len(per_client) if per_client else None


@dataclass(frozen=True)
class Metric:
    """A headline metric: its name in tables and CSV, how to read it from a run, its format."""

    name: str
    value: Callable[[Run], float | None]
    kind: str = "acc"  # acc | bytes | eps | s


# The report's rows per group, in order: a new headline metric is one line here.
METRICS = (
    Metric("server_test_acc", _final("server_test_acc")),
    # The result: test accuracy at the round selected on validation data (summary.json).
    Metric("test_acc_at_best_val_round", lambda run: run.summary.get("test_acc_at_best_val_round")),
    Metric("client_test_acc_mean", _final("client_test_acc_mean")),
    Metric("client_local_acc_mean", _final("client_local_acc_mean")),
    Metric("epsilon_max", _final("epsilon_max"), "eps"),
    Metric("bytes_up_per_client_round", _up_per_client_round, "bytes"),
    Metric("wall_s", lambda run: run.summary.get("wall_s"), "s"),
    # Uploads the [faults] defence rejected or down-weighted over the run (docs/faults.md).
    Metric("defence_rejected", lambda run: run.summary.get("total_defence_rejected"), "n"),
    Metric("defence_downweighted", lambda run: run.summary.get("total_defence_downweighted"), "n"),
)


@dataclass
class Group:
    """Runs of one setting (seeds aside), with a label and the statistics of each metric."""

    label: str
    runs: list[Run]
    stats: dict[str, Stats] = field(default_factory=dict)

    @property
    def algorithm(self) -> str:
        return str(self.runs[0].summary.get("algorithm") or self.runs[0].spec.get("algorithm.name"))

    @property
    def seeds(self) -> list[Any]:
        return [r.spec.get("seed") for r in self.runs]

    @property
    def commits(self) -> list[str]:
        return sorted({commit_label(r.provenance) for r in self.runs})

    @property
    def simulation_only(self) -> bool:
        """An epsilon of this group holds for the simulation only: some run drew seeded noise."""
        return any(r.seeded_noise for r in self.runs)

    @property
    def versions(self) -> list[str]:
        return sorted({str(r.summary.get("fedkd_version", "unknown")) for r in self.runs})


def load_run(run_dir: Path) -> Run:
    """A run folder's summary, rounds and flattened spec (raises FileNotFoundError)."""
    summary, rounds = read_run(run_dir)
    spec_path = Path(run_dir) / "spec.toml"
    spec = _flat(tomllib.loads(spec_path.read_text())) if spec_path.is_file() else {}
    return Run(Path(run_dir), summary, rounds, spec)


def _setting(run: Run) -> tuple:
    """What must agree for two runs to be seeds of one experiment."""
    if not run.spec:  # no spec.toml: a group of its own
        return (("run_dir", str(run.dir.resolve())),)
    # A key at its default is left out, so that runs recorded before and after it existed group.
    defaults = default_flat_spec(run.spec.get("algorithm.name"))
    return tuple(
        sorted(
            (k, repr(v))
            for k, v in run.spec.items()
            if k not in NOT_GROUPED
            and k.split(".")[0] not in _NOT_COMPARED
            and not (k in defaults and defaults[k] == v)
        )
    )


def _base_label(run: Run) -> str:
    """The run's spec name without a sweep point's ``seed=N`` part."""
    name = str(run.summary.get("spec_name") or run.dir.name)
    name = re.sub(r"-seed=[^,]*,", "-", name)  # x-seed=0,lr=1 -> x-lr=1
    return re.sub(r"[-,]seed=[^,]*", "", name)  # x-lr=1,seed=0 -> x-lr=1; x-seed=0 -> x


def _applies(run: Run, key: str) -> bool:
    """Whether `key` says something about `run`: a ``proxy.*`` key only where the run's proxy
    uses it (its ``summary.json`` ``proxy`` record lists the keys that apply to its source),
    so that an in-domain proxy's group is not labelled with the noise a synthetic one draws."""
    proxy = run.summary.get("proxy")
    if key.startswith("proxy.") and isinstance(proxy, dict):
        return key.split(".", 1)[1] in proxy
    return True


def group_runs(runs: list[Run]) -> list[Group]:
    """Runs grouped by setting, in order of first appearance, with each metric's `Stats`.

    Labels are the runs' spec names (a sweep's ``seed=N`` dropped); groups that would share a
    label get the spec keys where they differ appended (of those, the ones that apply to the
    group's runs, see `_applies`, and that its spec or its algorithm's defaults hold, where any
    do).
    """
    by_setting: dict[tuple, list[Run]] = {}
    for run in runs:
        by_setting.setdefault(_setting(run), []).append(run)
    groups = [Group(_base_label(members[0]), members) for members in by_setting.values()]
    settings = [dict(s) for s in by_setting]
    labels = [g.label for g in groups]
    for i, group in enumerate(groups):
        twins = [j for j, label in enumerate(labels) if label == labels[i] and j != i]
        if twins:
            # A key missing from one setting is at its default there (see _setting).
            differ = {
                k
                for j in twins
                for k in set(settings[i]) | set(settings[j])
                if settings[i].get(k) != settings[j].get(k)
            }
            first = group.runs[0]
            defaults = default_flat_spec(first.spec.get("algorithm.name"))
            # A key neither in the run's spec nor among its algorithm's defaults (another
            # algorithm's option, e.g. FD's fd_normalise on a FedDF run) says nothing about it.
            keys = sorted(
                k for k in differ if _applies(first, k) and (k in first.spec or k in defaults)
            )
            keys = keys or sorted(differ) or ["run_dir"]
            values = {
                k: first.spec.get(k, defaults.get(k, first.dir if k == "run_dir" else "-"))
                for k in keys
            }
            # An empty value (e.g. algorithm.teacher = "") means "the algorithm's own default".
            shown = ", ".join(f"{k}={'(default)' if v == '' else v}" for k, v in values.items())
            group.label = f"{labels[i]} ({shown})"
    for group in groups:
        for metric in METRICS:
            values = [metric.value(r) for r in group.runs]
            group.stats[metric.name] = describe([float(v) for v in values if v is not None])
    return groups


# -- formatting ---------------------------------------------------------------------------------
def fmt(value: float | None, kind: str = "acc") -> str:
    """A value as tables show it: accuracy to 4 places, bytes with a unit, epsilon to 3."""
    if value is None:
        return "-"
    if kind == "acc":
        return f"{value:.4f}"
    if kind == "bytes":
        for unit in ("B", "kB", "MB", "GB"):
            if abs(value) < 1000 or unit == "GB":
                return f"{value:.1f} {unit}" if unit != "B" else f"{value:.0f} B"
            value /= 1000
    if kind == "eps":
        return f"{value:.3f}"
    return f"{value:.1f}"


def _spread(stats: Stats, kind: str) -> tuple[str, str]:
    """sd and CI cells: n/a for one run, - for none."""
    if stats.n == 0:
        return "-", "-"
    if stats.sd is None:
        return "n/a", "n/a"
    return fmt(stats.sd, kind), f"[{fmt(stats.ci_low, kind)}, {fmt(stats.ci_high, kind)}]"


# Marks the epsilon of a group with seeded noise, and the note that explains the mark.
SIMULATION_ONLY = "sim-only"
SIMULATION_ONLY_NOTE = (
    f"{SIMULATION_ONLY}: seeded noise (privacy.noise_rng); anyone who knows the spec's seed can "
    "remove it, so that epsilon holds for the simulation only (docs/noise.md)"
)


def _mean_cell(group: Group, metric: Metric, stats: Stats) -> str:
    text = fmt(stats.mean, metric.kind)
    if metric.kind == "eps" and stats.n and group.simulation_only:
        return f"{text} {SIMULATION_ONLY}"
    return text


def _marks_simulation_only(groups: list[Group]) -> bool:
    eps = [m.name for m in METRICS if m.kind == "eps"]
    return any(g.simulation_only and any(g.stats[m].n for m in eps) for g in groups)


COLUMNS = ("group", "algorithm", "metric", "n", "mean", "sd", "95% CI", "commit", "fedkd")


def table_rows(groups: list[Group]) -> list[list[str]]:
    """One row per group and metric, as text; commit and version on a group's first row."""
    rows = []
    for group in groups:
        for i, metric in enumerate(METRICS):
            stats = group.stats[metric.name]
            sd, ci = _spread(stats, metric.kind)
            first = i == 0
            rows.append(
                [
                    group.label if first else "",
                    group.algorithm if first else "",
                    metric.name,
                    str(stats.n),
                    _mean_cell(group, metric, stats),
                    sd,
                    ci,
                    " ".join(group.commits) if first else "",
                    " ".join(group.versions) if first else "",
                ]
            )
    return rows


def rich_table(groups: list[Group]) -> Any:
    """The grouped report as a Rich table (one section per group)."""
    from rich.table import Table

    table = Table(title=f"fedkd runs: mean, sample sd and {CONFIDENCE:.0%} t interval over seeds")
    for col in COLUMNS:
        table.add_column(col, justify="right" if col in ("n", "mean", "sd") else "left")
    rows = table_rows(groups)
    for i, row in enumerate(rows):
        table.add_row(*row, end_section=(i + 1) % len(METRICS) == 0)
    if _marks_simulation_only(groups):
        table.caption = SIMULATION_ONLY_NOTE
    return table


def markdown(groups: list[Group], command: str) -> str:
    """The report as Markdown: a header naming the command, commits and machines, the table,
    then each group's runs (folder, seed, commit)."""
    runs = [r for g in groups for r in g.runs]
    commits = sorted({commit_label(r.provenance) for r in runs})
    machines = sorted({machine_label(r.provenance) for r in runs if r.provenance})
    lines = [
        "# fedkd report",
        "",
        f"- command: `{command}`",
        f"- commit(s): {', '.join(commits)}",
        f"- machine(s): {'; '.join(machines) or 'unknown'}",
        f"- statistics: mean, sample standard deviation and {CONFIDENCE:.0%} confidence "
        "interval of the mean (Student's t) over the runs of a group (n/a for one run)",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "| " + " | ".join("---:" if c in ("n", "mean", "sd") else "---" for c in COLUMNS) + " |",
    ]
    lines += [
        "| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |"
        for row in table_rows(groups)
    ]
    if _marks_simulation_only(groups):
        lines += ["", SIMULATION_ONLY_NOTE]
    lines += ["", "## Runs", ""]
    for group in groups:
        for run in group.runs:
            lines.append(
                f"- {group.label}: `{run.dir}` (seed {run.spec.get('seed', '?')}, commit "
                f"{commit_label(run.provenance)})"
            )
    return "\n".join(lines) + "\n"


CSV_COLUMNS = (
    "group",
    "algorithm",
    "metric",
    "n",
    "mean",
    "sd",
    "ci_low",
    "ci_high",
    "seeds",
    "commits",
    "fedkd_versions",
    "run_dirs",
)


def csv_text(groups: list[Group]) -> str:
    """One CSV row per group and metric, full precision; empty cells where a value is None."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for group in groups:
        for metric in METRICS:
            s = group.stats[metric.name]
            writer.writerow(
                [
                    group.label,
                    group.algorithm,
                    metric.name,
                    s.n,
                    *("" if v is None else repr(v) for v in (s.mean, s.sd, s.ci_low, s.ci_high)),
                    " ".join(str(seed) for seed in group.seeds),
                    " ".join(group.commits),
                    " ".join(group.versions),
                    " ".join(str(r.dir) for r in group.runs),
                ]
            )
    return buf.getvalue()
