"""`fedkd report`: a comparison table of runs and one plot with their curves."""

from typer.testing import CliRunner

from fedkd.run.cli import app
from tests.test_engine import run_inprocess


def test_report_compares_runs_in_one_table_and_plot(tmp_path):
    run_inprocess(tmp_path, [], name="dsfl")
    run_inprocess(tmp_path, ["algorithm.name=local_only"], name="local")
    plot = tmp_path / "cmp.png"
    result = CliRunner().invoke(
        app,
        ["report", str(tmp_path / "dsfl"), str(tmp_path / "local"), "--plot", str(plot)],
        terminal_width=250,
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    dsfl = next(line for line in lines if " dsfl " in line)
    local = next(line for line in lines if " local_only " in line)
    assert "8.0 kB" in dsfl  # 200 proxy x 10 classes x 4 bytes per client per round
    assert " 0 B " in local
    assert plot.stat().st_size > 0


def test_report_on_a_folder_without_a_run_fails_clearly(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert "no metrics.jsonl" in result.output
