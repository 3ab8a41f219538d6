"""Benchmark: a fresh process's time to its first loop-learner training step (issue 27).

Usage::

    git archive main | tar -x -C /tmp/fedkd-main   # the code to compare against
    python simulations/bench_first_step.py --before /tmp/fedkd-main [--repeat 5]

Each repetition starts a fresh interpreter per checkout (``--before``, then ``--after``, this
checkout by default, alternating) that does what a Ray worker does before a client's first
step: import ``fedkd.learner.cohort``, build one ``cnn_small`` `ClientState` (MNIST shape), and
take one `fit_batches` step of its private optimizer on 32 random examples. Reported per
checkout: medians of the wall time from the spawn to the end of that step, and of the process's
CPU time (``time.process_time``) at that point, and whether ``torch._dynamo`` was imported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import sys, time, json
import torch
from fedkd.learner.cohort import CohortLearner  # noqa: F401  (what a worker imports)
from fedkd.learner.loop import ClientState, OptimConfig, StepConfig, fit_batches, seeded_generator

state = ClientState.create(0, "cnn_small", (1, 28, 28), 10, 0, OptimConfig(), OptimConfig())
gen = torch.Generator().manual_seed(0)
x, y = torch.randn(32, 1, 28, 28, generator=gen), torch.randint(0, 10, (32,), generator=gen)
model = state.model
fit_batches(model, state.private_opt, 32, StepConfig(batch_size=32), seeded_generator(0),
            lambda idx: torch.nn.functional.cross_entropy(model(x[idx]), y[idx]))
cpu, done = time.process_time(), time.time()
print(json.dumps({"done": done, "cpu": cpu, "dynamo": "torch._dynamo" in sys.modules}))
"""


def run_once(checkout: Path) -> dict:
    """One fresh interpreter on `checkout`'s code: seconds to the first step, wall and CPU."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    started = time.time()
    out = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, cwd=checkout, capture_output=True, text=True
    )
    if out.returncode != 0:
        raise SystemExit(f"{checkout}: the child failed:\n{out.stderr}")
    row = json.loads(out.stdout.splitlines()[-1])
    return {"wall": row["done"] - started, "cpu": row["cpu"], "dynamo": row["dynamo"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="checkout to compare with")
    parser.add_argument("--after", type=Path, default=ROOT, help="checkout (default: this one)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for _ in range(args.repeat):
        for name in runs:
            runs[name].append(run_once(getattr(args, name)))
    print(f"load average {os.getloadavg()[0]:.2f}; {args.repeat} runs each, alternating")
    print("| checkout | wall s (median) | CPU s (median) | walls | torch._dynamo imported |")
    print("|---|---|---|---|---|")
    for name, rows in runs.items():
        walls = ", ".join(f"{r['wall']:.2f}" for r in rows)
        print(
            f"| {name} | {statistics.median(r['wall'] for r in rows):.2f} "
            f"| {statistics.median(r['cpu'] for r in rows):.2f} | {walls} "
            f"| {', '.join(sorted({str(r['dynamo']) for r in rows}))} |"
        )


if __name__ == "__main__":
    main()
