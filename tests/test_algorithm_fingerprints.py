"""Every algorithm's metrics, number for number, against golden rows (timings excluded).

A tiny in-process run of each algorithm (partial participation where it has clients) and of a
few privacy specs is compared with the rows in ``tests/data/algorithm_fingerprints.json``. A
refactoring of the algorithms (their modules, parameters, registry, assembly) must leave every
number identical; a change that is meant to change numbers regenerates the file deliberately::

    FEDKD_REGEN_FINGERPRINTS=1 python -m pytest -q tests/test_algorithm_fingerprints.py

and says why in its commit. The golden rows come from the loop learner on CPU; another CPU or
torch build may round differently: floats are compared to 1e-6 relative (`_comparable`), and
a larger difference is regenerated there from a known-good commit before comparing.

Only the fields the golden rows hold are compared: fields added to the results contract later
do not break the comparison, a changed or missing one does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fedkd.apps.client_app import make_client_app
from fedkd.apps.server_app import run_rounds
from fedkd.results import RunRecorder
from fedkd.spec import load_spec
from tests.inprocess import InProcessGrid
from tests.test_engine import TIMINGS  # measurements of the machine, not of the run

GOLDEN = Path(__file__).parent / "data" / "algorithm_fingerprints.json"
REGENERATE = os.environ.get("FEDKD_REGEN_FINGERPRINTS") == "1"

# The quickstart (mixed cnn_small/mlp students), shrunk; 3 of 5 clients take part each round.
TINY = [
    "rounds=2",
    "clients.num_clients=5",
    "clients.fraction=0.6",
    "clients.min_clients=2",
    "data.proxy_size=150",
    "train.epochs=1",
    "distill.epochs=1",
    "server.epochs=1",
]

CASES: dict[str, list[str]] = {
    "dsfl": ["algorithm.name=dsfl"],
    "fedmd": ["algorithm.name=fedmd", "distill.proxy_per_round=100"],
    "feddf": ["algorithm.name=feddf", "algorithm.client_teacher=server_student"],
    "fd": ["algorithm.name=fd", "algorithm.fd_weight=0.5"],
    "fedavg": ["algorithm.name=fedavg", "clients.students=cnn_small"],
    "local_only": ["algorithm.name=local_only"],
    "centralized": ["algorithm.name=centralized"],
    "pate": [
        "algorithm.name=pate",
        "algorithm.teachers_per_client=2",
        "algorithm.pate_threshold=3",
        "algorithm.pate_sigma_threshold=1",
        "algorithm.pate_sigma=1",
        "algorithm.self_training_confidence=0.5",
        "privacy.noise_rng=seeded",
    ],
    # DP-SGD in local training and noisy label histograms for a class-weighted teacher.
    "dsfl_dpsgd_histogram": [
        "algorithm.name=dsfl",
        "algorithm.teacher=class_weighted",
        "algorithm.match_class_prior=true",
        "privacy.dpsgd=true",
        "privacy.noise_multiplier=1.0",
        "privacy.histogram_noise=20",
        "privacy.noise_rng=seeded",
    ],
    # The client-level Gaussian release of the teacher (no DP-SGD: epsilon is infinite).
    "fedmd_release": [
        "algorithm.name=fedmd",
        "privacy.release_noise=1.0",
        "privacy.release_clip=1.0",
        "privacy.noise_rng=seeded",
    ],
    # A robust teacher and the confident-labels server student with self-training.
    "dsfl_median_confident": [
        "algorithm.name=dsfl",
        "algorithm.teacher=median",
        "server.confident_fraction=0.3",
        "algorithm.self_training_confidence=0.5",
        "algorithm.self_training_iterations=2",
    ],
}


def run_case(tmp_path: Path, overrides: list[str]) -> list[dict]:
    spec = load_spec(None, TINY + overrides)
    grid = InProcessGrid(make_client_app(spec), spec.num_nodes)
    run_rounds(grid, spec, RunRecorder(tmp_path / "run", spec))
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in lines]


def _golden() -> dict[str, list[dict]]:
    return json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}


@pytest.mark.parametrize("case", list(CASES))
def test_metrics_match_the_golden_fingerprint(tmp_path, case):
    rows = run_case(tmp_path, CASES[case])
    assert len(rows) == 2
    if REGENERATE:
        golden = _golden()
        golden[case] = rows
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(dict(sorted(golden.items())), indent=1) + "\n")
        return
    expected = _golden().get(case)
    assert expected is not None, f"no golden rows for '{case}': regenerate (see module doc)"
    assert len(rows) == len(expected)
    for got, want in zip(rows, expected, strict=True):
        assert {k: _comparable(got.get(k, "<missing>"), v) for k, v in want.items()} == want


def _comparable(got, want):
    """`got` as `pytest.approx` to 1e-6 relative where both are floats, else as is; inside
    dicts (a row's per-client ``epsilon``) float by float.

    Float32 losses summed on another CPU round differently (train_loss_mean moved by about 1e-8
    relative between an AMD EPYC and an Intel Xeon, every other field identical; the privacy
    accountant's epsilons by about 1e-11 relative on a Zen 3 VM with torch's AVX2 kernels); a
    change to the algorithms moves them by far more.
    """
    if isinstance(got, float) and isinstance(want, float):
        return pytest.approx(got, rel=1e-6, abs=1e-12)
    if isinstance(got, dict) and isinstance(want, dict) and got.keys() == want.keys():
        return {k: _comparable(got[k], want[k]) for k in got}
    return got
