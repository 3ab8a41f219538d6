"""An audit of an algorithm whose clients hold no student is refused in one line, not a
traceback (PATE's clients hold teachers)."""

from __future__ import annotations

import pytest
from flwr.app import Message
from typer.testing import CliRunner

from fedkd.apps import wire
from fedkd.apps.client_app import make_client_app
from fedkd.apps.server_app import run_rounds
from fedkd.results import RunRecorder
from fedkd.run.cli import app
from fedkd.spec import load_spec
from tests.inprocess import InProcessGrid
from tests.test_engine import SMALL

PATE = [*SMALL, "algorithm.name=pate", "algorithm.teachers_per_client=2"]


def test_a_pate_node_refuses_to_export_a_student_it_does_not_have(tmp_path):
    """The export used to read PATE's teachers as a student's state and fail deep inside."""
    spec = load_spec(None, PATE)
    grid = InProcessGrid(make_client_app(spec), spec.num_nodes)
    run_rounds(grid, spec, RunRecorder(tmp_path / "pate", spec))
    node = next(iter(grid.contexts))
    request = wire.request({"round": spec.rounds, "export_ids": [0]})
    export = Message(request, dst_node_id=node, message_type=wire.MSG_EXPORT)
    with pytest.raises(ValueError, match="algorithm 'pate' has no client student to export"):
        grid.send_and_receive([export])


def test_fedkd_audit_of_a_pate_run_is_one_line_exit_2(tmp_path):
    run = tmp_path / "pate"
    run.mkdir()
    (run / "spec.toml").write_text(load_spec(None, PATE).to_toml())
    out = CliRunner().invoke(app, ["audit", str(run)])
    assert out.exit_code == 2, out.output
    assert "algorithm 'pate' has no client student to audit" in out.output
    assert "Traceback" not in out.output
