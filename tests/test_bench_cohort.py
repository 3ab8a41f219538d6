"""The cohort benchmark's ``--workload mnist`` mode: its specs, ceilings, tracer and table.

The runs themselves need Ray (the lead runs the benchmark); these check what is pure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SIMULATIONS = Path(__file__).resolve().parents[1] / "simulations"
sys.path.insert(0, str(SIMULATIONS))

import bench_cohort  # noqa: E402
from bench_startup import TRACER  # noqa: E402

from fedkd.spec import load_spec  # noqa: E402


def _cfg(algorithm: str, arch: str, option: str, mnist: Path) -> dict:
    layout, learner = bench_cohort.LAYOUTS[bench_cohort.LAYOUT_OPTIONS[option]]
    return {
        "workload": "mnist",
        "algorithm": algorithm,
        "arch": arch,
        "mnist": str(mnist),
        "clients": 20,
        "layout": layout,
        "learner": learner,
        "cohort_nodes": 2,
        "warmup": 2,
        "rounds": 3,
        "tail": 1,
    }


@pytest.mark.parametrize("algorithm", bench_cohort.WORKLOAD_ALGORITHMS)
@pytest.mark.parametrize("option", list(bench_cohort.LAYOUT_OPTIONS))
# The workload spec itself names ../shared/data/mnist.npz: skips without it.
@pytest.mark.usefixtures("mnist_path")
def test_mnist_overrides_load_as_the_setting_with_one_model(
    algorithm: str, option: str, tmp_path: Path
) -> None:
    mnist = _tiny_mnist(tmp_path / "mnist.npz")
    cfg = _cfg(algorithm, "cnn_large", option, mnist)
    spec = load_spec(bench_cohort.WORKLOAD_SPEC, bench_cohort.spec_overrides(cfg))
    base = load_spec(bench_cohort.WORKLOAD_SPEC)
    assert spec.algorithm.name == algorithm
    assert spec.clients.students == ["cnn_large"]
    assert spec.rounds == 6
    assert spec.eval.every > spec.rounds  # only the last round evaluates
    assert (spec.train.epochs, spec.train.batch_size) == (1, 32)
    assert spec.num_nodes == (20 if option == "single" else 2)
    assert spec.resources.learner == cfg["learner"]
    assert spec.data.path == str(mnist)
    # the setting itself is kept: partition, clients, proxy and the server student
    assert (spec.data.partition, spec.data.alpha) == (base.data.partition, base.data.alpha)
    assert spec.clients.num_clients == base.clients.num_clients == 20
    assert spec.server.student == base.server.student
    assert spec.distill == base.distill
    assert spec.output.plots is False


@pytest.mark.usefixtures("mnist_path")
def test_a_measured_run_starts_the_engine_before_importing_flower(tmp_path: Path) -> None:
    # `simulate` starts Ray before it imports Flower (as `fedkd run` does): a run that imports
    # Flower first would time a slower start than users get.
    cfg = _cfg("fedavg", "cnn_small", "single", _tiny_mnist(tmp_path / "mnist.npz"))
    code = (
        f"import json, sys; sys.path.insert(0, {str(SIMULATIONS)!r}); import bench_cohort; "
        "import fedkd.run.cli as cli; "
        "cli.simulate = lambda *a, **k: sys.exit(print('flwr' in sys.modules) or 0); "
        f"bench_cohort.run_one(json.loads({json.dumps(cfg | {'out_dir': str(tmp_path)})!r}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False"]


def _row(algorithm: str, option: str, round_s: float, before: float | None) -> dict:
    return {
        "algorithm": algorithm,
        "model": "cnn_small",
        "layout": bench_cohort.LAYOUT_OPTIONS[option],
        "layout_option": option,
        "nodes": 20 if option == "single" else 2,
        "rounds": 3,
        "round_s": round_s,
        "train_samples_s": 48_000 / round_s,
        "learner_s": round_s / 2,
        "peak_mb": "700 RSS",
        "before_round1_s": before,
    }


def test_workload_table_fractions_and_speedups() -> None:
    rows = [
        _row("fedavg", "single", 4.0, 10.0),
        _row("fedavg", "cohort-loop", 5.0, None),
        _row("fedavg", "cohort-vectorised", 2.0, 9.5),
        _row("dsfl", "cohort-vectorised", 8.0, 12.25),  # no loop layouts measured for DS-FL
    ]
    ceilings = {"cnn_small": {"batch 32": 16_000.0, "large batch": 48_000.0}}
    table = bench_cohort.format_workload_table(rows, ceilings, ["HEADER"])
    lines = table.splitlines()
    assert lines[:2] == ["HEADER", ""]
    body = {line.split(" | ")[0][2:] + line.split(" | ")[2]: line for line in lines[4:]}
    cells = [c.strip() for c in body["fedavgcohort nodes, vectorised"].split("|")[1:-1]]
    # train samples/s 24,000: 150% of batch 32, 50% of large batch; 2x vs 1/node, 2.5x vs loop
    assert cells[6:] == ["24,000", "150%", "50%", "1.000", "2.00x", "2.50x", "700 RSS", "9.5"]
    cells = [c.strip() for c in body["fedavgcohort nodes, loop"].split("|")[1:-1]]
    assert cells[10:12] == ["0.80x", "1.00x"] and cells[-1] == "-"
    cells = [c.strip() for c in body["dsflcohort nodes, vectorised"].split("|")[1:-1]]
    assert cells[10:12] == ["-", "-"] and cells[-1] == "12.2"
    ceiling_rows = [line for line in lines if "ceiling:" in line]
    assert len(ceiling_rows) == 2
    assert "| 16,000 |" in ceiling_rows[0] and "| 48,000 |" in ceiling_rows[1]
    assert all(line.count("|") == lines[2].count("|") for line in lines[2:])


def test_workload_table_shares_against_each_rows_ceiling_bracket() -> None:
    bracketed = _row("fedavg", "single", 4.0, 8.0) | {"ceiling_bracket": [10_000.0, 15_000.0]}
    rows = [bracketed, _row("fedavg", "cohort-loop", 4.0, None)]  # no bracket of its own
    ceilings = {"cnn_small": {"batch 32": [10_000.0, 15_000.0, 20_000.0], "large batch": 1.0}}
    lines = bench_cohort.format_workload_table(rows, ceilings, ["HEADER"]).splitlines()
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in lines[4:]]
    # 12,000 samples/s: 96% of the bracket's mean 12,500, 80% of its higher, 120% of its lower
    assert cells[0][6:8] == ["12,000", "96% (80%-120%)"]
    # without a bracket: against the mean of all the model's measurements, 15,000
    assert cells[1][7] == "80% (60%-120%)"
    assert cells[2][2].startswith("ceiling: batch 32")
    assert cells[2][6] == "15,000 (10,000-20,000, 3 runs)"
    assert cells[3][6] == "1"  # one measurement: no range


def test_phase_table_averages_the_measured_rounds_and_leaves_out_empty_phases() -> None:
    from fedkd.apps.wire import NODE_PHASES, PHASE_CLOCKS

    def round_row(rnd: int, train: float) -> dict:
        phases = {p: 0.0 for p in NODE_PHASES} | {"train": train, "checkpoint": 0.25}
        return {"round": rnd, "learner_s": train + 0.5} | {c: phases for c in PHASE_CLOCKS}

    measured = [round_row(3, 2.0), round_row(4, 4.0)]
    mean = bench_cohort.mean_phases(measured)
    assert mean["learner_phases_cpu_s"]["train"] == 3.0
    assert bench_cohort.mean_phases([{"round": 3, "learner_s": 1.0}]) == {}  # none sent
    rows = [
        _row("fedavg", "cohort-loop", 5.0, None) | {"phases": mean, "learner_nodes_s": 3.5},
        _row("fedavg", "single", 4.0, None) | {"phases": {}, "learner_nodes_s": 3.0},
    ]
    table = bench_cohort.format_phase_table(rows, ["algorithm", "model", "layout"])
    lines = table.splitlines()
    header = [c.strip() for c in lines[2].split("|")[1:-1]]
    assert header[3:] == ["clock", "train", "checkpoint", "phases sum", "learner s"]
    body = [[c.strip() for c in line.split("|")[1:-1]] for line in lines[4:]]
    assert [b[3] for b in body] == ["wall", "CPU (thread)", "CPU (process)"]  # one row per clock
    assert body[0][:3] == ["fedavg", "cnn_small", "cohort nodes, loop"]
    assert body[0][4:] == ["3.000", "0.250", "3.250", "3.500"]
    assert bench_cohort.format_phase_table(rows[1:], ["layout"]) == ""


def _tiny_mnist(path: Path, rows: int = 40) -> Path:
    rng = np.random.default_rng(0)
    np.savez(
        path,
        x_train=rng.integers(0, 256, (rows, 28, 28), dtype=np.uint8),
        y_train=rng.integers(0, 10, rows),
        x_test=rng.integers(0, 256, (rows, 28, 28), dtype=np.uint8),
        y_test=rng.integers(0, 10, rows),
    )
    return path


def test_training_batches_scale_pixels_and_repeat_short_data(tmp_path: Path) -> None:
    npz = _tiny_mnist(tmp_path / "m.npz", rows=40)
    batches = bench_cohort._training_batches(str(npz), batch=32, steps=3)
    assert [tuple(x.shape) for x, _ in batches] == [(32, 1, 28, 28)] * 3
    x = np.concatenate([b[0].numpy() for b in batches])
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.9  # uint8 pixels / 255
    y = np.concatenate([b[1].numpy() for b in batches])
    assert np.array_equal(y[:40], y[40:80])  # 96 rows from 40: the shuffle repeated


def test_batch32_ceiling_runs_one_process_per_core_together(tmp_path: Path) -> None:
    npz = _tiny_mnist(tmp_path / "m.npz")
    rate = bench_cohort.ceiling_processes(str(npz), "cnn_small", batch=32, steps=2, processes=2)
    assert rate > 0
    assert bench_cohort.ceiling(str(npz), batch=64, steps=1, arch="cnn_small") > 0


def test_tracer_marks_the_vectorised_learners_first_step(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(TRACER)
    trace = tmp_path / "trace.txt"
    env = dict(os.environ, FEDKD_STARTUP_TRACE=str(trace))
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    code = (
        "import torch; from torch.func import grad_and_value, vmap; "
        "step = vmap(grad_and_value(lambda w: (w * w).sum())); step(torch.ones(3, 2))"
    )
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    names = [line.split()[1:3] for line in trace.read_text().splitlines()]
    assert ["worker", "first_backward"] in names


def test_first_training_step_is_timed_from_the_drivers_start(tmp_path: Path) -> None:
    trace = tmp_path / "trace.txt"
    trace.write_text(
        "1 driver start 100.0\n1 driver first_backward 101.0\n"
        "2 worker first_backward 109.5\n3 worker first_backward 108.25\n"
    )
    assert bench_cohort.first_training_step_s(trace) == pytest.approx(8.25)
    trace.write_text("1 driver start 100.0\n2 worker hello_handled 104.0\n")
    assert bench_cohort.first_training_step_s(trace) is None
    assert bench_cohort.first_training_step_s(tmp_path / "missing.txt") is None


def test_mnist_workload_without_mnist_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stop:
        bench_cohort.main(["--workload", "mnist", "--mnist", str(tmp_path / "none.npz")])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--mnist PATH" in err
