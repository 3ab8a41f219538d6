"""Benchmark: one client per node vs cohort nodes (loop and vectorised learners) on Flower + Ray.

Usage::

    python simulations/bench_cohort.py [--clients 10 100 1000] [--quick] [--out table.md]
    python simulations/bench_cohort.py --clients 10000 --per-round 1000 --per-client 12 \
        --layouts cohort-vectorised [--state-memory-mb 0]   # cross-device scale
    python simulations/bench_cohort.py --phases [--quick]   # only the per-phase breakdown
    python simulations/bench_cohort.py --eval-memory        # only one node's evaluation memory
    python simulations/bench_cohort.py --workload mnist [--quick] [--out table.md]

Every configuration runs the real engine (`fedkd.run.cli.simulate`: Flower's ServerApp and
ClientApp on the Ray backend) in a fresh subprocess, for two warm-up rounds (Ray actors start, data
load; the second exchange is the first to carry a digest), the measured rounds, and one
last round left out of the means: its row also holds the run's final exchange (its digest and
evaluation), a cost paid once per run, not per round. All numbers come from the same invocation.
After the layout table comes a per-phase breakdown of one cohort node on the full-size workload
(`phase_table`: real 28x28 MNIST, 20 clients, Dirichlet 0.1, loop against vectorised, each in a
fresh process): seconds and samples/s of private training with the logit upload, distillation
and evaluation, the part spent (de)serialising client states, the process's peak RSS after each
phase, the rows private training computes (in lockstep, as before commit 3f0e1e7, and now) and
the training examples per node (balanced, and by id parity as before commit 82b3e73).
``--quick`` profiles a quarter of the node's clients. The layout table's columns:

- round s: mean ``wall_s`` of the measured rounds (server's view: one exchange per round, which
  carries the previous round's distillation + evaluation and this round's local training +
  logits upload, then aggregation);
- samples/s: examples trained on per round (private examples x epochs + proxy examples x
  distillation epochs, over all clients) divided by round s;
- learner s: the nodes' learner seconds per round (each node times its phases; the server sums
  them), divided by the number of nodes that run at once (min(nodes, Ray actors));
- overhead s: round s minus learner s: Flower, Ray, messages, serialisation and the server's
  aggregation, and also any imbalance between nodes that run at once;
- overhead (critical path) s: round s minus the learner's critical path, ``max(slowest node,
  nodes' learner seconds / nodes running at once)`` per exchange, i.e. ``wall_s`` minus the
  larger of ``learner_max_s`` and ``learner_s / parallel``: what the engine adds beyond the
  work that the slowest node must do;
- x learner: round s over the learner's critical path (the ratio that overhead (critical
  path) s leaves: 1.0 is a round that costs only its slowest node's learning);
- peak MiB / node: the largest node process's peak memory (CUDA memory allocated when the
  nodes train on a GPU, else resident set size); driver MiB: the peak resident memory of the
  process that runs the server and Flower's simulation engine (it holds the nodes' states
  that stay in their memory, `resources.state_memory_mb`);
- ceiling: one model of the same student trained at batch 4,096 on this machine (all cores).

After the layout table (and after the ``--workload mnist`` table) comes the split of the nodes'
learner seconds by phase of their round message (`format_phase_table`; parse, restore, build,
digest, evaluate, train, faults, checkpoint, reply: docs/scale.md), summed over nodes and
averaged over the measured rounds, by three clocks: wall, CPU seconds of the thread handling
the message, and CPU seconds of the node's whole process.

Data: MNIST from ``../shared/data/mnist.npz`` (or ``--mnist``), full-size 28x28 by default
(``--side 14`` or ``7``: average-pooled, the inputs of the figures before this default), IID
over the clients with ``--per-client`` examples each (10% held out locally, 10% for
validation), so that 1,000 clients fit in minutes; drawn with replacement where the clients
ask for more examples than MNIST has (10,000 clients of a dozen examples each); without MNIST,
scikit-learn's digits sampled with replacement. ``--per-round`` samples that many clients per
round (``clients.fraction``); samples/s counts the sampled clients' examples.
Algorithm: DS-FL without a server student (its distillation would count as engine overhead),
``cnn_small`` students, SGD with momentum.

``--workload mnist`` is the work users run, measured beside what the machine can do:
``simulations/mnist_dirichlet.toml`` (full-size MNIST, 20 clients, Dirichlet 0.1) with FedAvg and
DS-FL (``--algorithms``), one student architecture at a time (``cnn_small``, ``cnn_large``:
``--models``), 1 epoch at batch 32, the spec's server student and distillation kept (they are
part of DS-FL's round), evaluation only in the last round, plots off; the same layouts, warm-up,
measured and last rounds as the layout table, then the ceilings of each model, all in the same
invocation. ``--quick``: FedAvg, ``cnn_small``, 1 measured round, 100 ceiling steps. Its header
names the commit (short hash, ``dirty``) and the machine (CPU model, cores, GPU or none). Columns:

- round s, learner s, peak MiB / node: as in the layout table (learner s is the clients' work
  alone: DS-FL's server student runs in the driver, outside it);
- train samples/s: the sampled clients' private training examples x epochs per round (all 20
  clients' training rows: no proxy, distillation or evaluation rows) / round s;
- of batch-32 ceiling: train samples/s over the batch-32 ceiling of the same model: one
  single-thread process per core, each training its own model at batch 32 on MNIST's training
  rows for ``--ceiling-steps`` steps, all timed together (after a barrier), samples/s summed;
- of large-batch ceiling: over one model trained at batch 4,096 with all cores;
- x vs 1/node, x vs cohort loop: the round's speed-up over one client per node (the loop) and
  over cohort nodes with the loop, same algorithm and model (above 1: faster);
- s before round 1: seconds from the driver process's start (read from /proc) to the first
  training step of round 1 in any node (``loss.backward`` in the loop, the first step made by
  ``torch.func.grad_and_value`` in the vectorised learner), recorded by
  ``simulations/bench_startup.py``'s tracer loaded into every process of the run; "-" where the
  trace holds no such step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MNIST = REPO.parent / "shared" / "data" / "mnist.npz"
# --workload mnist (and the per-phase breakdown): the setting users run
WORKLOAD_SPEC = REPO / "simulations" / "mnist_dirichlet.toml"
WORKLOAD_ALGORITHMS = ("fedavg", "dsfl")
WORKLOAD_MODELS = ("cnn_small", "cnn_large")
LAYOUTS = {
    # name: (clients per node as a function of N, learner)
    "1 client/node (loop)": ("single", "loop"),
    "cohort nodes, loop": ("cohort", "loop"),
    "cohort nodes, vectorised": ("cohort", "vectorised"),
}
# --layouts: the command line's names of LAYOUTS
LAYOUT_OPTIONS = dict(zip(("single", "cohort-loop", "cohort-vectorised"), LAYOUTS, strict=True))
# the layouts the table's "x vs 1/node" and "x vs cohort loop" compare with
BASE_LAYOUTS = ("single", "cohort-loop")


# -- data ------------------------------------------------------------------------------------
def build_npz(path: Path, num_clients: int, per_client: int, side: int, mnist: Path) -> str:
    """An .npz with exactly the examples the run partitions: clients, proxy and test."""
    rng = np.random.default_rng(0)
    proxy, test = 500, 500
    take = num_clients * per_client + proxy
    if mnist.is_file():
        with np.load(mnist) as d:
            x_train, y_train, x_test, y_test = (
                d[k] for k in ("x_train", "y_train", "x_test", "y_test")
            )
        again = take > len(y_train)  # more examples asked for than MNIST has
        i = rng.choice(len(y_train), take, replace=again)
        j = rng.choice(len(y_test), test, replace=False)
        xs = [_pool(x_train[i], side), _pool(x_test[j], side)]
        source = "full-size MNIST" if side == 28 else f"MNIST average-pooled to {side}x{side}"
        if again:
            source += " (training examples drawn with replacement)"
        ys = [y_train[i], y_test[j]]
    else:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = digits.images.astype(np.float32) / 16.0
        i = rng.choice(len(x), take + test, replace=True)
        xs = [x[i[:take]], x[i[take:]]]
        ys = [digits.target[i[:take]], digits.target[i[take:]]]
        source = "scikit-learn digits (8x8) sampled with replacement (MNIST npz not found)"
    np.savez(path, x_train=xs[0], y_train=ys[0], x_test=xs[1], y_test=ys[1])
    return source


def _pool(images: np.ndarray, side: int) -> np.ndarray:
    """uint8 (N, 28, 28) -> float32 (N, side, side) in [0, 1] by block averaging."""
    x = images.astype(np.float32) / 255.0
    if side == x.shape[1]:
        return x
    f = x.shape[1] // side
    x = x[:, : side * f, : side * f]
    return x.reshape(len(x), side, f, side, f).mean(axis=(2, 4))


# -- one configuration (runs in a subprocess) ------------------------------------------------
def clients_per_node(cfg: dict[str, Any]) -> int:
    """One client per node, or the clients spread over ``cohort_nodes`` cohort nodes."""
    return 1 if cfg["layout"] == "single" else math.ceil(cfg["clients"] / cfg["cohort_nodes"])


def spec_overrides(cfg: dict[str, Any]) -> list[str]:
    """The ``key=value`` overrides of one configuration (on `WORKLOAD_SPEC` for ``mnist``)."""
    if cfg.get("workload") == "mnist":
        return mnist_overrides(cfg)
    n = cfg["clients"]
    per_node = clients_per_node(cfg)
    return [
        "name=bench_cohort",
        f"seed={cfg['seed']}",
        f"rounds={cfg['warmup'] + cfg['rounds'] + cfg['tail']}",
        "algorithm.name=dsfl",
        'server.student=""',
        "data.source=npz",
        f'data.path="{cfg["npz"]}"',
        "data.partition=iid",
        "data.proxy_size=500",
        "data.local_test_fraction=0.1",
        f"clients.num_clients={n}",
        f"clients.clients_per_node={per_node}",
        f"clients.fraction={min(1.0, cfg.get('per_round', n) / n)}",
        f"resources.state_memory_mb={cfg.get('state_memory_mb', 1024.0)}",
        f"resources.round_timeout={cfg.get('round_timeout', 600.0)}",
        "clients.min_clients=1",
        'clients.students="cnn_small"',
        f"train.epochs={cfg['epochs']}",
        "train.batch_size=32",
        "distill.epochs=1",
        "distill.batch_size=64",
        f"distill.proxy_per_round={cfg['proxy_per_round']}",
        f"eval.client_test_samples={cfg['test_per_client']}",
        "resources.num_cpus=1",
        f"resources.learner={cfg['learner']}",
        "resources.device=cpu",
        "output.plots=false",
    ]


def mnist_overrides(cfg: dict[str, Any]) -> list[str]:
    """`WORKLOAD_SPEC` (full-size MNIST, 20 clients, Dirichlet 0.1) as the users run it, with
    one algorithm and one student architecture, 1 epoch at batch 32, and evaluation only in
    the last round (left out of the means); the spec's server student is kept."""
    rounds = cfg["warmup"] + cfg["rounds"] + cfg["tail"]
    return [
        f"name=bench_cohort_{cfg['algorithm']}_{cfg['arch']}",
        f"rounds={rounds}",
        f"algorithm.name={cfg['algorithm']}",
        f'data.path="{cfg["mnist"]}"',
        f'clients.students=["{cfg["arch"]}"]',
        f"clients.clients_per_node={clients_per_node(cfg)}",
        "train.epochs=1",
        "train.batch_size=32",
        # A round evaluates when its number is a multiple of `every` or it is the last one.
        f"eval.every={rounds + 1}",
        "eval.client_test_samples=100",
        "resources.num_cpus=1",
        f"resources.learner={cfg['learner']}",
        "resources.device=cpu",
        "output.plots=false",
    ]


def run_one(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run one layout on the real engine; return per-round rows and what the table needs."""
    import resource

    from fedkd.run.cli import simulate
    from fedkd.spec import load_spec

    spec_path = WORKLOAD_SPEC if cfg.get("workload") == "mnist" else None
    spec = load_spec(spec_path, spec_overrides(cfg))
    out = Path(cfg["out_dir"])
    started = time.perf_counter()
    simulate(spec, out, show_progress=False)
    total = time.perf_counter() - started
    # Imported only now: `simulate` starts Ray before it imports Flower, torch and the data
    # (as `fedkd run` does), and importing them first would time a slower start than users get.
    from fedkd.apps.server_app import sample_clients
    from fedkd.assembly import federated_data

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    driver_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB
    sizes = [c.num_examples for c in federated_data(spec).clients]
    measured = range(cfg["warmup"] + 1, cfg["warmup"] + cfg["rounds"] + 1)
    sampled = [sample_clients(spec, r) for r in measured]  # the server's own draw
    private = np.mean([sum(sizes[c] for c in s) for s in sampled]) * spec.train.epochs
    distilled = np.mean([len(s) for s in sampled]) * spec.distill.proxy_per_round
    return {
        "rows": rows,
        "nodes": spec.num_nodes,
        "samples_per_round": float(private + distilled * spec.distill.epochs),
        "private_per_round": float(private),
        "per_round": len(sampled[0]),
        "total_s": total,
        "driver_peak_mb": driver_mb,
    }


# -- per-phase breakdown of one node (in process, no Flower) ---------------------------------
PHASE_SPEC = WORKLOAD_SPEC
PHASE_LEARNERS = ("loop", "vectorised")


def _timed(fn: Any, totals: dict[str, float], key: str) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[key] = totals.get(key, 0.0) + time.perf_counter() - started

    return wrapper


def private_rows(lengths: list[int], batch: int, epochs: int) -> dict[str, int]:
    """Rows of one node's private training, from the learner's own batch plan (clients stacked
    largest first): real rows, rows computed when every client is stepped for the largest
    one's steps (lockstep, the learner before commit 3f0e1e7), and rows computed now (each
    step covers only the clients that still have a batch; a client's last short batch is
    padded to the longest batch of that step)."""
    import torch

    from fedkd.learner.batch_plans import plan_batches

    ordered = sorted(lengths, reverse=True)
    offsets = np.concatenate([[0], np.cumsum(ordered)[:-1]]).tolist()
    gens = [torch.Generator().manual_seed(k) for k in range(len(ordered))]
    plan = plan_batches(ordered, offsets, epochs, batch, gens, torch.device("cpu"))
    return {
        "real": plan.real_rows,
        "lockstep": len(ordered) * sum(plan.width),
        "computed": plan.computed_rows,
    }


def placement_balance(sizes: list[int], nodes: int) -> dict[str, list[int]]:
    """Training examples per node: clients balanced by examples (the engine's placement) and
    by id parity (its placement before commit 82b3e73)."""
    from fedkd.data.placement import balanced_groups

    balanced = [sum(sizes[c] for c in g) for g in balanced_groups(sizes, nodes)]
    parity = [sum(sizes[c::nodes]) for c in range(nodes)]
    return {"balanced": balanced, "parity": parity}


def phase_one(cfg: dict[str, Any]) -> dict[str, Any]:
    """One node of the full-size MNIST workload (20 clients, Dirichlet 0.1, two cohort nodes):
    seconds per phase of one learner, state (de)serialisation, data to the device, peak RSS."""
    import gc
    import resource

    import torch

    from fedkd.assembly import cohort_config, eval_test_indices, federated_data, hosted_clients
    from fedkd.learner.cohort import CohortLearner
    from fedkd.learner.loop import make_optimizer
    from fedkd.learner.vectorised import VectorisedCohortLearner
    from fedkd.spec import load_spec
    from strategies.dsfl import DSFL

    torch.set_num_threads(1)  # as one node (Ray actor) runs

    def rss_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def current_rss_mb() -> float:
        with open("/proc/self/status") as status:
            return next(int(ln.split()[1]) for ln in status if ln.startswith("VmRSS:")) / 1024

    spec = load_spec(
        PHASE_SPEC,
        [f'clients.students=["{cfg["arch"]}"]', "clients.clients_per_node=10", "rounds=1"],
    )
    data = federated_data(spec)
    cids = hosted_clients(spec, 0, spec.num_nodes)
    if cfg["quick"]:
        cids = cids[:: max(1, len(cids) // 4)]
    config, states = cohort_config(spec), {}
    proxy = np.arange(spec.distill.proxy_per_round, dtype=np.int64)
    test_idx = eval_test_indices(spec, len(data.test_y))
    times: dict[str, float] = {}
    # Once per process: the first torch.optim optimizer imports torch._dynamo (a learner with
    # DP-SGD, Adam or non-CPU weights creates one), which would otherwise count as the first
    # client's state. fedkd's own CPU SGD imports nothing.
    started = time.perf_counter()
    make_optimizer([torch.zeros(1, requires_grad=True)], config.private.optim, torch_optimizer=True)
    times["process warm-up"] = time.perf_counter() - started
    started = time.perf_counter()
    if cfg["learner"] == "loop":
        learner = CohortLearner(data, config, states)
        learner._load = _timed(learner._load, times, "state")
        learner._save = _timed(learner._save, times, "state")
    else:
        learner = VectorisedCohortLearner(data, config, states, device="cpu")
        learner._load_stack = _timed(learner._load_stack, times, "state")
        learner._save_stack = _timed(learner._save_stack, times, "state")
        dev = learner.dev
        for part in ("train", "local_test", "validation", "proxy_x", "test_x"):
            getattr(dev, part)
    times["data to device"] = time.perf_counter() - started
    rss = {"start": rss_mb()}
    teacher = np.random.default_rng(0).normal(size=(len(proxy), data.num_classes))
    plan, inputs = {"proxy_idx": np.asarray(proxy, dtype=np.int32)}, data.proxy_x[proxy]
    for phase, call in (
        ("train + logits", lambda: DSFL.client_round(DSFL.Params(), learner, 1, cids, plan)),
        ("distill", lambda: learner.distill(1, cids, inputs, teacher.astype(np.float32))),
        ("evaluate", lambda: learner.evaluate(cids, test_idx)),
    ):
        if cfg.get("only") and phase not in cfg["only"]:
            continue
        gc.collect()
        rss[f"{phase}: before"] = current_rss_mb()
        before = times.get("state", 0.0)
        t0 = time.perf_counter()
        call()
        times[phase] = time.perf_counter() - t0
        times[f"{phase}: state"] = times.get("state", 0.0) - before
        rss[phase] = rss_mb()
    lengths = [len(data.clients[c].y_train) for c in cids]
    sizes = [c.num_examples for c in data.clients]  # what the engine places clients by
    evaluated = len(cids) * len(test_idx)
    evaluated += sum(len(data.clients[c].y_local_test) + len(data.clients[c].y_val) for c in cids)
    return {
        "times": times,
        "rss": rss,
        "clients": len(cids),
        "examples": sum(lengths),
        "distilled": len(cids) * len(proxy) * spec.distill.epochs,
        "evaluated": evaluated,
        "rows": private_rows(lengths, spec.train.batch_size, spec.train.epochs),
        "nodes": placement_balance(sizes, spec.num_nodes),
    }


def phase_table(archs: list[str], quick: bool) -> str:
    """The per-phase breakdown of one node, loop against vectorised, each in a fresh process."""
    cols = ["model", "learner", "phase", "s", "of which state s", "samples/s", "peak RSS MiB"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    notes = []
    for arch in archs:
        for learner in PHASE_LEARNERS:
            res = _subprocess({"phase": True, "arch": arch, "learner": learner, "quick": quick})
            t, rss = res["times"], res["rss"]
            work = {
                "train + logits": res["examples"],
                "distill": res["distilled"],
                "evaluate": res["evaluated"],
            }
            for once in ("process warm-up", "data to device"):
                lines.append(
                    f"| {arch} | {learner} | {once} | {t[once]:.2f} | - | - | {rss['start']:,.0f} |"
                )
            for phase, n in work.items():
                lines.append(
                    f"| {arch} | {learner} | {phase} | {t[phase]:.2f} | "
                    f"{t[f'{phase}: state']:.2f} | {n / t[phase]:,.0f} | {rss[phase]:,.0f} |"
                )
        rows, nodes = res["rows"], res["nodes"]
        notes.append(
            f"{arch}: {res['clients']} clients, {res['examples']:,} private examples; rows "
            f"computed in private training in lockstep (every client for the largest one's "
            f"steps, before 3f0e1e7): {rows['lockstep']:,} ({rows['lockstep'] / rows['real']:.2f}x "
            f"the real rows); each step only the clients still stepping: {rows['computed']:,} "
            f"({rows['computed'] / rows['real']:.2f}x). Training examples per node: "
            f"{' / '.join(f'{n:,}' for n in nodes['balanced'])} balanced by examples, "
            f"{' / '.join(f'{n:,}' for n in nodes['parity'])} by id parity (before 82b3e73)."
        )
    header = [
        "Per-phase breakdown of one cohort node (in process, 1 torch thread): full-size MNIST, "
        "20 clients, Dirichlet 0.1, the clients of node 0 of 2 (balanced by examples)"
        + (", a quarter of them (--quick)" if quick else "")
        + "; 1 epoch at batch 32; distillation on 1,000 proxy examples, 2 epochs at batch 64; "
        "evaluation on 2,000 test examples plus each client's local test and validation rows. "
        "samples/s counts rows trained on (train: private examples; distill: proxy rows x "
        "epochs) or evaluated. Peak RSS is the process's peak after the phase. Process "
        "warm-up: the first torch.optim optimizer of a process (it imports torch._dynamo). "
        f"Load average: {os.getloadavg()[0]:.2f}.",
        "",
    ]
    return "\n".join([*header, *lines, "", *notes])


def eval_memory_table(archs: list[str]) -> str:
    """One cohort node's evaluation alone (its fresh clients), loop against vectorised, each in
    a fresh process: the process's resident memory before it and its peak during it."""
    cols = ["model", "learner", "RSS before MiB", "peak during MiB", "peak vs loop"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for arch in archs:
        peaks = {}
        for learner in PHASE_LEARNERS:
            cfg = {"phase": True, "arch": arch, "learner": learner, "quick": False}
            rss = _subprocess({**cfg, "only": ["evaluate"]})["rss"]
            peaks[learner] = rss["evaluate"]
            lines.append(
                f"| {arch} | {learner} | {rss['evaluate: before']:,.0f} | "
                f"{rss['evaluate']:,.0f} | {rss['evaluate'] / peaks['loop']:.2f}x |"
            )
    header = [
        "Peak memory of one cohort node's evaluation (in process, 1 torch thread): full-size "
        "MNIST, 20 clients, Dirichlet 0.1, the 10 clients of node 0 of 2, fresh (untrained) "
        "students; 2,000 test examples plus each client's local test and validation rows. The "
        "peak is the process's (ru_maxrss), so it holds the data loading's too when that was "
        "higher. The vectorised learner's memory before evaluation includes its copy of the "
        "clients' data as one tensor (for its training steps).",
        "",
    ]
    return "\n".join([*header, *lines])


CEILING_LABELS = {
    "batch 32": "ceiling: batch 32, one single-thread process per core",
    "large batch": "ceiling: one model, batch 4,096, all cores",
}


# -- the one-model ceilings ------------------------------------------------------------------
def _training_batches(npz: str, batch: int, steps: int) -> list[tuple[Any, Any]]:
    """`steps` batches of the npz's training rows (float in [0, 1], one channel), consecutive
    slices of one shuffle, the rows repeated where the file holds fewer than needed."""
    import torch

    with np.load(npz) as d:
        x, y = d["x_train"], d["y_train"]
    take = np.random.default_rng(0).permutation(len(y))
    take = np.resize(take, batch * steps)  # repeats the shuffle where it is too short
    rows = x[take].astype(np.float32)
    if x.dtype == np.uint8:  # raw MNIST pixels
        rows /= 255.0
    xs = torch.from_numpy(rows[:, None]).split(batch)
    ys = torch.from_numpy(y[take].astype(np.int64)).split(batch)
    return list(zip(xs, ys, strict=True))


def _train_model(arch: str, batches: list[tuple[Any, Any]], ready: Any = None) -> float:
    """Samples/s of one `arch` trained with SGD (the learner's optimizer) on `batches`; the
    first batch is a warm-up step, not timed. `ready`: a barrier to wait at before timing."""
    import torch

    from fedkd.learner.loop import OptimConfig, make_optimizer
    from fedkd.models.zoo import build_model

    torch.manual_seed(0)
    model = build_model(arch, tuple(batches[0][0].shape[1:]), 10)
    opt = make_optimizer(model.parameters(), OptimConfig())

    def step(x: Any, y: Any) -> None:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step(*batches[0])  # warm-up
    if ready is not None:
        ready.wait()
    started = time.perf_counter()
    for x, y in batches[1:]:
        step(x, y)
    return sum(len(y) for _, y in batches[1:]) / (time.perf_counter() - started)


def ceiling(npz: str, batch: int = 4096, steps: int = 5, arch: str = "cnn_small") -> float:
    """Samples/s of one `arch` trained with SGD at batch `batch` on this machine's cores.

    Parameters
    ----------
    npz : str
        An .npz with ``x_train`` and ``y_train`` (uint8 pixels or floats in [0, 1]).
    batch, steps : int
        Batch size and timed steps (after one warm-up step).
    arch : str
        The student architecture (`fedkd.models.zoo`).

    Returns
    -------
    float
        Training examples per second, all cores as torch's intra-op threads.
    """
    from fedkd.learner.device import set_up_torch

    set_up_torch(os.cpu_count() or 1)  # as the run's processes set torch up
    return _train_model(arch, _training_batches(npz, batch, steps + 1))


def _single_thread_worker(
    npz: str, arch: str, batch: int, steps: int, ready: Any, out: Any
) -> None:
    from fedkd.learner.device import set_up_torch

    # As a node sets torch up: without the flush, a long ceiling (--ceiling-steps beyond
    # some 800) slows down on subnormal momentum that the nodes never compute on.
    set_up_torch(1)
    out.put(_train_model(arch, _training_batches(npz, batch, steps + 1), ready))


def ceiling_processes(
    npz: str, arch: str, batch: int = 32, steps: int = 300, processes: int | None = None
) -> float:
    """Samples/s of `processes` single-thread processes (default: one per core), each training
    its own `arch` at batch `batch` for `steps` steps, summed.

    The processes time their steps together: each waits at a barrier after its warm-up step,
    so the sum is the machine's rate with every core training at once.

    Parameters
    ----------
    npz : str
        An .npz with ``x_train`` and ``y_train``.
    arch : str
        The student architecture (`fedkd.models.zoo`).
    batch, steps : int
        Batch size and timed steps per process (after one warm-up step).
    processes : int, optional
        How many processes train at once (default: the CPU count).

    Returns
    -------
    float
        Training examples per second, summed over the processes.
    """
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # no torch threads inherited by a fork
    count = processes or os.cpu_count() or 1
    ready, out = context.Barrier(count), context.Queue()
    workers = [
        context.Process(target=_single_thread_worker, args=(npz, arch, batch, steps, ready, out))
        for _ in range(count)
    ]
    for worker in workers:
        worker.start()
    rates: list[float] = []
    while len(rates) < count:
        try:
            rates.append(out.get(timeout=5))
        except queue.Empty:
            failed = [w.exitcode for w in workers if w.exitcode]
            if failed:  # the others would wait at the barrier for ever
                for worker in workers:
                    worker.terminate()
                raise RuntimeError(
                    f"batch-{batch} ceiling process failed (exit {failed[0]})"
                ) from None
    for worker in workers:
        worker.join()
    return float(sum(rates))


# -- driver ----------------------------------------------------------------------------------
def _ray_actors() -> int:
    # Flower's Ray backend starts one actor per resources.num_cpus (1) of the machine's CPUs.
    return os.cpu_count() or 1


def summarise(name: str, cfg: dict[str, Any], res: dict[str, Any]) -> dict[str, Any]:
    last = cfg["warmup"] + cfg["rounds"]
    measured = [r for r in res["rows"] if cfg["warmup"] < r["round"] <= last]
    wall = float(np.mean([r["wall_s"] for r in measured]))
    parallel = min(res["nodes"], _ray_actors())
    learner = float(np.mean([r["learner_s"] for r in measured])) / parallel
    critical = float(
        np.mean([max(r["learner_max_s"], r["learner_s"] / parallel) for r in measured])
    )
    failed = sum(r["clients_failed"] for r in measured)
    if failed:  # a failed client makes a round shorter: say so rather than report a speed-up
        name = f"{name} ({failed} client replies FAILED)"
    return {
        "clients": cfg["clients"],
        "layout": name,
        "nodes": res["nodes"],
        "rounds": len(measured),
        "round_s": wall,
        "samples_s": res["samples_per_round"] / wall,
        "learner_s": learner,
        "overhead_s": wall - learner,
        "overhead_critical_s": wall - critical,
        "x_learner": wall / critical,
        "peak_mb": _peak_mb(measured),
        "per_round": res["per_round"],
        "driver_mb": res["driver_peak_mb"],
        "train_samples_s": res["private_per_round"] / wall,
        "before_round1_s": res.get("before_round1_s"),
        "learner_nodes_s": float(np.mean([r["learner_s"] for r in measured])),
        "phases": mean_phases(measured),
    }


def mean_phases(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """The nodes' phase seconds per round (summed over nodes: the rows' ``learner_phases_*``),
    by clock and phase, averaged over `rows`; only the clocks every row holds."""
    from fedkd.apps.wire import NODE_PHASES, PHASE_CLOCKS

    return {
        clock: {p: float(np.mean([r[clock].get(p, 0.0) for r in rows])) for p in NODE_PHASES}
        for clock in PHASE_CLOCKS
        if rows and all(clock in r for r in rows)
    }


# The clocks of the phase table, as its rows name them.
PHASE_CLOCK_LABELS = {
    "learner_phases_s": "wall",
    "learner_phases_cpu_s": "CPU (thread)",
    "learner_phases_process_cpu_s": "CPU (process)",
}


def format_phase_table(rows: list[dict[str, Any]], label_cols: list[str]) -> str:
    """Where the nodes' learner seconds go, per layout row (`summarise`'s, with its
    `label_cols`) and clock: each phase of a node's round message (`NODE_PHASES`; phases that
    took under a millisecond in every row left out), summed over nodes, mean of the measured
    rounds, beside the nodes' learner seconds summed ("" where the run's nodes sent none)."""
    from fedkd.apps.wire import NODE_PHASES

    timed = [r for r in rows if r.get("phases")]
    if not timed:
        return ""
    shown = [
        p for p in NODE_PHASES if any(by[p] >= 5e-4 for r in timed for by in r["phases"].values())
    ]
    cols = [*label_cols, "clock", *shown, "phases sum", "learner s"]
    lines = [
        "Learner seconds per round by phase of the nodes' round message, summed over nodes, "
        "mean of the measured rounds (learner s: the same, whole; the layout table divides it "
        "by the nodes running at once). wall: wall seconds; CPU (thread): CPU seconds of the "
        "thread handling the message; CPU (process): of the node's whole process (all its "
        "threads). Phases: " + ", ".join(shown) + " (the rest took under 1 ms).",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for r in timed:
        for clock, label in PHASE_CLOCK_LABELS.items():
            by = r["phases"].get(clock)
            if by is None:
                continue
            cells = [str(r[c]) for c in label_cols] + [label]
            cells += [f"{by[p]:.3f}" for p in shown]
            cells += [f"{sum(by.values()):.3f}", f"{r['learner_nodes_s']:.3f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _peak_mb(rows: list[dict[str, Any]]) -> str:
    """The largest node process's peak memory: CUDA when nodes trained on a GPU, else RSS."""
    for key, unit in (("peak_gpu_mb", "GPU"), ("peak_rss_mb", "RSS")):
        values = [r[key] for r in rows if r.get(key) is not None]
        if values:
            return f"{max(values):,.0f} {unit}"
    return "-"


def format_table(rows: list[dict[str, Any]], ceiling_sps: float, header: list[str]) -> str:
    cols = ["clients", "per round", "layout", "nodes", "rounds", "round s", "samples/s"]
    cols += ["learner s", "overhead s", "overhead (critical path) s", "x learner"]
    cols += ["x vs 1/node", "peak MiB / node", "driver MiB"]
    lines = [*header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    base = {r["clients"]: r["round_s"] for r in rows if r["layout"].startswith("1 client")}
    for r in rows:
        speedup = _times(base.get(r["clients"]), r["round_s"])
        lines.append(
            f"| {r['clients']} | {r['per_round']} | {r['layout']} | {r['nodes']} | "
            f"{r['rounds']} | {r['round_s']:.3f} | {r['samples_s']:,.0f} | "
            f"{r['learner_s']:.3f} | {r['overhead_s']:.3f} | {r['overhead_critical_s']:.3f} | "
            f"{r['x_learner']:.2f} | {speedup} | {r['peak_mb']} | {r['driver_mb']:,.0f} |"
        )
    lines.append(
        f"| - | - | ceiling: one cnn_small, batch 4,096 | - | - | - | {ceiling_sps:,.0f} | - "
        "| - | - | - | - | - | - |"
    )
    return "\n".join(lines)


# -- --workload mnist: the setting users run, beside its ceilings ----------------------------
def first_training_step_s(trace: Path) -> float | None:
    """Seconds from the driver process's start to the first training step in any node (the
    tracer's ``first_backward``), or None where the trace holds none."""
    from bench_startup import read_trace

    if not trace.is_file():
        return None
    start, rows = read_trace(trace)
    steps = rows.get("worker first_backward")
    return min(steps) - start if steps else None


def provenance() -> str:
    """One line: the commit (short hash, ``dirty`` where the checkout differs from it, as
    `fedkd.provenance.git_state` says) and the machine (CPU model, cores, torch's CPU
    capability and identity numbers, GPU or none: `fedkd.provenance.device_info`)."""
    from fedkd.provenance import device_info, git_state

    state = git_state()
    commit = (state["git_commit"] or "unknown")[:7]
    dirty = ", dirty" if state["git_dirty"] else ""
    device = device_info()
    gpu = ", ".join(device["gpus"]) or "none"
    return (
        f"Commit {commit}{dirty}; machine: {device['cpu']}, {device['cpu_count']} cores, "
        f"{device['cpu_capability']} ({device['cpu_id'] or 'CPU id unknown'}), GPU: {gpu}."
    )


def format_workload_table(
    rows: list[dict[str, Any]],
    ceilings: dict[str, dict[str, float | list[float]]],
    header: list[str],
) -> str:
    """The Markdown table of ``--workload mnist``: one row per algorithm, model and layout,
    then each model's two ceilings (columns: the module's docstring).

    `ceilings` maps each model to its ``"batch 32"`` and ``"large batch"`` samples/s, each one
    measurement or a list of them; a row's share of the batch-32 ceiling is taken against its
    own ``ceiling_bracket`` (the measurements right before and after its block) where it has
    one, else against all of its model's."""
    cols = ["algorithm", "model", "layout", "nodes", "rounds", "round s", "train samples/s"]
    cols += ["of batch-32 ceiling", "of large-batch ceiling", "learner s", "x vs 1/node"]
    cols += ["x vs cohort loop", "peak MiB / node", "s before round 1"]
    lines = [*header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    round_s = {(r["algorithm"], r["model"], r["layout_option"]): r["round_s"] for r in rows}
    for r in rows:
        ceiling_sps = ceilings[r["model"]]
        # The row's own bracket (the ceilings measured right before and after its block of
        # layouts), else every batch-32 measurement of its model.
        bracket = r.get("ceiling_bracket") or ceiling_sps["batch 32"]
        single, loop = (round_s.get((r["algorithm"], r["model"], o)) for o in BASE_LAYOUTS)
        before = r["before_round1_s"]
        lines.append(
            f"| {r['algorithm']} | {r['model']} | {r['layout']} | {r['nodes']} | {r['rounds']} "
            f"| {r['round_s']:.3f} | {r['train_samples_s']:,.0f} | "
            f"{_of_ceiling(r['train_samples_s'], bracket)} | "
            f"{r['train_samples_s'] / ceiling_sps['large batch']:.0%} | {r['learner_s']:.3f} | "
            f"{_times(single, r['round_s'])} | {_times(loop, r['round_s'])} | {r['peak_mb']} | "
            f"{'-' if before is None else f'{before:.1f}'} |"
        )
    for arch, ceiling_sps in ceilings.items():
        for kind, label in CEILING_LABELS.items():
            cells = ["-", arch, label, "-", "-", "-", _rate_spread(ceiling_sps[kind])]
            lines.append("| " + " | ".join(cells + ["-"] * (len(cols) - len(cells))) + " |")
    return "\n".join(lines)


def _as_list(rates: float | list[float]) -> list[float]:
    return [rates] if isinstance(rates, int | float) else list(rates)


def _of_ceiling(samples_s: float, ceiling_sps: float | list[float]) -> str:
    """`samples_s` as a share of the mean of the ceiling's measurements, followed by the
    shares against the highest and the lowest of them where they differ ("84% (80%-88%)")."""
    rates = _as_list(ceiling_sps)
    share = f"{samples_s / statistics.fmean(rates):.0%}"
    if max(rates) == min(rates):
        return share
    return f"{share} ({samples_s / max(rates):.0%}-{samples_s / min(rates):.0%})"


def _rate_spread(ceiling_sps: float | list[float]) -> str:
    """The mean of a ceiling's measurements, with their range and count where there are more
    than one ("15,100 (13,694-16,474, 4 runs)")."""
    rates = _as_list(ceiling_sps)
    mean = f"{statistics.fmean(rates):,.0f}"
    if len(rates) == 1:
        return mean
    return f"{mean} ({min(rates):,.0f}-{max(rates):,.0f}, {len(rates)} runs)"


def _times(base: float | None, round_s: float) -> str:
    """How many times faster than `base` a round of `round_s` is ("-" without a base)."""
    return "-" if base is None else f"{base / round_s:.2f}x"


def workload_table(args: argparse.Namespace) -> str:
    """Run ``--workload mnist``: every algorithm, model and layout in a fresh process, each
    algorithm and model's layouts between two batch-32 ceilings of that model, then each
    model's large-batch ceiling, all in this invocation; return the table with its header."""
    from fedkd.spec import load_spec

    algorithms = args.algorithms or (["fedavg"] if args.quick else list(WORKLOAD_ALGORITHMS))
    models = args.models or (["cnn_small"] if args.quick else list(WORKLOAD_MODELS))
    rounds = args.rounds or (1 if args.quick else 3)
    steps = args.ceiling_steps or (100 if args.quick else 300)
    cohort_nodes = args.cohort_nodes or _ray_actors()
    mnist = args.mnist.resolve()
    # The spec names ../shared/data/mnist.npz; --mnist may point elsewhere.
    num_clients = load_spec(WORKLOAD_SPEC, [f'data.path="{mnist}"']).clients.num_clients
    rows: list[dict[str, Any]] = []
    batch32: dict[str, list[float]] = {arch: [] for arch in models}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_cohort_mnist_") as tmp:
        for algorithm in algorithms:
            for arch in models:
                # The batch-32 ceiling right before and right after this block of layouts:
                # the machine's speed drifts by more than the shares this table compares.
                bracket = [ceiling_processes(str(mnist), arch, batch=32, steps=steps)]
                block: list[dict[str, Any]] = []
                for option in args.layouts:
                    name = LAYOUT_OPTIONS[option]
                    layout, learner = LAYOUTS[name]
                    cfg = {
                        "workload": "mnist",
                        "algorithm": algorithm,
                        "arch": arch,
                        "mnist": str(mnist),
                        "clients": num_clients,
                        "layout": layout,
                        "learner": learner,
                        "cohort_nodes": cohort_nodes,
                        "warmup": 2,
                        "rounds": rounds,
                        "tail": 1,
                        "out_dir": str(Path(tmp) / f"run_{algorithm}_{arch}_{option}"),
                    }
                    res = _subprocess(cfg, trace_dir=Path(tmp))
                    row = summarise(name, cfg, res)
                    row.update(algorithm=algorithm, model=arch, layout_option=option)
                    block.append(row)
                    print(
                        f"  {algorithm} {arch} {name:<26} round {row['round_s']:.3f} s "
                        f"(run {res['total_s']:.0f} s)",
                        file=sys.stderr,
                        flush=True,
                    )
                bracket.append(ceiling_processes(str(mnist), arch, batch=32, steps=steps))
                print(
                    f"  {arch} batch-32 ceiling before / after: "
                    f"{bracket[0]:,.0f} / {bracket[1]:,.0f} samples/s",
                    file=sys.stderr,
                    flush=True,
                )
                rows += [row | {"ceiling_bracket": bracket} for row in block]
                batch32[arch] += bracket
    ceilings = {
        arch: {
            "batch 32": batch32[arch],
            "large batch": ceiling(str(mnist), batch=4096, steps=5, arch=arch),
        }
        for arch in models
    }
    header = [
        provenance(),
        f"bench_cohort --workload mnist: {WORKLOAD_SPEC.relative_to(REPO)} (full-size MNIST, "
        f"{num_clients} clients, Dirichlet 0.1) with one student architecture, 1 epoch at "
        "batch 32, the spec's server student and distillation (DS-FL), evaluation only in the "
        "last round. Flower + Ray simulation on the CPU, one Ray actor per CPU (1 torch "
        f"thread each); cohort layouts on {cohort_nodes} nodes. 2 warm-up rounds, {rounds} "
        "measured round(s), 1 last round not measured.",
        "train samples/s = the sampled clients' private training examples x epochs per round "
        "/ round s (DS-FL's distillation rows on the clients and its server student are in "
        "round s, not in the numerator); learner s = nodes' learner seconds per round / nodes "
        "running at once (the clients' work only: no server student); x vs 1/node, x vs "
        "cohort loop = speed-up of the round over that layout (same algorithm and model); "
        "s before round 1 = seconds from the driver process's start to the first training "
        "step in any node (bench_startup's tracer). Ceilings, in this invocation on the same "
        f"MNIST training rows: batch 32 = {_ray_actors()} single-thread processes at once, "
        f"{steps} steps each, samples/s summed, measured right before and right after each "
        "algorithm and model's layouts (of batch-32 ceiling = against the mean of the two, in "
        "brackets against the higher and the lower; the ceiling row: the mean of all, their "
        "range and count); large batch = one model at batch 4,096 on all "
        f"cores. Load average at the end: {os.getloadavg()[0]:.2f}. "
        f"Total {time.perf_counter() - started:.0f} s.",
    ]
    table = format_workload_table(rows, ceilings, header)
    phases = format_phase_table(rows, ["algorithm", "model", "layout"])
    return table + ("\n\n" + phases if phases else "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=None)
    parser.add_argument("--quick", action="store_true", help="10 and 100 clients, 1 round each")
    parser.add_argument("--rounds", type=int, default=None, help="measured rounds (default 3)")
    parser.add_argument(
        "--single-rounds-1000",
        type=int,
        default=1,
        help="measured rounds of one client per node at >= 1,000 clients (slow in Flower)",
    )
    parser.add_argument("--cohort-nodes", type=int, default=None, help="default: CPU count")
    parser.add_argument("--per-client", type=int, default=36, help="examples per client")
    parser.add_argument(
        "--per-round", type=int, default=None, help="clients sampled per round (default: all)"
    )
    parser.add_argument(
        "--layouts",
        nargs="+",
        choices=list(LAYOUT_OPTIONS),
        default=list(LAYOUT_OPTIONS),
        help="which layouts to run (one client per node is impractical at 10,000 clients)",
    )
    parser.add_argument(
        "--state-memory-mb",
        type=float,
        default=1024.0,
        help="resources.state_memory_mb: client states a node keeps in memory; the rest spill",
    )
    parser.add_argument(
        "--round-timeout",
        type=float,
        default=600.0,
        help="resources.round_timeout: on a loaded machine, 10,000 clients' nodes need longer",
    )
    parser.add_argument(
        "--side", type=int, default=28, choices=(7, 14, 28), help="28: full size; 14, 7: pooled"
    )
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--proxy-per-round", type=int, default=32)
    parser.add_argument("--test-per-client", type=int, default=32)
    parser.add_argument("--mnist", type=Path, default=DEFAULT_MNIST)
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    parser.add_argument(
        "--phases",
        action="store_true",
        help="only the per-phase breakdown of one node on full-size MNIST (loop vs vectorised)",
    )
    parser.add_argument("--no-phases", action="store_true", help="leave the breakdown out")
    parser.add_argument(
        "--eval-memory",
        action="store_true",
        help="only the peak memory of one node's evaluation (loop vs vectorised)",
    )
    parser.add_argument(
        "--phase-models",
        nargs="+",
        default=["cnn_small", "cnn_large"],
        help="for --phases and --eval-memory",
    )
    parser.add_argument(
        "--workload",
        choices=("iid", "mnist"),
        default="iid",
        help="iid: tiny IID clients at 10-1,000 clients (the layout table); mnist: "
        "simulations/mnist_dirichlet.toml beside the batch-32 and large-batch ceilings",
    )
    parser.add_argument(
        "--algorithms",
        nargs="+",
        choices=WORKLOAD_ALGORITHMS,
        default=None,
        help="--workload mnist (default: both; --quick: fedavg)",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=None,
        help="--workload mnist: student architectures (default: cnn_small cnn_large; "
        "--quick: cnn_small)",
    )
    parser.add_argument(
        "--ceiling-steps",
        type=int,
        default=None,
        help="--workload mnist: timed steps of each batch-32 ceiling process (default 300; "
        "--quick: 100)",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one config (JSON)
    args = parser.parse_args(argv)

    if args.one:
        if os.environ.get("FEDKD_STARTUP_TRACE"):  # _subprocess(trace_dir=...): time the start
            import sitecustomize

            sitecustomize.become_driver()
        cfg = json.loads(args.one)
        result = phase_one(cfg) if cfg.get("phase") else run_one(cfg)
        print("BENCH_RESULT " + json.dumps(result), flush=True)
        return
    if args.phases or args.eval_memory:
        if args.eval_memory:
            table = eval_memory_table(args.phase_models)
        else:
            table = phase_table(args.phase_models, args.quick)
        print(table)
        if args.out:
            args.out.write_text(table + "\n")
        return
    if args.workload == "mnist":
        if not args.mnist.is_file():
            print(
                f"error: --workload mnist needs full-size MNIST at {args.mnist}; "
                "pass its .npz with --mnist PATH",
                file=sys.stderr,
            )
            raise SystemExit(2)
        table = workload_table(args)
        print(table)
        if args.out:
            args.out.write_text(table + "\n")
        return

    clients = args.clients or ([10, 100] if args.quick else [10, 100, 1000])
    rounds = args.rounds or (1 if args.quick else 3)
    cohort_nodes = args.cohort_nodes or _ray_actors()
    results: list[dict[str, Any]] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_cohort_") as tmp:
        source = ""
        for n in clients:
            npz = Path(tmp) / f"data_{n}.npz"
            source = build_npz(npz, n, args.per_client, args.side, args.mnist)
            for name in (LAYOUT_OPTIONS[o] for o in args.layouts):
                layout, learner = LAYOUTS[name]
                measured = rounds
                if layout == "single" and n >= 1000:
                    measured = min(rounds, args.single_rounds_1000)
                cfg = {
                    "clients": n,
                    "layout": layout,
                    "learner": learner,
                    "cohort_nodes": cohort_nodes,
                    "npz": str(npz),
                    "seed": 0,
                    "warmup": 2,
                    "rounds": measured,
                    "tail": 1,
                    "epochs": args.epochs,
                    "proxy_per_round": args.proxy_per_round,
                    "test_per_client": args.test_per_client,
                    "per_round": args.per_round or n,
                    "state_memory_mb": args.state_memory_mb,
                    "round_timeout": args.round_timeout,
                    "out_dir": str(Path(tmp) / f"run_{n}_{layout}_{learner}"),
                }
                res = _subprocess(cfg)
                row = summarise(name, cfg, res)
                results.append(row)
                print(
                    f"  {n:>5} clients, {name:<26} round {row['round_s']:.3f} s "
                    f"(run {res['total_s']:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
        ceiling_sps = ceiling(str(Path(tmp) / f"data_{clients[-1]}.npz"))
    load = os.getloadavg()[0]
    header = [
        f"bench_cohort: DS-FL, cnn_small, {source}; {args.per_client} examples per client "
        f"(90% private training, batch 32, {args.epochs} epoch(s)), "
        f"{args.proxy_per_round} proxy examples distilled per client per round, "
        f"{args.test_per_client} test examples evaluated per client per round; "
        f"{args.per_round or 'all'} clients sampled per round; client states in node memory "
        f"up to {args.state_memory_mb:g} MiB per node (resources.state_memory_mb), the rest "
        "spilled to a file per node.",
        f"Flower + Ray simulation, {_ray_actors()} CPUs (one Ray actor each, 1 torch thread), "
        f"cohort layouts on {cohort_nodes} nodes; 2 warm-up rounds, the measured rounds "
        f"(one client per node at >= 1,000 clients: {args.single_rounds_1000}), 1 last round "
        "not measured (it also holds the final digest exchange). "
        f"Load average at the end: {load:.2f}. Total {time.perf_counter() - started:.0f} s.",
        "learner s = nodes' learner seconds per round / nodes running at once; overhead s = "
        "round s - learner s; overhead (critical path) s = round s - max(slowest node, learner "
        "s) per exchange; x vs 1/node = speed-up of the round over one client per node.",
    ]
    table = format_table(results, ceiling_sps, header)
    phases = format_phase_table(results, ["clients", "layout"])
    if phases:
        table += "\n\n" + phases
    if not args.no_phases:
        table += "\n\n" + phase_table(args.phase_models, args.quick)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


def _subprocess(cfg: dict[str, Any], trace_dir: Path | None = None) -> dict[str, Any]:
    """One configuration in a fresh interpreter: a fresh Ray instance, no state carried over.

    With `trace_dir`, every process of the run loads `bench_startup`'s milestone tracer, and
    the result gains ``before_round1_s`` (`first_training_step_s`).
    """
    env = None
    if trace_dir is not None:
        from bench_startup import TRACER

        trace = trace_dir / "trace.txt"
        trace.unlink(missing_ok=True)
        (trace_dir / "sitecustomize.py").write_text(TRACER)
        env = dict(os.environ)
        path = [str(trace_dir), str(REPO), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
        env["FEDKD_STARTUP_TRACE"] = str(trace)
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(cfg)],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
        env=env,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            result = json.loads(line[len("BENCH_RESULT ") :])
            if trace_dir is not None:
                result["before_round1_s"] = first_training_step_s(trace_dir / "trace.txt")
            return result
    raise RuntimeError(
        f"benchmark run {cfg.get('clients')} / {cfg.get('layout')} / {cfg['learner']} failed:\n"
        + proc.stderr[-3000:]
    )


if __name__ == "__main__":
    main()
