"""Every value that leaves a client is in docs/what-leaves-a-client.md, with its status.

Each algorithm runs for two rounds on the in-process grid (the real ServerApp, wire format
and ClientApp; DP-SGD on where the algorithm supports it), every reply the ClientApp sends is
captured, and each array and metric in it must have a row of the document's table: the table is
parsed from the Markdown, so that the document and the code cannot drift apart.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from flwr.app import Message

from fedkd.apps import wire
from fedkd.apps.client_app import make_client_app
from fedkd.apps.server_app import run_rounds
from fedkd.assembly import federated_data
from fedkd.learner.loop import init_student
from fedkd.results import RunRecorder
from fedkd.spec import ALGORITHMS, load_spec
from tests.inprocess import InProcessGrid
from tests.test_engine import SMALL

DOC = Path(__file__).resolve().parents[1] / "docs" / "what-leaves-a-client.md"
WEIGHTS = "<student weights>"
STATUSES = (
    "mechanism",
    "post-processing",
    "public by assumption",
    "oracle (simulation only)",
    "unprotected",
)
DP = ["privacy.dpsgd=true", "privacy.noise_multiplier=1.0", "train.epochs=1"]
# Per algorithm: the spec it runs with (DP-SGD wherever the algorithm takes it).
RUNS = {
    "dsfl": DP,
    "fedmd": DP,
    "feddf": DP,
    "relation": DP,
    "fedavg": [*DP, "clients.students=['cnn_small']"],
    "local_only": DP,
    "fd": [],
    "fedproto": [],
    "centralized": [],
    "pate": ["algorithm.teachers_per_client=2"],
}
HISTOGRAM = ["algorithm.teacher=class_weighted", "privacy.histogram_noise=20"]


RUNS_WITH = {"any": (True, False), "with a mechanism": (True,), "without a mechanism": (False,)}


def documented() -> set[tuple[str, str, str, str, str, bool]]:
    """(algorithm, message, part, record, key, mechanism on) of every row of the table."""
    rows = set()
    lines = [ln.strip() for ln in DOC.read_text().splitlines() if ln.strip().startswith("|")]
    header = [c.strip().lower() for c in lines[0].strip("|").split("|")]
    for line in lines[2:]:
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True))
        status = cells["status"].lower()
        assert any(status.startswith(s) for s in STATUSES), line
        key = cells["key"].strip("`")
        # A key with ``<phase>`` stands for one key per phase a node times.
        keys = [key.replace("<phase>", p) for p in wire.NODE_PHASES] if "<phase>" in key else [key]
        for algorithm in re.split(r"[,\s]+", cells["algorithms"]):
            for mechanism in RUNS_WITH[cells["runs"]] if algorithm else ():
                for k in keys:
                    row = (algorithm, cells["message"], cells["part"], cells["record"], k)
                    rows.add((*row, mechanism))
    return rows


def _record_keys(algorithm: str, message: str, content, student_keys: set[str], mechanism: bool):
    """(algorithm, message, part, record, key, mechanism on) of every value in one reply."""
    for name, record in content.items():
        part, record_kind = "-", name
        if name.count(".") == 2:
            part, record_kind, _ = name.split(".")
        for key in record:
            if record_kind == "arrays" and key in student_keys:
                key = WEIGHTS
            yield algorithm, message, part, record_kind, key, mechanism


class RecordingGrid(InProcessGrid):
    """The in-process grid, keeping every reply a node sends."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.replies: list[Message] = []

    def send_and_receive(self, messages, *, timeout=None):
        replies = list(super().send_and_receive(messages, timeout=timeout))
        self.replies += replies
        return replies


def sent_values(tmp_path, algorithm: str, overrides: list[str]) -> set[tuple]:
    spec = load_spec(None, [*SMALL, f"algorithm.name={algorithm}", *overrides])
    grid = RecordingGrid(make_client_app(spec), spec.num_nodes)
    run_rounds(grid, spec, RunRecorder(tmp_path / algorithm, spec))
    # The audit's export of client 0's student (PATE's clients hold teachers, no student).
    if spec.algorithm.name not in ("centralized", "pate"):
        node = next(iter(grid.contexts))
        request = wire.request({"round": spec.rounds, "export_ids": [0]})
        grid.send_and_receive([Message(request, dst_node_id=node, message_type=wire.MSG_EXPORT)])
    data = federated_data(spec)
    student_keys = {
        key
        for cid in range(spec.clients.num_clients)
        for key in init_student(spec.student_for(cid), data.input_shape, data.num_classes, 0)
        .state_dict()
        .keys()
    }
    values = set()
    for reply in grid.replies:
        message = reply.metadata.message_type.split(".")[-1]
        mechanism = spec.privacy.enabled(spec.algorithm.name)
        values |= set(_record_keys(algorithm, message, reply.content, student_keys, mechanism))
    return values


@pytest.mark.parametrize("algorithm", sorted(RUNS))
def test_every_value_a_client_sends_is_in_the_table(tmp_path, algorithm):
    assert set(RUNS) == set(ALGORITHMS)
    values = sent_values(tmp_path, algorithm, RUNS[algorithm])
    if algorithm == "dsfl":  # also with the label histograms, and with no mechanism at all
        values |= sent_values(tmp_path / "histogram", algorithm, [*DP, *HISTOGRAM])
        values |= sent_values(tmp_path / "plain", algorithm, [])
    missing = sorted(values - documented())
    assert not missing, f"not in {DOC.name}: {missing}"


def test_a_deployed_node_sends_no_private_statistics(tmp_path):
    # The `flwr run` app (what deployed SuperNodes load) has no oracle channel.
    spec = load_spec(None, [*SMALL, *DP])
    grid = RecordingGrid(make_client_app(spec, oracle=False), spec.num_nodes)
    recorder = RunRecorder(tmp_path / "deployed", spec)
    run_rounds(grid, spec, recorder)
    for reply in grid.replies:
        for name, record in reply.content.items():
            assert ".oracle." not in name
            assert not {"train_loss", "local_acc"} & set(record), name
    assert all(r["train_loss_mean"] is None and "oracle_metrics" not in r for r in recorder.rounds)
    assert all(r["client_local_acc_mean"] is None for r in recorder.rounds)
    assert all(r["client_test_acc_mean"] is not None for r in recorder.rounds)
