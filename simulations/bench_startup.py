"""Benchmark: where the time goes before a run's first round (`fedkd run`, Flower + Ray).

Usage::

    python simulations/bench_startup.py [SPEC ...] [--repeat 1] [--timeout S] [--out table.md]

Runs ``fedkd run SPEC --set rounds=1`` (default: the built-in quickstart and
``simulations/mnist/fedavg.toml``) in a fresh process per repetition, with a tracer loaded
through ``sitecustomize`` into every process of the run (the driver and Ray's workers, which
inherit ``PYTHONPATH``). The tracer only records wall-clock timestamps of milestones; it changes
nothing the run computes. Each row is seconds since the driver process started (the earliest of
the workers for a worker milestone):

- cli imported: ``fedkd.run.cli`` (and so torch, the spec and the strategies) imported;
- engine called: ``flwr.simulation.run_simulation`` entered (the ServerApp's thread starts in
  it);
- ray.init called / returned: Ray's start in the driver (Flower's Ray backend calls it in the
  engine);
- server data: the ServerApp's ``federated_data`` done (it runs while Ray starts);
- discovery sent / done: the server's ``query.hello`` to every node, and its last reply (Ray
  actors start, import the ClientApp and load their node's data meanwhile);
- worker ClientApp imported, worker hello: in the first worker;
- worker torch._dynamo: the first worker's import of ``torch._dynamo``, which
  ``torch.optim.Optimizer`` does on its first construction (``add_param_group``) and step;
- first training step: the first ``backward`` of a client's training loss in any worker
  (the loop learner and the Opacus path), or the first call of a function made by
  ``torch.func.grad_and_value`` (the vectorised learner's steps, which never call ``backward``);
- first round done: the first ``train.round`` exchange's replies are back;
- exit: the driver's interpreter exits (audit, Ray shut down).

Two rows are not times: the niceness of the driver and of the first worker when each imported
the ClientApp (Ray renices its workers by ``RAY_worker_niceness`` as they start).

Milestones a run does not reach (e.g. no worker training step in a vectorised run) show "-".
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_SPECS = ["quickstart", "simulations/mnist/fedavg.toml"]

# (milestone key, row label, which process records it)
MILESTONES = [
    ("torch_start", "torch import starts", "driver"),
    ("cli_imported", "cli imported", "driver"),
    ("engine_called", "engine called", "driver"),
    ("ray_init_called", "ray.init called", "driver"),
    ("ray_init_done", "ray.init returned", "driver"),
    ("server_data", "server data loaded", "driver"),
    ("dynamo_start", "driver torch._dynamo import starts", "driver"),
    ("dynamo_done", "driver torch._dynamo imported", "driver"),
    ("discovery_sent", "discovery sent (query.hello)", "driver"),
    ("process_start", "first worker process started", "worker"),
    ("torch_start", "worker torch import starts", "worker"),
    ("client_app_imported", "worker ClientApp imported", "worker"),
    ("hello_handled", "worker hello answered", "worker"),
    ("discovery_done", "discovery done", "driver"),
    ("dynamo_start", "worker torch._dynamo import starts", "worker"),
    ("dynamo_done", "worker torch._dynamo imported", "worker"),
    ("first_backward", "first training step", "worker"),
    ("first_round_done", "first round's replies back", "driver"),
    ("exit", "driver exits", "driver"),
]

# Loaded as `sitecustomize` in every process of the traced run. It wraps a few functions when
# their module is first imported, and appends "pid role name time" lines to $FEDKD_STARTUP_TRACE.
TRACER = r"""
import os, sys, time, importlib.abc, importlib.machinery, atexit

_PATH = os.environ.get("FEDKD_STARTUP_TRACE")


def _process_start():
    ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
    uptime = float(open("/proc/uptime").read().split()[0])
    return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))


_DONE = set()


def mark(name, stamp=None):
    if name in _DONE:
        return
    _DONE.add(name)
    with open(_PATH, "a") as f:
        f.write(f"{os.getpid()} {_ROLE[0]} {name} {stamp or time.time():.4f}\n")


def _wrap(module, attr, before=None, after=None):
    fn = getattr(module, attr)

    def wrapped(*args, **kwargs):
        if before:
            mark(before)
        out = fn(*args, **kwargs)
        if after:
            mark(after)
        return out

    setattr(module, attr, wrapped)


def _patch_cli(m):
    mark("cli_imported")


def _patch_flwr_simulation(m):
    _wrap(m, "run_simulation", before="engine_called")


def _patch_server_app(m):
    _wrap(m, "federated_data", after="server_data")
    _wrap(m, "discover_clients", before="discovery_sent", after="discovery_done")
    grid = m.StoppableGrid
    send = grid.send_and_receive

    def send_and_receive(self, messages, **kwargs):
        out = send(self, messages, **kwargs)
        if any(msg.metadata.message_type == "train.round" for msg in messages):
            mark("first_round_done")
        return out

    grid.send_and_receive = send_and_receive


def _patch_client_app(m):
    mark("client_app_imported")
    with open(_PATH, "a") as f:  # by now a Ray worker has reniced itself (RAY_worker_niceness)
        f.write(f"{os.getpid()} {_ROLE[0]} niceness {os.getpriority(os.PRIO_PROCESS, 0)}\n")
    _wrap(m, "handle_hello", after="hello_handled")


def _patch_torch(m):
    backward = m.Tensor.backward

    def traced_backward(self, *args, **kwargs):
        mark("first_backward")
        return backward(self, *args, **kwargs)

    m.Tensor.backward = traced_backward
    grad_and_value = m.func.grad_and_value  # the vectorised learner's step (no backward)

    def traced_grad_and_value(*args, **kwargs):
        step = grad_and_value(*args, **kwargs)

        def traced_step(*step_args, **step_kwargs):
            mark("first_backward")
            return step(*step_args, **step_kwargs)

        return traced_step

    m.func.grad_and_value = traced_grad_and_value


def _patch_ray(m):
    _wrap(m, "init", before="ray_init_called", after="ray_init_done")


_PATCHES = {
    "ray": _patch_ray,
    "fedkd.run.cli": _patch_cli,
    "flwr.simulation": _patch_flwr_simulation,
    "fedkd.apps.server_app": _patch_server_app,
    "fedkd.apps.client_app": _patch_client_app,
    "torch": _patch_torch,
}


class _Loader(importlib.abc.Loader):
    def __init__(self, inner, patch):
        self.inner, self.patch = inner, patch

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        if module.__name__ == "torch._dynamo":
            mark("dynamo_start")
        if module.__name__ == "torch":
            mark("process_start", _process_start())
            mark("torch_start")
        self.inner.exec_module(module)
        if module.__name__ == "torch._dynamo":
            mark("dynamo_done")
        else:
            self.patch(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in _PATCHES and name != "torch._dynamo":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader, _PATCHES.get(name))
        return spec


_ROLE = ["worker"]


def become_driver():
    _ROLE[0] = "driver"
    with open(_PATH, "a") as f:
        f.write(f"{os.getpid()} driver start {_process_start():.4f}\n")
    atexit.register(mark, "exit")


if _PATH:
    sys.meta_path.insert(0, _Finder())
"""

# The driver: the CLI, in a process that tells the tracer it is the driver first.
DRIVER = (
    "import sys, sitecustomize; sitecustomize.become_driver(); "
    "from fedkd.run.cli import app; sys.argv = ['fedkd'] + sys.argv[1:]; app()"
)


def traced_run(spec: str, workdir: Path, timeout: float | None = None) -> dict[str, float]:
    """Milestone -> seconds since the driver process started, for one traced 1-round run.

    A run still going after `timeout` seconds is stopped (SIGTERM twice: fedkd's own stop,
    which shuts Ray down) and keeps the milestones it reached, with ``"stopped"`` set to 1; a
    run that fails (e.g. Ray did not start) keeps them too, with ``"failed"`` set to 1.
    """
    trace = workdir / "trace.txt"
    trace.unlink(missing_ok=True)
    (workdir / "sitecustomize.py").write_text(TRACER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(workdir), str(ROOT), env.get("PYTHONPATH", "")])
    env["FEDKD_STARTUP_TRACE"] = str(trace)
    args = [] if spec == "quickstart" else [spec]
    out = Path(tempfile.mkdtemp(dir=workdir)) / "run"
    cmd = [sys.executable, "-c", DRIVER, "run", *args, "--quiet", "--set", "rounds=1"]
    driver = subprocess.Popen([*cmd, "--out", str(out)], env=env, cwd=ROOT)
    stopped = False
    try:
        driver.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stopped = True
        for _ in range(2):  # the first asks for a stop after the replies in flight
            driver.send_signal(signal.SIGTERM)
            try:
                driver.wait(timeout=30)
                break
            except subprocess.TimeoutExpired:
                continue
        else:
            driver.kill()
            driver.wait()
    failed = not stopped and driver.returncode != 0  # e.g. Ray did not start: keep what it reached
    driver_start, rows = read_trace(trace)
    niceness = {key: max(values) for key, values in rows.items() if key.endswith(" niceness")}
    times = {key: min(t) - driver_start for key, t in rows.items() if key not in niceness}
    return {**times, **niceness, "stopped": float(stopped), "failed": float(failed)}


def read_trace(trace: Path) -> tuple[float, dict[str, list[float]]]:
    """The driver's start (epoch seconds) and every ``"role milestone"`` key's timestamps.

    Parameters
    ----------
    trace : Path
        The file the tracer (`TRACER`, through ``$FEDKD_STARTUP_TRACE``) appended to.

    Returns
    -------
    tuple of float and dict
        The driver process's start, and each milestone's timestamps (one per process).
    """
    start = None
    rows: dict[str, list[float]] = {}
    for line in trace.read_text().splitlines():
        _pid, role, name, stamp = line.split()
        if role == "driver" and name == "start":
            start = float(stamp)
        else:
            rows.setdefault(f"{role} {name}", []).append(float(stamp))
    if start is None:
        raise RuntimeError(f"{trace}: the driver did not record its start")
    return start, rows


def table(results: dict[str, list[dict[str, float]]]) -> str:
    """Markdown: one row per milestone, one column per spec (median over repetitions)."""
    specs = list(results)
    lines = ["| milestone (s since process start) | " + " | ".join(specs) + " |"]
    lines.append("|---|" + "---:|" * len(specs))
    for name, label, role in MILESTONES:
        key = f"{role} {name}"
        cells = []
        for spec in specs:
            got = [run[key] for run in results[spec] if key in run]
            cells.append(f"{statistics.median(got):.2f}" if got else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for role in ("driver", "worker"):
        got = [
            [run[f"{role} niceness"] for run in results[spec] if f"{role} niceness" in run]
            for spec in specs
        ]
        cells = [f"{statistics.median(values):.0f}" if values else "-" for values in got]
        lines.append(f"| {role} niceness (at ClientApp import) | " + " | ".join(cells) + " |")
    for key, label in [("stopped", "stopped at --timeout"), ("failed", "that failed")]:
        counts = [str(sum(int(run.get(key, 0)) for run in results[spec])) for spec in specs]
        if any(count != "0" for count in counts):
            lines.append(
                f"| runs {label} (rows they did not reach left out) | " + " | ".join(counts) + " |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("specs", nargs="*", default=DEFAULT_SPECS, help="'quickstart' or a path")
    parser.add_argument("--repeat", type=int, default=1, help="runs per spec (median shown)")
    parser.add_argument("--out", type=Path, help="also write the table (Markdown) here")
    parser.add_argument("--json", type=Path, help="also write every run's milestones here")
    parser.add_argument(
        "--timeout", type=float, help="stop a run after this many seconds, keep what it reached"
    )
    args = parser.parse_args()
    results: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="fedkd-startup-") as tmp:
        for spec in args.specs:
            for _ in range(args.repeat):
                results.setdefault(spec, []).append(traced_run(spec, Path(tmp), args.timeout))
    text = table(results)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
