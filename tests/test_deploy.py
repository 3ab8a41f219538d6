"""Multi-site deployment: development certificates, site data, `fedkd submit`, and a secured
SuperLink with SuperNodes on loopback (Flower's deployment engine, not the simulation).

The slow test starts real Flower processes on 127.0.0.1 with free ports: a SuperLink with TLS
and SuperNode authentication, two registered SuperNodes and one whose key was never registered.
Every process is stopped by its own pid (with whatever it started) when the test ends, also when
it fails.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from flwr.app import Error, Message
from flwr.cli.supernode.register import try_load_public_key
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from flwr.supercore.primitives.asymmetric import public_key_to_bytes
from typer.testing import CliRunner

from fedkd.apps.client_app import make_client_app
from fedkd.apps.server_app import FederationError, run_rounds
from fedkd.apps.wire import MSG_HELLO, MSG_ROUND
from fedkd.assembly import federated_data, node_data
from fedkd.data.sources import DataError
from fedkd.results import RunRecorder
from fedkd.run.cli import app as fedkd_cli
from fedkd.spec import load_spec
from tests.flower_processes import (
    BIN,
    flower_env,
    flwr_json,
    free_port,
    run_status,
    stop,
    wait_until_up,
)
from tests.inprocess import InProcessGrid

CONNECTION = "fedkd-deploy-pytest"  # must not name a folder in the cwd of `flwr` (migration)
# Two rounds of DS-FL on digits, two clients: one per SuperNode.
SPEC = [
    "algorithm.name=dsfl",
    "rounds=2",
    "clients.num_clients=2",
    "clients.min_clients=2",
    "clients.clients_per_node=1",
    "data.proxy_size=200",
    "train.epochs=1",
    "distill.epochs=1",
    "server.epochs=1",
    "resources.round_timeout=90",
]
ACCURACY_KEYS = (
    "server_test_acc",
    "teacher_test_acc",
    "client_test_acc_mean",
    "client_test_acc_min",
    "client_test_acc_max",
    "client_local_acc_mean",
)
EXACT_KEYS = ("bytes_up", "bytes_down", "bytes_up_per_client", "eval_bytes_up", "clients_ok")


def _inprocess(spec_overrides: list[str], out: Path, **grid_kwargs) -> list[dict]:
    """The spec on the in-process grid (one client per node, the same partitions)."""
    spec = load_spec(None, spec_overrides)
    grid = InProcessGrid(make_client_app(spec), spec.num_nodes, **grid_kwargs)
    run_rounds(grid, spec, RunRecorder(out, spec))
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# -- fedkd certs ----------------------------------------------------------------------------------
def test_dev_certificates_are_what_flower_and_tls_accept(tmp_path: Path) -> None:
    folder = tmp_path / "certs"
    args = ["certs", str(folder), "--nodes", "2", "--host", "site.lab"]
    res = CliRunner().invoke(fedkd_cli, args)
    assert res.exit_code == 0, res.output
    assert "DEVELOPMENT ONLY" in (folder / "DEV-ONLY.txt").read_text()

    # The SuperLink certificate chains to the CA for the host given and for loopback (which
    # the SuperLink's own ServerApps dial), and for no other.
    ca = x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((folder / "server.crt").read_bytes())
    policy = PolicyBuilder().store(Store([ca]))
    loopback = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
    for name in (loopback, x509.DNSName("localhost"), x509.DNSName("site.lab")):
        policy.build_server_verifier(name).verify(server, [])
    with pytest.raises(VerificationError):
        policy.build_server_verifier(x509.DNSName("other.lab")).verify(server, [])

    # Node keys: what `flwr supernode register` and `flower-supernode` load, and a pair.
    for i in range(2):
        private = load_ssh_private_key((folder / f"supernode-{i}.key").read_bytes(), None)
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        registered = try_load_public_key(folder / f"supernode-{i}.pub")
        assert registered == public_key_to_bytes(private.public_key())
        assert (folder / f"supernode-{i}.key").stat().st_mode & 0o077 == 0
    assert not (folder / "supernode-2.key").exists()

    # Existing files are never overwritten silently; malformed hosts are refused.
    again = CliRunner().invoke(fedkd_cli, ["certs", str(folder)])
    assert again.exit_code == 2 and "--force" in again.output
    bad = CliRunner().invoke(fedkd_cli, ["certs", str(tmp_path / "b"), "--host", "h:9093"])
    assert bad.exit_code == 2 and "--host" in bad.output
    assert not (tmp_path / "b").exists()


class _ErrorReplyGrid(InProcessGrid):
    """A ClientApp exception becomes an error reply, as a SuperNode sends it."""

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            try:
                replies.extend(super().send_and_receive([msg], timeout=timeout))
            except Exception as err:  # noqa: BLE001 - any ClientApp failure, as Flower does
                replies.append(Message(error=Error(code=0, reason=repr(err)), reply_to=msg))
        return replies


# -- site data ------------------------------------------------------------------------------------
def _digits_site_file(path: Path, n: int, with_test: bool, seed: int = 7) -> np.ndarray:
    """A site file in the units of the digits source before standardisation (pixels / 16)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(y), n + 20, replace=False)
    arrays = {"x_train": x[idx[:n]].reshape(-1, 8, 8) / 16.0, "y_train": y[idx[:n]]}
    if with_test:
        arrays |= {"x_test": x[idx[n:]].reshape(-1, 8, 8) / 16.0, "y_test": y[idx[n:]]}
    np.savez(path, **arrays)
    return arrays["x_train"]


def test_site_file_replaces_the_node_partition_only(tmp_path: Path) -> None:
    # No validation slice: the counts below are the site file's own (test_validation.py
    # checks the slice a site holds out for validation).
    spec = load_spec(None, [*SPEC, "data.validation_fraction=0"])
    data = federated_data(spec)
    assert node_data(spec, {"partition-id": 1, "num-partitions": 2}) is data

    raw = _digits_site_file(tmp_path / "site.npz", 150, with_test=True)
    config = {"partition-id": 1, "num-partitions": 2, "data-path": str(tmp_path / "site.npz")}
    local = node_data(spec, config)
    site = local.clients[1]
    assert site.num_examples == 150 and len(site.y_local_test) == 20
    # Standardised with the spec data's statistics: on the proxy set's scale.
    expected = (raw[:, None] - data.input_mean) / data.input_std
    np.testing.assert_allclose(site.x_train, expected, rtol=1e-5, atol=1e-6)
    assert local.clients[0] is data.clients[0]
    assert local.proxy_x is data.proxy_x and local.test_x is data.test_x
    assert node_data(spec, config) is local  # cached: clients call it every message

    # Without x_test, a local_test_fraction slice of x_train is held out.
    _digits_site_file(tmp_path / "train_only.npz", 100, with_test=False)
    held = node_data(spec, config | {"data-path": str(tmp_path / "train_only.npz")}).clients[1]
    assert held.num_examples + len(held.y_local_test) == 100 and len(held.y_local_test) == 10


@pytest.mark.parametrize(
    ("arrays", "config", "message"),
    [
        ({"x_train": np.zeros((5, 7, 7)), "y_train": np.zeros(5)}, {}, "shape"),
        ({"x_train": np.zeros((5, 8, 8)), "y_train": np.full(5, 10)}, {}, "label 10"),
        ({"x_train": np.zeros((5, 8, 8))}, {}, "y_train"),
        (
            {"x_train": np.zeros((5, 8, 8)), "y_train": np.zeros(5)},
            {"num-partitions": 1},
            "exactly one client",
        ),
    ],
)
def test_site_file_that_does_not_fit_is_refused(tmp_path, arrays, config, message) -> None:
    spec = load_spec(None, SPEC)
    np.savez(tmp_path / "site.npz", **arrays)
    node_config = {"partition-id": 0, "num-partitions": 2, "data-path": str(tmp_path / "site.npz")}
    with pytest.raises(DataError, match=message) as err:
        node_data(spec, node_config | config)
    assert "data-path" in str(err.value)


def test_a_node_on_its_site_file_trains_and_a_bad_one_stops_the_start(tmp_path: Path) -> None:
    _digits_site_file(tmp_path / "site.npz", 120, with_test=True)
    spec = load_spec(None, SPEC)
    grid = InProcessGrid(make_client_app(spec), spec.num_nodes)
    node = next(n for n, c in grid.contexts.items() if c.node_config["partition-id"] == 1)
    grid.contexts[node].node_config["data-path"] = str(tmp_path / "site.npz")
    run_rounds(grid, spec, RunRecorder(tmp_path / "site-run", spec))
    rows = (tmp_path / "site-run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["clients_ok"] for r in rows] == [2, 2]

    # A site file that does not fit fails the node's hello: the run stops before round 1.
    np.savez(tmp_path / "bad.npz", x_train=np.zeros((4, 3)), y_train=np.zeros(4))
    spec = load_spec(None, [*SPEC, "resources.round_timeout=2"])
    grid = _ErrorReplyGrid(make_client_app(spec), spec.num_nodes)
    grid.contexts[node].node_config["data-path"] = str(tmp_path / "bad.npz")
    with pytest.raises(FederationError, match=r"no node hosts clients \[1\]"):
        run_rounds(grid, spec, RunRecorder(tmp_path / "bad-run", spec))
    assert not (tmp_path / "bad-run" / "metrics.jsonl").exists()


# -- faults the deployment engine produces --------------------------------------------------------
class _DeadNodeGrid(InProcessGrid):
    """Node `dead` stops from round `dead_from` on; the SuperLink answers for it, as Flower's
    does when a node misses its heartbeats: an error reply from the SuperLink's own id."""

    def __init__(self, *args, dead: int, dead_from: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.dead, self.dead_from = dead, dead_from

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        alive, replies = [], []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id  # as a real grid's push does
            index = (msg.metadata.dst_node_id - 1000) // 7
            rnd = int(msg.metadata.group_id or 0)
            if index == self.dead and rnd >= self.dead_from:
                replies.append(create_message_error_unavailable_res_message(msg.metadata, "node"))
            else:
                alive.append(msg)
        return replies + list(super().send_and_receive(alive, timeout=timeout))


def test_dead_node_counts_as_failed_and_the_round_goes_on(tmp_path: Path, caplog) -> None:
    spec = load_spec(None, [*SPEC, "clients.num_clients=3", "clients.min_clients=2"])
    grid = _DeadNodeGrid(make_client_app(spec), spec.num_nodes, dead=2, dead_from=2)
    with caplog.at_level(logging.WARNING, logger="fedkd"):
        summary = run_rounds(grid, spec, RunRecorder(tmp_path / "run", spec))
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["status"] == "completed"
    # Round 1's teacher reaches its clients with round 2's message, which the dead node misses:
    # its client's round-1 upload was used (ok, and in bytes_up), its round-1 digest is lost
    # (counted apart), and it fails round 2's local training. A client counts either in the
    # bytes and as ok, or as failed.
    assert [(r["clients_ok"], r["clients_failed"]) for r in rows] == [(3, 0), (2, 1)]
    assert [r["clients_digest_failed"] for r in rows] == [1, 0]
    for row in rows:
        assert row["bytes_up"] == row["clients_ok"] * row["bytes_up_per_client"]
    # The loss is recorded once, in the round it happened in, with its cause.
    assert rows[0]["clients_lost"] == []
    [lost] = rows[1]["clients_lost"]
    assert (lost["client"], lost["round"]) == (2, 2) and lost["cause"].startswith("node error")
    assert rows[-1]["server_test_acc"] is not None
    # The failure is pinned on the dead node, not on the SuperLink that answered for it.
    dead_node = 1000 + 7 * 2
    assert f"node {dead_node} failed in {MSG_ROUND}" in caplog.text


def test_a_node_whose_hello_fails_is_asked_again(tmp_path: Path) -> None:
    failed_once: set[int] = set()

    def not_ready_yet(index: int, msg) -> bool:
        if msg.metadata.message_type == MSG_HELLO and index not in failed_once:
            failed_once.add(index)
            return True
        return False

    rows = _inprocess(SPEC, tmp_path / "run", crash=not_ready_yet)
    assert failed_once == {0, 1}
    assert [r["clients_ok"] for r in rows] == [2, 2]


# -- fedkd submit, offline checks -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "train.lrr=0.1"], "unknown key 'train.lrr'"),
        (["--out", "relative/dir"], "absolute path"),
        (["{tmp}/mine.toml"], "outside the Flower app folder"),
    ],
)
def test_submit_refuses_bad_input_before_contacting_anything(tmp_path, args, message) -> None:
    (tmp_path / "mine.toml").write_text("rounds = 1\n")  # valid, but not inside the app
    args = [a.format(tmp=tmp_path) for a in args]
    res = CliRunner().invoke(fedkd_cli, ["submit", "--connection", "nowhere", *args])
    assert res.exit_code == 2, res.output
    assert message in res.output


# -- the deployment engine on loopback ------------------------------------------------------------
def _start(cmd: list[str], env: dict, cwd: Path, log: Path, procs: list) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT)
    procs.append(proc)
    return proc


def _supernode(tmp: Path, i: int, key: Path, ca: Path, link: str, partition: int, procs: list):
    home = tmp / f"supernode-{i}"
    cmd = [
        str(BIN / "flower-supernode"),
        "--root-certificates",
        str(ca),
        "--superlink",
        link,
        "--auth-supernode-private-key",
        str(key),
        "--node-config",
        f"partition-id={partition} num-partitions=2",
        "--port",
        str(free_port()),  # each SuperNode's own ClientApp API
        "--max-retries",
        "3",
    ]
    return _start(cmd, flower_env(home), home, tmp / f"supernode-{i}.log", procs)


def _submit(out: Path, log: Path, env: dict, procs: list) -> subprocess.Popen:
    """`fedkd submit` of the test spec into `out`, in the background."""
    cmd = [str(BIN / "fedkd"), "submit", "--connection", CONNECTION, "--out", str(out)]
    cmd += [arg for item in SPEC for arg in ("--set", item)]
    return _start(cmd, env, log.parent, log, procs)


@pytest.mark.slow
def test_secured_deployment_runs_the_apps_like_the_simulation(tmp_path: Path) -> None:
    for tool in ("flower-superlink", "flower-supernode", "flwr", "fedkd"):
        if not (BIN / tool).is_file():
            pytest.skip(f"{tool} not installed next to {sys.executable}")
    began = time.monotonic()
    marks: dict[str, float] = {}

    def mark(what: str) -> None:
        marks[what] = round(time.monotonic() - began, 1)

    certs = tmp_path / "certs"
    made = CliRunner().invoke(fedkd_cli, ["certs", str(certs), "--nodes", "3"])
    assert made.exit_code == 0, made.output
    ca = certs / "ca.crt"

    port = free_port()
    link = f"127.0.0.1:{port}"
    cli_home = tmp_path / "cli-home"
    cli_home.mkdir()
    (cli_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "{link}"\nroot-certificates = "{ca}"\n'
    )
    cli_env = flower_env(cli_home)
    out_dir = tmp_path / "results"
    procs: list[subprocess.Popen] = []
    try:
        superlink_log = tmp_path / "superlink.log"
        superlink = _start(
            [
                str(BIN / "flower-superlink"),
                "--ssl-ca-certfile",
                str(ca),
                "--ssl-certfile",
                str(certs / "server.crt"),
                "--ssl-keyfile",
                str(certs / "server.key"),
                "--enable-supernode-auth",
                "--disable-runtime-dependency-installation",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            flower_env(tmp_path / "superlink-home"),
            tmp_path / "superlink",
            superlink_log,
            procs,
        )
        wait_until_up(superlink, f"https://{link}/health", superlink_log, 60, cafile=ca)

        # A run that fails must be reported as failed: this one's results folder already holds
        # a run. Submitted first, it fails while the nodes start.
        occupied = tmp_path / "occupied"
        occupied.mkdir()
        (occupied / "metrics.jsonl").write_text('{"round": 1}\n')
        failing = _submit(occupied, tmp_path / "submit-failing.log", cli_env, procs)

        # Flower 1.41: public keys are registered through the Control API, before the nodes start.
        registered = {
            flwr_json(
                ["supernode", "register", str(certs / f"supernode-{i}.pub"), CONNECTION],
                cli_env,
                tmp_path,
            )["node-id"]
            for i in (0, 1)
        }
        for i in (0, 1):
            _supernode(tmp_path, i, certs / f"supernode-{i}.key", ca, link, i, procs)
        # supernode-2's key was made but never registered: the SuperLink must refuse it.
        intruder = _supernode(tmp_path, 2, certs / "supernode-2.key", ca, link, 0, procs)
        mark("cluster up")

        # No wait for the nodes here: the ServerApp waits until every client is hosted.
        run = _submit(out_dir, tmp_path / "submit.log", cli_env, procs)
        # The unregistered SuperNode is refused at once and exits; reaping it now also lets its
        # SuperExec (which watches its parent's pid) end.
        intruder.wait(timeout=120)
        assert intruder.returncode != 0, (tmp_path / "supernode-2.log").read_text()
        failing.wait(timeout=300)
        failed_output = (tmp_path / "submit-failing.log").read_text()
        assert failing.returncode == 1, failed_output[-4000:]
        assert "finished:failed" in failed_output
        assert (occupied / "metrics.jsonl").read_text() == '{"round": 1}\n'
        mark("failed run")
        run.wait(timeout=600)
        output = (tmp_path / "submit.log").read_text()
        assert run.returncode == 0, output[-6000:] + superlink_log.read_text()[-4000:]
        assert "finished:completed" in output
        mark("run")

        # The unregistered SuperNode never got in: the SuperLink knows only the two registered
        # nodes, both online after the run.
        nodes = flwr_json(["supernode", "ls", CONNECTION], cli_env, tmp_path)["nodes"]
        assert {str(n["node-id"]): n["status"] for n in nodes} == {
            str(n): "online" for n in registered
        }
        run_id = re.search(r"Successfully started run (\d+)", output).group(1)
        assert run_status(CONNECTION, run_id, cli_env, tmp_path) == "finished:completed"
    finally:
        for proc in reversed(procs):
            stop(proc)
    deployed = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert json.loads((out_dir / "summary.json").read_text())["status"] == "completed"

    simulated = _inprocess(SPEC, tmp_path / "simulated")
    mark("in-process run")
    assert len(deployed) == len(simulated) == 2
    for dep, sim in zip(deployed, simulated, strict=True):
        assert dep["clients_failed"] == 0 and dep["clients_ok"] == 2
        for key in EXACT_KEYS:
            assert dep[key] == sim[key], key
        for key in ACCURACY_KEYS:
            assert dep[key] == pytest.approx(sim[key], abs=0.01), key
        assert dep["train_loss_mean"] == pytest.approx(sim["train_loss_mean"], rel=1e-3)
    print(
        f"deployment test: {marks}; wall_s per round deployed "
        f"{[round(r['wall_s'], 1) for r in deployed]}, in-process "
        f"{[round(r['wall_s'], 1) for r in simulated]}"
    )
