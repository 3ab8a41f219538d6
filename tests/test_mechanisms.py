"""The privacy mechanisms as objects: each holds its parameters, clips, adds noise and says
the ledger event it costs; the assembly builds them from the spec and strategies use them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fedkd.assembly import build_strategy, federated_data
from fedkd.learner.cohort import ClientResult
from fedkd.privacy.gaussian_release import (
    GaussianRelease,
    gaussian_release_event,
    private_mean_teacher,
)
from fedkd.privacy.gnmax import GNMax
from fedkd.privacy.label_histogram import LabelHistogramRelease, label_histogram_event
from fedkd.privacy.ledger import GaussianReleaseEvent
from fedkd.privacy.pate import confident_gnmax, gnmax_aggregate, pate_worst_case_event
from fedkd.spec import load_spec
from tests.test_engine import run_inprocess
from tests.test_privacy_claims import HISTOGRAM
from tests.test_privacy_run import DP, fresh_epsilon


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_the_gaussian_release_clips_adds_noise_and_names_its_event():
    probs = torch.softmax(torch.randn(3, 5, 4, generator=_gen(1)) * 3, dim=-1)
    release = GaussianRelease(clip_norm=0.5, noise_multiplier=2.0)
    assert (release.clip(probs).flatten(1).norm(dim=1) <= 0.5 + 1e-6).all()
    ours, theirs = (
        release.mean_teacher(probs, _gen()),
        private_mean_teacher(probs, 0.5, 2.0, _gen()),
    )
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=0, atol=0)
    # Per example, the sensitivity is sqrt(2) clip; per client, clip.
    assert release.event(3) == GaussianReleaseEvent(2.0 / math.sqrt(2), count=1, round=3)
    client = GaussianRelease(clip_norm=0.5, noise_multiplier=2.0, unit="client")
    assert client.event(3, count=4) == GaussianReleaseEvent(2.0, count=4, round=3)
    assert release.planned_events(7) == [gaussian_release_event(2.0, 7)]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"clip_norm": 0.0, "noise_multiplier": 1.0},
        {"clip_norm": 1.0, "noise_multiplier": -1.0},
        {"clip_norm": 1.0, "noise_multiplier": math.inf},
        {"clip_norm": 1.0, "noise_multiplier": 1.0, "unit": "round"},
    ],
)
def test_a_gaussian_release_with_bad_parameters_is_refused(kwargs):
    with pytest.raises(ValueError):
        GaussianRelease(**kwargs)


def test_the_label_histogram_release_is_charged_once_per_distinct_release():
    mechanism = LabelHistogramRelease(noise_std=7.0)
    labels = np.array([0, 1, 1, 3])
    sent = mechanism.release(labels, 4, _gen(5))
    assert sent.shape == (4,) and not np.array_equal(sent, [1, 2, 0, 1])
    assert mechanism.charges(1, sent, None) == [label_histogram_event(7.0, 1)]
    assert mechanism.charges(2, sent, sent.copy()) == []  # resent: post-processing
    assert mechanism.charges(3, sent + 1, sent) == [label_histogram_event(7.0, 3)]
    exact = LabelHistogramRelease(noise_std=0.0)
    np.testing.assert_array_equal(exact.release(labels, 4, _gen()), [1, 2, 0, 1])
    assert exact.charges(1, sent, None) == []
    with pytest.raises(ValueError, match="noise_std"):
        LabelHistogramRelease(noise_std=-1.0)


def test_gnmax_releases_labels_and_plans_the_data_independent_worst_case():
    votes = torch.tensor([[9.0, 1.0, 0.0], [4.0, 3.0, 3.0], [0.0, 0.0, 10.0]])
    confident = GNMax(sigma=2.0, threshold=8.0, sigma_threshold=1.5)
    labels, answered = confident.release(votes, _gen(2))
    want_labels, want_answered = confident_gnmax(votes, 8.0, 1.5, 2.0, _gen(2))
    assert torch.equal(labels, want_labels) and torch.equal(answered, want_answered)
    event = confident.event(votes, answered, 4)
    planned = confident.planned_events(3, 4)
    assert planned == [pate_worst_case_event(3, 1.5, 2.0, round=4)]
    assert event.data_independent_rdp == planned[0].data_independent_rdp
    plain = GNMax(sigma=2.0)
    labels, answered = plain.release(votes, _gen(2))
    assert torch.equal(labels, gnmax_aggregate(votes, 2.0, _gen(2))) and answered.all()
    assert plain.event(votes, answered, 1).answered == 3
    with pytest.raises(ValueError, match="sigma"):
        GNMax(sigma=0.0)


def test_the_assembly_gives_strategies_the_mechanisms_the_spec_asks_for():
    release = load_spec(None, ["privacy.release_noise=2", "privacy.release_clip=0.5"])
    strategy = build_strategy(release, federated_data(release))
    assert strategy.release == GaussianRelease(clip_norm=0.5, noise_multiplier=2.0)
    assert strategy.label_histograms is None
    assert strategy.planned_release_events(2) == strategy.release.planned_events(2)
    histograms = load_spec(None, ["algorithm.teacher=class_weighted", "privacy.histogram_noise=9"])
    strategy = build_strategy(histograms, federated_data(histograms))
    assert strategy.release is None and strategy.planned_release_events(1) == []
    assert strategy.label_histograms == LabelHistogramRelease(noise_std=9.0)
    pate = load_spec(
        None,
        [
            "algorithm.name=pate",
            "algorithm.pate_threshold=30",
            "algorithm.pate_sigma=5",
            "algorithm.pate_sigma_threshold=20",
        ],
    )
    strategy = build_strategy(pate, federated_data(pate))
    assert strategy.gnmax == GNMax(sigma=5.0, threshold=30.0, sigma_threshold=20.0)


def test_a_strategy_charges_what_the_mechanism_it_is_given_says():
    """The strategy asks its mechanism for the event: a client-level release is charged with
    the client-level multiplier, without the strategy knowing about units."""
    spec = load_spec(None, ["privacy.release_noise=2", "server.student=", "rounds=1"])
    strategy = build_strategy(spec, federated_data(spec))
    strategy.release = GaussianRelease(clip_norm=1.0, noise_multiplier=2.0, unit="client")
    plan = strategy.plan_local(1)
    logits = torch.randn(2, len(plan["proxy_idx"]), 10, generator=_gen(3)).numpy()
    updates = {
        cid: ClientResult(arrays={"logits": logits[i]}, metrics={"num_examples": 10.0})
        for i, cid in enumerate((4, 6))
    }
    strategy.aggregate(1, updates)
    charged = GaussianReleaseEvent(noise_multiplier=2.0, count=1, round=1)
    assert strategy.release_events(1) == {4: [charged], 6: [charged]}
    assert strategy.planned_release_events(2) == [
        GaussianReleaseEvent(noise_multiplier=2.0, count=1, round=2)
    ]


def test_the_budget_plans_a_clients_histogram_release_before_its_first_round(tmp_path):
    """A client's first round costs DP-SGD and its label histogram's release; the plan used to
    hold DP-SGD only, so a client whose histogram took it over the budget still trained."""
    fixed = [*DP, "privacy.noise_multiplier=2.0", "rounds=1", *HISTOGRAM]
    _, _, free, _ = run_inprocess(tmp_path, fixed, name="free")
    ledgers = json.loads((tmp_path / "free" / "ledgers.json").read_text())["ledgers"]
    first = free[0]["epsilon"]
    dp_only = {
        int(c): fresh_epsilon([e for e in ledger["events"] if e["kind"] == "dp_sgd"], 1e-5)
        for c, ledger in ledgers.items()
    }
    # A budget between one client's DP-SGD cost and its DP-SGD + histogram cost.
    client = sorted(first, key=first.get)[len(first) // 2]
    budget = (dp_only[int(client)] + first[client]) / 2
    over = {c for c, e in first.items() if e > budget}
    _, _, rows, _ = run_inprocess(tmp_path, [*fixed, f"privacy.budget_epsilon={budget}"])
    assert client not in rows[0]["epsilon"] or rows[0]["epsilon"][client] == 0
    assert rows[0]["clients_ok"] == len(first) - len(over)
    assert all(e <= budget for e in rows[0]["epsilon"].values())
