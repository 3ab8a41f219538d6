"""Benchmark: one round of DP-SGD on one node, the Opacus loop against the vectorised learner.

Usage::

    python simulations/bench_dpsgd.py [--spec simulations/privacy_sweep.toml] [--epochs 1]

The privacy sweep's recipe (`simulations/privacy_sweep.toml`: ``cnn_small_tanh``, Poisson
batches of expected size 256, full-size MNIST over 20 clients, Dirichlet 0.1) with one round of
``--epochs`` local epochs; node 0 of two cohort nodes (10 clients). Each learner runs
``train_private`` on those clients in a fresh process with one torch thread, as a node does:

- loop: `fedkd.learner.cohort.CohortLearner`, one client at a time through Opacus;
- vectorised, nested vmap: `fedkd.learner.vectorised.VectorisedCohortLearner` with per-sample
  gradients by nested ``vmap`` (``method="vmap"`` of
  `fedkd.privacy.vectorised_dpsgd.clipped_sum_and_losses`);
- vectorised, layer closed forms: the same learner with ``method="layers"``
  (`fedkd.privacy.layer_grads`), its default for the zoo's models.

It prints, per learner, the process CPU seconds of ``train_private`` (after the clients' noise
calibration, which a node pays once per process and which is timed apart) (``time.process_time``:
less sensitive than wall time to other jobs on the machine), the wall seconds, and the ledger
figures of every client (sample rate, noise multiplier, steps), which must be equal across the
learners, and the mean of the clients' losses. Imports (Opacus, torch._dynamo on the first
optimizer) happen before the clock starts.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import time
from pathlib import Path

LEARNERS = ("loop", "vmap", "layers")
LEDGER = ("dp_sample_rate", "dp_noise_multiplier", "dp_steps")


def measure(spec_path: str, epochs: int, learner: str) -> dict:
    """``train_private`` of node 0's clients by `learner`, in this process."""
    import torch

    from fedkd.assembly import cohort_config, federated_data, hosted_clients
    from fedkd.learner.cohort import CohortLearner
    from fedkd.learner.loop import make_optimizer
    from fedkd.learner.vectorised import VectorisedCohortLearner
    from fedkd.privacy import vectorised_dpsgd
    from fedkd.privacy.dpsgd import sample_rate_and_steps_per_epoch
    from fedkd.spec import load_spec

    torch.set_num_threads(1)
    overrides = ["rounds=1", f"train.epochs={epochs}", "clients.clients_per_node=10"]
    spec = load_spec(spec_path, overrides)
    data = federated_data(spec)
    cids = hosted_clients(spec, 0, spec.num_nodes)
    config = cohort_config(spec)
    make_optimizer([torch.zeros(1, requires_grad=True)], config.private.optim, torch_optimizer=True)
    # The noise calibration is cached per process (a node pays it in its first round only):
    # timed apart, before the clock.
    calibration = time.process_time()
    for c in cids:
        config.dp.noise_for(
            *sample_rate_and_steps_per_epoch(len(data.clients[c].y_train), spec.train.batch_size)
        )
    calibration = time.process_time() - calibration
    if learner == "loop":
        import opacus  # noqa: F401

        node = CohortLearner(data, config, {})
    else:
        vectorised_dpsgd.clipped_sum_and_losses = functools.partial(
            vectorised_dpsgd.clipped_sum_and_losses, method=learner
        )
        node = VectorisedCohortLearner(data, config, {}, device="cpu")
        node.dev.train  # noqa: B018 (the node's data on its device, cached before the clock)
    cpu, wall = time.process_time(), time.perf_counter()
    results = node.train_private(1, cids)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {
        "learner": learner,
        "cpu_s": cpu,
        "calibration_cpu_s": calibration,
        "wall_s": wall,
        "examples": sum(len(data.clients[c].y_train) for c in cids),
        "ledger": {c: [results[c].metrics[k] for k in LEDGER] for c in cids},
        "mean_loss": sum(float(results[c].metrics["train_loss"]) for c in cids) / len(cids),
    }


def main(argv: list[str] | None = None) -> None:
    """Run each learner in a fresh process, print the table and check the ledgers agree."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spec", default=str(Path(__file__).parent / "privacy_sweep.toml"))
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--learners", nargs="+", choices=LEARNERS, default=list(LEARNERS))
    parser.add_argument("--one", choices=LEARNERS, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.spec, args.epochs, args.one)))
        return
    rows = []
    for learner in args.learners:
        cmd = [sys.executable, __file__, "--spec", args.spec, "--epochs", str(args.epochs)]
        out = subprocess.run([*cmd, "--one", learner], check=True, capture_output=True, text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("| learner | CPU s | wall s | examples | mean loss | noise calibration CPU s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['learner']} | {r['cpu_s']:.1f} | {r['wall_s']:.1f} | {r['examples']:,} "
            f"| {r['mean_loss']:.4f} | {r['calibration_cpu_s']:.1f} |"
        )
    same = all(r["ledger"] == rows[0]["ledger"] for r in rows)
    print(f"ledger figures (sample rate, noise multiplier, steps) equal: {same}")
    if not same:
        for r in rows:
            print(r["learner"], r["ledger"])
        sys.exit(1)


if __name__ == "__main__":
    main()
