"""Every random stream of a run has a seed of its own (fedkd.learner.loop.derive_seed).

A run derives each stream's seed from integer keys. Two call sites that happen to build the same
keys draw the same stream: the data-free generator's keys were once client 9's, so the
generator's latents were client 9's private batch order. These tests record every seed a small
run derives, with the call site that derived it, and check that no seed serves two call sites.
"""

from __future__ import annotations

import inspect
import sys
from collections import defaultdict
from pathlib import Path

import pytest

import fedkd.learner.loop as loop
from fedkd.apps.client_app import make_client_app
from fedkd.apps.server_app import run_rounds
from fedkd.results import RunRecorder
from fedkd.spec import load_spec
from tests.inprocess import InProcessGrid

# Helpers through which a call site derives its seed: the site is their caller.
_HELPERS = {"derive_seed", "seeded_generator", "init_student", "recording"}
# Sites that share a seed on purpose or harmlessly, as (site, site) pairs sorted by name.
_ALLOWED = {
    # The proxy sample's numpy Generator (PCG64, seeded through a SeedSequence) and client 4's
    # torch generator (MT19937, seeded with the integer) share (seed, round, 4, 1): the two
    # generators turn one seed into unrelated streams. Renumbering either stream would change
    # every run's numbers.
    ("base.py:_sample_proxy", "cohort.py:train_private"),
    ("base.py:_sample_proxy", "cohort.py:train_mutual"),  # the same, under mutual learning
}

# Ten clients, so that a key with a phase where a client id belongs (phases go up to 10) meets
# a real client's keys.
BASE = [
    "rounds=2",
    "clients.num_clients=10",
    "data.proxy_size=100",
    "train.epochs=1",
    "distill.epochs=1",
    "server.epochs=1",
    "distill.proxy_per_round=40",
]


def seeds_by_site(monkeypatch, items: list[str], run_dir: Path) -> dict[int, set[str]]:
    """Run `items` in process and return, per derived seed, the call sites that derived it."""
    original = loop.derive_seed
    sites: dict[int, set[str]] = defaultdict(set)

    def recording(*keys: int) -> int:
        frame = inspect.currentframe().f_back
        while frame.f_code.co_name in _HELPERS:
            frame = frame.f_back
        seed = original(*keys)
        sites[seed].add(f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}")
        return seed

    # Modules hold their own reference to derive_seed (`from ... import derive_seed`).
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] in ("fedkd", "strategies"):
            if getattr(module, "derive_seed", None) is original:
                monkeypatch.setattr(module, "derive_seed", recording)
    spec = load_spec(None, [*BASE, *items])
    run_rounds(
        InProcessGrid(make_client_app(spec), spec.num_nodes), spec, RunRecorder(run_dir, spec)
    )
    return sites


@pytest.mark.parametrize(
    "items",
    [
        # The generator proxy: the server's generator beside ten clients' streams.
        [
            "algorithm.name=feddf",
            "proxy.source=synthetic",
            "proxy.synthetic=generator",
            "proxy.size=60",
            "proxy.generator_steps=2",
        ],
        # Partner models, the private anchor and the fault draws.
        [
            "algorithm.name=feddf",
            "algorithm.mutual_weight=1",
            "distill.private_weight=1",
            "faults.nan_rate=0.2",
        ],
        # A histogram teacher and the server student's own streams.
        ["algorithm.name=dsfl"],
    ],
    ids=["generator", "mutual-anchor-faults", "dsfl"],
)
def test_no_seed_serves_two_call_sites(tmp_path, monkeypatch, items):
    sites = seeds_by_site(monkeypatch, items, tmp_path / "run")
    assert len(sites) > 20  # the run derived its streams through the recorder
    shared = {tuple(sorted(s)) for s in sites.values() if len(s) > 1} - _ALLOWED
    assert shared == set()
