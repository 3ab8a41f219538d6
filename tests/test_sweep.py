"""`fedkd sweep`: grid expansion, "none", validation, running, resuming, the table and plot."""

import csv
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from fedkd.apps.client_app import make_client_app
from fedkd.apps.server_app import run_rounds
from fedkd.results import RunRecorder
from fedkd.rounds.checkpoint import CHECKPOINTS
from fedkd.run.resume import resume_point
from fedkd.run.sweep import (
    SweepError,
    expand_grid,
    resumable,
    run_sweep,
    select_by_validation,
    subprocess_runner,
)
from fedkd.spec import SpecError, builtin_spec_path, load_spec
from tests.inprocess import InProcessGrid

TINY = """
extends = "{base}"
name = "tiny"
rounds = 1
[clients]
num_clients = 3
min_clients = 2
[data]
proxy_size = 200
[train]
epochs = 1
[distill]
epochs = 1
[server]
epochs = 1
[privacy]
dpsgd = true
noise_multiplier = 1.0
[sweep]
grid = {grid}
"""


# A fixed noise multiplier rather than a target epsilon: calibration takes seconds per client.
def write_spec(tmp_path, grid='{ "privacy.noise_multiplier" = [1.0, "none"], seed = [0, 1] }'):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY.format(base=builtin_spec_path().as_posix(), grid=grid))
    return path


class InProcessRunner:
    """Runs a point like `fedkd run` would, without Ray; remembers what it ran."""

    def __init__(self):
        self.ran = []
        self.resumed = []

    def __call__(self, spec_path, overrides, out_dir):
        self.ran.append(out_dir.name)
        spec = load_spec(spec_path, overrides)
        grid = InProcessGrid(make_client_app(spec), spec.num_nodes)
        if resumable(out_dir):  # as subprocess_runner does, with fedkd run --resume
            self.resumed.append(out_dir.name)
            point = resume_point(out_dir, str(spec_path), overrides)
            recorder = RunRecorder(out_dir, point.spec, point.rows)
            run_rounds(grid, point.spec, recorder, resume=point.checkpoint)
        else:
            run_rounds(grid, spec, RunRecorder(out_dir, spec))
        return 0


def test_grid_expands_to_the_cartesian_product_with_none_meaning_no_dp():
    spec = load_spec(
        None, ['sweep.grid={ "privacy.target_epsilon" = [0.5, 1, "none"], seed = [0, 1] }']
    )
    points = expand_grid(spec.sweep.grid, "q")
    assert [p.name for p in points] == [
        "target_epsilon=0.5,seed=0",
        "target_epsilon=0.5,seed=1",
        "target_epsilon=1,seed=0",
        "target_epsilon=1,seed=1",
        "target_epsilon=none,seed=0",
        "target_epsilon=none,seed=1",
    ]
    with_dp = load_spec(None, ["privacy.dpsgd=true", *points[2].overrides])
    assert with_dp.privacy.target_epsilon == 1.0 and with_dp.seed == 0
    assert with_dp.sweep.grid == {} and with_dp.name == "q-target_epsilon=1,seed=0"
    none = load_spec(None, ["privacy.dpsgd=true", "privacy.target_epsilon=3", *points[5].overrides])
    assert not none.privacy.dpsgd and none.privacy.target_epsilon == 0 and none.seed == 1
    # With a class-weighted teacher, "none" also sends exact label histograms: no mechanism.
    weighted = ["algorithm.teacher=class_weighted", "privacy.histogram_noise=50"]
    none = load_spec(
        None, ["privacy.dpsgd=true", "privacy.target_epsilon=3", *weighted, *points[5].overrides]
    )
    assert none.privacy.histogram_noise == 0 and not none.privacy.enabled("dsfl")


def test_grid_in_toml_dotted_form_and_clashing_short_names():
    spec = load_spec(None, ["sweep.grid={ train = { lr = [0.1] }, distill = { lr = [0.2, 0.3] } }"])
    assert spec.sweep.grid == {"train.lr": [0.1], "distill.lr": [0.2, 0.3]}
    names = [p.name for p in expand_grid(spec.sweep.grid)]
    assert names == ["train.lr=0.1,distill.lr=0.2", "train.lr=0.1,distill.lr=0.3"]


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ('{ "privacy.target_epsilonn" = [1] }', "unknown key 'privacy.target_epsilonn'; allowed"),
        ('{ "train.lr" = ["none"] }', '"none" is only allowed for privacy.target_epsilon'),
        ('{ "privacy.target_epsilon" = [0, 1] }', "0 is not 'no DP'; write \"none\""),
        ("{ seed = [] }", "expected a non-empty list"),
        ("{ seed = [0.5] }", "expected int, got 0.5"),
        ('{ "privacy" = [1] }', "'privacy' is a table"),
        (
            '{ "privacy.target_epsilon" = ["none"], "privacy.dpsgd" = [true] }',
            "sets privacy.dpsgd, which the grid also sweeps",
        ),
    ],
)
def test_bad_grids_fail_with_one_line(grid, message):
    with pytest.raises(SpecError, match=re.escape(message)):
        load_spec(None, [f"sweep.grid={grid}"])


def test_a_point_that_cannot_run_stops_the_sweep_before_anything_runs(tmp_path):
    spec = write_spec(tmp_path, '{ "clients.num_clients" = [3, 1] }')
    runner = InProcessRunner()
    with pytest.raises(SpecError, match="sweep point num_clients=1: clients.min_clients"):
        run_sweep(spec, tmp_path / "out", runner=runner)
    assert runner.ran == []


def metrics_without_timings(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [
        {k: v for k, v in row.items() if not k.endswith("_s") and "peak" not in k} for row in rows
    ]


def test_sweep_runs_every_point_writes_the_table_and_plot_and_resumes(tmp_path):
    spec = write_spec(tmp_path)
    out = tmp_path / "out"
    runner = InProcessRunner()
    rows = run_sweep(spec, out, runner=runner, echo=lambda _: None)
    assert len(runner.ran) == 4 and len(rows) == 4
    with open(out / "sweep.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [r["point"] for r in table] == [
        "noise_multiplier=1.0,seed=0",
        "noise_multiplier=1.0,seed=1",
        "noise_multiplier=none,seed=0",
        "noise_multiplier=none,seed=1",
    ]
    assert all(r["status"] == "completed" for r in table)
    for r in table:  # the grid values, the run's final numbers
        summary = json.loads((out / r["point"] / "summary.json").read_text())
        assert float(r["server_test_acc"]) == summary["final"]["server_test_acc"]
        if r["privacy.noise_multiplier"] == "none":
            assert r["epsilon_max"] == "" and not (out / r["point"] / "ledgers.json").exists()
        else:
            assert float(r["epsilon_max"]) == summary["final"]["epsilon_max"] > 0
    assert (out / "accuracy_vs_epsilon.png").stat().st_size > 0

    # Resume: finished points are not rerun; one killed after a checkpoint resumes from it
    # (same metrics), one that died before its first checkpoint is moved aside and rerun.
    interrupted = out / "noise_multiplier=1.0,seed=1"
    metrics = metrics_without_timings(interrupted)
    (interrupted / "summary.json").unlink()
    died = out / "noise_multiplier=none,seed=1"
    (died / "summary.json").unlink()
    shutil.rmtree(died / CHECKPOINTS)
    again = InProcessRunner()
    rows = run_sweep(spec, out, runner=again, echo=lambda _: None)
    assert again.ran == ["noise_multiplier=1.0,seed=1", "noise_multiplier=none,seed=1"]
    assert again.resumed == ["noise_multiplier=1.0,seed=1"]
    assert metrics_without_timings(interrupted) == metrics
    assert [r["status"] for r in rows] == ["completed"] * 4
    assert len(list((out / "_incomplete").iterdir())) == 1

    # A grown grid reuses the finished points: only the new seed runs.
    grown = write_spec(tmp_path, '{ "privacy.noise_multiplier" = [1.0, "none"], seed = [0, 1, 2] }')
    more = InProcessRunner()
    rows = run_sweep(grown, out, runner=more, echo=lambda _: None)
    assert sorted(more.ran) == ["noise_multiplier=1.0,seed=2", "noise_multiplier=none,seed=2"]
    assert len(rows) == 6

    # A finished point made with another spec is never mixed into the table.
    with pytest.raises(SweepError, match="different spec \\(rounds differ\\)"):
        run_sweep(spec, out, overrides=["rounds=2"], runner=again)


def test_a_plain_run_of_a_point_counts_as_that_point_but_not_as_another(tmp_path):
    spec = write_spec(tmp_path, '{ "privacy.noise_multiplier" = [1.0], seed = [0, 1] }')
    out = tmp_path / "out"
    # `fedkd run tiny.toml --set seed=1 --out out/noise_multiplier=1.0,seed=1`: its spec.toml
    # keeps the file's name and [sweep] grid, which a sweep point drops.
    InProcessRunner()(spec, ["seed=1"], out / "noise_multiplier=1.0,seed=1")
    runner = InProcessRunner()
    rows = run_sweep(spec, out, runner=runner, echo=lambda _: None)
    assert runner.ran == ["noise_multiplier=1.0,seed=0"]
    assert [r["status"] for r in rows] == ["completed"] * 2

    # The same run filed under the other seed's folder is refused, not counted.
    wrong = tmp_path / "wrong"
    InProcessRunner()(spec, ["seed=1"], wrong / "noise_multiplier=1.0,seed=0")
    with pytest.raises(SweepError, match="different spec \\(seed differ\\)"):
        run_sweep(spec, wrong, runner=InProcessRunner(), echo=lambda _: None)


def test_parallel_points_and_failures_land_in_grid_order(tmp_path):
    spec = write_spec(tmp_path, "{ seed = [0, 1, 2, 3] }")

    def fake(spec_path, overrides, out_dir):
        out_dir.mkdir(parents=True)
        seed = int(next(o for o in overrides if o.startswith("seed="))[5:])
        if seed == 2:
            return 1  # a crashed run leaves no summary
        final = {"server_test_acc": 0.5 + seed / 10, "epsilon_max": 1.0}
        (out_dir / "summary.json").write_text(
            json.dumps(
                {"status": "completed", "final": final, "wall_s": 1.0, "total_clients_failed": seed}
            )
        )
        return 0

    rows = run_sweep(spec, tmp_path / "out", runner=fake, parallel=3, echo=lambda _: None)
    # A point that lost client-rounds says so in its row.
    assert [r["clients_failed"] for r in rows] == [0, 1, None, 3]
    assert [r["seed"] for r in rows] == [0, 1, 2, 3]
    assert [r["status"] for r in rows] == ["completed", "completed", "failed", "completed"]
    assert rows[3]["server_test_acc"] == pytest.approx(0.8)


def test_the_subprocess_runner_passes_spec_and_overrides_to_fedkd_run(tmp_path):
    # An invalid override makes `fedkd run` stop before starting Ray: quick, and it shows the
    # command line reached it intact.
    spec = write_spec(tmp_path)
    code = subprocess_runner(spec, ["rounds=0"], tmp_path / "point")
    log = (tmp_path / "point" / "run.log").read_text()
    assert code == 2
    assert log.startswith(f"{sys.executable} -m fedkd.run.cli run {spec} --set rounds=0 --out")
    assert "rounds: must be > 0, got 0" in log


def _point(status="completed", **values):
    return {"status": status, "selected_by": "client_val_acc_mean", "epsilon_max": 1.0, **values}


def test_selection_picks_by_validation_within_each_budget_never_by_test():
    keys = ["privacy.target_epsilon", "train.lr", "seed"]

    def point(eps, lr, seed, val, test):
        return _point(
            **{"privacy.target_epsilon": eps, "train.lr": lr, "seed": seed},
            val_acc=val,
            test_acc_at_best_val_round=test,
        )

    rows = [
        # Budget 1: lr 0.1 is better on validation (mean over seeds 0.7), lr 0.5 on test.
        point(1.0, 0.1, 0, 0.8, 0.60),
        point(1.0, 0.1, 1, 0.6, 0.62),
        point(1.0, 0.5, 0, 0.5, 0.90),
        point(1.0, 0.5, 1, 0.7, 0.92),
        # Budget 2: the two settings tie on validation: the first in grid order is picked.
        point(2.0, 0.1, 0, 0.9, 0.70),
        point(2.0, 0.5, 0, 0.9, 0.80),
    ]
    first, second = select_by_validation(rows, keys, ["privacy.target_epsilon"])
    assert first["privacy.target_epsilon"] == 1.0
    assert first["pick"] == "lr=0.1" and first["seeds"] == 2 and first["candidates"] == 2
    assert first["val_acc"] == pytest.approx(0.7) and first["test_acc"] == pytest.approx(0.61)
    assert first["test_acc_sd"] == pytest.approx(np.std([0.60, 0.62], ddof=1))
    # What test accuracy would have picked is a diagnostic beside the pick, never the pick.
    assert first["test_selected_pick"] == "lr=0.5"
    assert first["test_selected_test_acc"] == pytest.approx(0.91)
    assert second["pick"] == "lr=0.1" and second["test_acc"] == pytest.approx(0.70)
    assert second["seeds"] == 1 and second["test_acc_sd"] is None  # no spread from one seed

    # Unfinished points and points without a validation score take no part; scores of
    # different validation metrics are not compared.
    rows[2] = {**rows[2], "status": "failed"}
    rows[3] = {**rows[3], "val_acc": None}
    rows[5] = {**rows[5], "selected_by": "server_val_acc"}
    first, second = select_by_validation(rows, keys, ["privacy.target_epsilon"])
    assert first["candidates"] == 1 and first["test_selected_pick"] == "lr=0.1"
    assert second["pick"] is None and second["selected_by"] == "client_val_acc_mean+server_val_acc"


def test_sweep_over_a_tiny_grid_selects_within_each_budget(tmp_path):
    spec = write_spec(
        tmp_path, '{ "privacy.noise_multiplier" = [1.0, "none"], "distill.lr" = [0.001, 0.1] }'
    )
    out = tmp_path / "out"
    # Named explicitly (the default would be the same key); the points' specs drop it.
    within = ['sweep.select_within=["privacy.noise_multiplier"]']
    rows = run_sweep(spec, out, overrides=within, runner=InProcessRunner(), echo=lambda _: None)
    for r in rows:  # every point reports its validation-selected round
        summary = json.loads((Path(r["run_dir"]) / "summary.json").read_text())
        assert r["selected_by"] == summary["selected_by"] == "client_val_acc_mean"
        assert r["val_acc"] == summary["best_val_acc"] is not None
        assert r["test_acc_at_best_val_round"] == summary["test_acc_at_best_val_round"]
    with open(out / "selection.csv") as fh:
        selection = list(csv.DictReader(fh))
    assert [s["privacy.noise_multiplier"] for s in selection] == ["1.0", "none"]
    for s, budget in zip(selection, (rows[:2], rows[2:]), strict=True):
        pick = max(budget, key=lambda r: r["val_acc"])
        assert s["pick"] == f"lr={pick['distill.lr']}"
        assert float(s["test_acc"]) == pytest.approx(pick["test_acc_at_best_val_round"])
