"""`fedkd report`: the --plot folder is created; a bad path or a damaged row is one line."""

from typer.testing import CliRunner

from fedkd.run.cli import app
from tests.test_report import fake_run


def test_the_plot_goes_into_a_folder_that_did_not_exist(tmp_path):
    run = fake_run(tmp_path, "a-run", accs=(0.4, 0.6))
    plot = tmp_path / "out" / "dir" / "x.png"
    result = CliRunner().invoke(app, ["report", str(run), "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    assert plot.stat().st_size > 0


def test_a_plot_path_it_cannot_write_is_one_line_exit_2(tmp_path):
    run = fake_run(tmp_path, "a-run")
    (tmp_path / "a_file").write_text("not a folder")
    for plot, message in (
        (tmp_path, "is a folder"),
        (tmp_path / "a_file" / "x.png", "cannot create the folder"),
        (tmp_path / "x.unknown", "cannot write the plot"),
    ):
        result = CliRunner().invoke(app, ["report", str(run), "--plot", str(plot)])
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output


def test_a_metrics_row_without_its_round_is_one_line_exit_2(tmp_path):
    run = fake_run(tmp_path, "a-run")
    (run / "metrics.jsonl").write_text('{"round": 1}\n{"server_test_acc": 0.5}\n')
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 2, result.output
    assert "line 2 has no round number" in result.output
