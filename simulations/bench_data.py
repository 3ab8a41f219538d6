"""What building a run's data costs one process: CPU seconds and peak resident memory (Linux).

Times ``fedkd.assembly.federated_data(spec)`` (what the driver and every node call) in a fresh
process, after one warm-up process has filled the on-disk partition cache, so that the figure is
the cost every later process pays. Then, optionally (``--touch-node``), touches the private data
of the clients one node of ``--nodes`` hosts, as its learner would.

Usage::

    PYTHONPATH=. python simulations/bench_data.py --spec simulations/mnist_dirichlet.toml
    PYTHONPATH=. python simulations/bench_data.py --clients 10000 --per-client 36

``--clients``/``--per-client`` build the data set of ``simulations/bench_cohort.py`` (full-size
MNIST, IID, drawn with replacement where the clients need more examples than MNIST has) and its
spec's data settings.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_cohort import DEFAULT_MNIST, build_npz, spec_overrides  # noqa: E402


def _status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM), in MiB."""
    with open("/proc/self/status") as status:
        return next(int(ln.split()[1]) for ln in status if ln.startswith(f"{field}:")) / 1024


def _measure(spec_path: str | None, overrides: list[str], touch_nodes: int) -> dict:
    """In this process: federated_data's CPU seconds and the process's peak RSS."""
    from fedkd.assembly import federated_data, hosted_clients
    from fedkd.spec import load_spec

    spec = load_spec(spec_path, overrides)
    rss_before = _status_mib("VmRSS")
    # Linux: reset the peak (VmHWM) to the current RSS, so that the peak is federated_data's.
    Path("/proc/self/clear_refs").write_text("5")
    started = time.process_time()
    data = federated_data(spec)
    out = {
        "clients": len(data.clients),
        "cpu_s": time.process_time() - started,
        "rss_mib_before": rss_before,
        "peak_rss_mib": _status_mib("VmHWM"),
        "rss_mib_after": _status_mib("VmRSS"),
        "process_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if touch_nodes:
        started = time.process_time()
        for cid in hosted_clients(spec, 0, touch_nodes):
            c = data.clients[cid]
            for part in (c.x_train, c.y_train, c.x_val, c.y_val, c.x_local_test, c.y_local_test):
                part.sum()
        out["touch_cpu_s"] = time.process_time() - started
        out["touch_peak_rss_mib"] = _status_mib("VmHWM")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default=None, help="a spec file")
    parser.add_argument("--clients", type=int, default=None, help="bench_cohort's data: clients")
    parser.add_argument("--per-client", type=int, default=36, help="examples per client")
    parser.add_argument("--mnist", type=Path, default=DEFAULT_MNIST)
    parser.add_argument(
        "--touch-node", type=int, default=0, help="then touch node 0 of this many nodes' clients"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="keep the built .npz and the data cache here, for a later run (before/after)",
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec_path, overrides, nodes = json.loads(args.child)
        print(json.dumps(_measure(spec_path, overrides, nodes)))
        return
    if (args.spec is None) == (args.clients is None):
        parser.error("give one of --spec or --clients")
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        overrides: list[str] = []
        if args.clients:
            npz = work / f"data_{args.clients}x{args.per_client}.npz"
            if not npz.is_file():  # kept as it is: the data cache keys on its modification time
                build_npz(npz, args.clients, args.per_client, 28, args.mnist)
            cfg = {
                "clients": args.clients,
                "layout": "cohort",
                "cohort_nodes": 2,
                "seed": 0,
                "warmup": 0,
                "rounds": 1,
                "tail": 0,
                "npz": str(npz),
                "epochs": 1,
                "proxy_per_round": 32,
                "test_per_client": 32,
                "learner": "loop",
            }
            overrides = spec_overrides(cfg)
        env = {**os.environ, "FEDKD_CACHE_DIR": str(work / "cache")}
        child = json.dumps([args.spec, overrides, args.touch_node])
        command = [sys.executable, __file__, "--child", child]
        for what in ("warm-up (fills the partition cache)", "measured"):
            result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                sys.exit(result.stderr.strip().splitlines()[-1])
            print(f"{what}: {result.stdout.strip()}")


if __name__ == "__main__":
    main()
