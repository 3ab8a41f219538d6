"""A sweep whose points include an unprotected release (epsilon = inf): the plot draws the
finite points and names the others, the table shows inf (not "-", which means no DP)."""

from __future__ import annotations

import math
import warnings

from rich.console import Console

from fedkd.run.sweep import accuracy_vs_epsilon_points, plot_accuracy_vs_epsilon, sweep_table

KEYS = ["privacy.histogram_noise", "seed"]


def _rows(epsilons: dict[str, float | None]) -> list[dict]:
    return [
        {
            "point": f"histogram_noise={tag},seed={seed}",
            "privacy.histogram_noise": tag,
            "seed": seed,
            "status": "completed",
            "server_test_acc": 0.8 + 0.01 * seed,
            "epsilon_max": eps,
        }
        for tag, eps in epsilons.items()
        for seed in (0, 1)
    ]


def test_infinite_epsilons_are_named_not_plotted(tmp_path):
    rows = _rows({"5": math.inf, "20": 2.5, "none": None})
    points = accuracy_vs_epsilon_points(rows, KEYS)
    assert points.series == {(): [(2.5, 0.0, 0.805, points.series[()][0][3], "20")]}
    assert points.flat[()][2] == 2 and points.unprotected == ["privacy.histogram_noise=5"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the sd of [inf, inf] used to warn (and draw nothing)
        assert plot_accuracy_vs_epsilon(rows, KEYS, tmp_path / "a.png").stat().st_size > 0
        only_inf = _rows({"5": math.inf, "50": math.inf})
        assert plot_accuracy_vs_epsilon(only_inf, KEYS, tmp_path / "b.png").stat().st_size > 0
    assert accuracy_vs_epsilon_points(only_inf, KEYS).series == {}


def test_the_sweep_table_marks_an_infinite_epsilon():
    console = Console(width=200, record=True)
    console.print(sweep_table(_rows({"5": math.inf, "none": None})))
    lines = console.export_text().splitlines()
    assert any("histogram_noise=5,seed=0" in ln and ln.rstrip().endswith("inf │") for ln in lines)
    assert any("histogram_noise=none,seed=0" in ln and ln.rstrip().endswith("- │") for ln in lines)
