"""Same spec and seed on the same machine: the same metrics, in separate processes.

Each slow test runs ``fedkd run`` (or ``fedkd sweep``) in two fresh processes, each with its
own Ray runtime, and compares every ``metrics.jsonl`` field but the timings. The fast test
checks that the server process computes with the spec's torch thread count, whatever the
caller left set: a float sum split over another number of threads rounds differently.
"""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.test_engine import TIMINGS, run_inprocess

# Digits, 4 clients, 2 rounds: each run takes under a minute, Ray's start included.
TINY = {
    "clients.num_clients": "4",
    "rounds": "2",
    "data.proxy_size": "200",
    "train.epochs": "2",
    "distill.epochs": "1",
    "server.epochs": "4",
}
# (a): DP FedDF, pooled-likelihood teacher with prior matching, the server student on the
# teacher's surest labels with self-training and shifted inputs, two clients per node.
DP_FEDDF = {
    **TINY,
    "clients.clients_per_node": "2",
    "algorithm.name": '"feddf"',
    "algorithm.teacher": '"pooled_likelihood"',
    "algorithm.match_class_prior": "true",
    "algorithm.held_class_count": "20",
    "algorithm.self_training_confidence": "0.9",
    "server.confident_fraction": "0.5",
    "server.augment_shift": "1",
    "privacy.dpsgd": "true",
    "privacy.noise_multiplier": "1.0",
    "privacy.histogram_noise": "5.0",
}


def _overrides(settings: dict[str, str]) -> list[str]:
    return [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]


def _strip(rows):
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in rows]


def _comparable(run_dir):
    return _strip(
        [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    )


def _fedkd(*args, env=None, timeout=900):
    proc = subprocess.run(
        [sys.executable, "-m", "fedkd.run.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def fedkd_run(out, settings, env=None):
    """`fedkd run` of the default spec with `settings` in a new process; comparable rows."""
    _fedkd("run", *_overrides(settings), "--out", str(out), "--quiet", env=env)
    return _comparable(out)


def test_the_server_process_computes_with_the_specs_thread_count(tmp_path):
    # The centralized bound trains on the server alone: no ClientApp sets threads for it.
    central = ["algorithm.name=centralized", "server.epochs=1"]
    try:
        torch.set_num_threads(2)  # what a caller (or OMP_NUM_THREADS) may have left set
        _, _, two, _ = run_inprocess(tmp_path, central, name="two")
        assert torch.get_num_threads() == 1  # resources.num_cpus = 1
        run_inprocess(tmp_path, [*central, "resources.num_threads=3"], name="three")
        assert torch.get_num_threads() == 3
        torch.set_num_threads(1)
        _, _, one, _ = run_inprocess(tmp_path, central, name="one")
    finally:
        torch.set_num_threads(1)
    assert _strip(two) == _strip(one)


def test_no_result_depends_on_the_global_random_state(tmp_path):
    # A long-lived Ray worker's global RNGs hold whatever its earlier work left: Opacus's
    # sampling and noise, inits, shifts and self-training must draw from seeded generators.
    settings = [f"{k}={v}" for k, v in DP_FEDDF.items()]
    rows = []
    for state in (0, 1):
        torch.manual_seed(state)
        np.random.seed(state)
        random.seed(state)
        rows.append(_strip(run_inprocess(tmp_path, settings, name=f"state{state}")[2]))
    assert rows[0] == rows[1]


@pytest.fixture(scope="module")
def dp_feddf_alone(tmp_path_factory):
    """Run (a) once, in its own process with one OpenMP thread."""
    out = tmp_path_factory.mktemp("alone") / "run"
    return out, fedkd_run(out, DP_FEDDF, env={"OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_dp_feddf_with_every_server_option_repeats_in_another_process(tmp_path, dp_feddf_alone):
    _, first = dp_feddf_alone
    # Another process, whose environment asks for another thread count.
    again = fedkd_run(tmp_path / "again", DP_FEDDF, env={"OMP_NUM_THREADS": "2"})
    assert first[-1]["epsilon_max"] > 0 and first[-1]["server_labels"] > 0
    assert again == first


SWEEP = """
extends = "{base}"
[sweep]
grid = {{ seed = [0, 1] }}
"""


@pytest.mark.slow
def test_a_sweep_point_run_two_at_a_time_equals_the_point_run_alone(tmp_path, dp_feddf_alone):
    from fedkd.spec import builtin_spec_path

    _, alone = dp_feddf_alone
    spec = tmp_path / "sweep.toml"
    spec.write_text(SWEEP.format(base=builtin_spec_path().as_posix()))
    out = tmp_path / "sweep"
    _fedkd("sweep", str(spec), "--parallel", "2", "--out", str(out), *_overrides(DP_FEDDF))
    assert _comparable(out / "seed=0") == alone
    assert _comparable(out / "seed=1") != alone  # the seed does reach the run


@pytest.mark.slow
def test_pate_repeats_in_another_process(tmp_path):
    pate = {**TINY, "algorithm.name": '"pate"', "algorithm.teachers_per_client": "2"}
    first = fedkd_run(tmp_path / "first", pate)
    assert first[-1]["epsilon_max"] > 0
    assert fedkd_run(tmp_path / "again", pate) == first


@pytest.mark.slow
def test_one_client_per_node_equals_cohort_nodes_with_client_sampling(tmp_path):
    sampled = {
        **TINY,
        "clients.num_clients": "6",
        "clients.fraction": "0.5",
        "clients.min_clients": "2",
        "privacy.dpsgd": "true",
        "privacy.noise_multiplier": "1.0",
    }
    single = fedkd_run(tmp_path / "single", {**sampled, "clients.clients_per_node": "1"})
    cohort = fedkd_run(tmp_path / "cohort", {**sampled, "clients.clients_per_node": "3"})
    assert [r["clients_ok"] for r in single] == [3, 3]  # half of the 6 clients each round
    assert cohort == single


def test_the_vectorised_learner_agrees_across_node_layouts_within_rounding(tmp_path):
    # Clients stacked K at a time, batches padded to the widest: torch's batched kernels and
    # sums round differently for another K, so the last digits of a loss may move (measured:
    # train_loss_mean 1.92654296025 vs 1.92654296465). Exact equality is the loop learner's.
    sampled = ["resources.learner=vectorised", "clients.num_clients=6", "clients.fraction=0.5"]
    _, _, single, _ = run_inprocess(tmp_path, [*sampled, "clients.clients_per_node=1"], name="1")
    _, _, cohort, _ = run_inprocess(tmp_path, [*sampled, "clients.clients_per_node=3"], name="3")
    single, cohort = _strip(single), _strip(cohort)
    assert [sorted(r) for r in single] == [sorted(r) for r in cohort]
    for one, three in zip(single, cohort, strict=True):
        for key, value in one.items():
            if isinstance(value, float):
                assert three[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
            else:
                assert three[key] == value, key
