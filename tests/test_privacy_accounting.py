"""Privacy accounting core: reference values, ledger composition, budgets, PATE, releases."""

from __future__ import annotations

import json
import math

import dp_accounting as dpa
import numpy as np
import pytest
import torch
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from dp_accounting.rdp import compute_epsilon as rdp_to_epsilon

from fedkd.privacy import (
    RDP_ORDERS,
    DpSgdEvent,
    GaussianReleaseEvent,
    PrivacyLedger,
    calibrate_noise_multiplier,
    clip_l2,
    compute_epsilon,
    confident_gnmax,
    epsilon_after,
    event_from_dict,
    gaussian_release_event,
    gnmax_aggregate,
    label_histogram_event,
    log_q_gnmax,
    pate_query_event,
    pate_worst_case_event,
    private_mean_teacher,
    private_sum_of_probabilities,
    rdp_gnmax_data_dependent,
    rdp_gnmax_data_independent,
    released_label_histogram,
    votes_from_predictions,
    would_exceed_budget,
)

DELTA = 1e-5
CONSENSUS = np.array([240, 2, 2, 2, 2, 2, 0, 0, 0, 0], dtype=float)  # 250 teachers
SPLIT = np.array([130, 120, 0, 0, 0, 0, 0, 0, 0, 0], dtype=float)


def _direct_pld(event: dpa.DpEvent, interval: float = 1e-4) -> float:
    acc = PLDAccountant(value_discretization_interval=interval)
    acc.compose(event)
    return acc.get_epsilon(DELTA)


def _direct_rdp(event: dpa.DpEvent) -> float:
    acc = RdpAccountant()  # dp-accounting's own default orders: independent of ours
    acc.compose(event)
    return acc.get_epsilon(DELTA)


# ------------------------------------------------------------------------------ accountant


def _reference_ledger() -> PrivacyLedger:
    ledger = PrivacyLedger(client_id=0, delta=DELTA)
    ledger.add(DpSgdEvent(sample_rate=0.01, noise_multiplier=1.0, steps=1000, round=1))
    for r in range(5):
        ledger.add(GaussianReleaseEvent(noise_multiplier=20.0, count=1, round=r + 1))
    return ledger


def test_reference_composition_rdp_and_pld():
    report = compute_epsilon(_reference_ledger())
    assert report.epsilon_rdp == pytest.approx(2.150, rel=0.01)
    assert report.epsilon_pld == pytest.approx(1.880, rel=0.01)
    assert report.method == "pld" and report.epsilon == report.epsilon_pld
    # Our PLD discretisation is within 0.1% of a 10x finer dp-accounting computation.
    fine = _direct_pld(_reference_ledger().dp_events(), interval=1e-4)
    assert report.epsilon_pld == pytest.approx(fine, rel=1e-3)
    assert report.epsilon_pld >= fine  # pessimistic discretisation: never under-reports


def test_unconverged_rdp_orders_are_skipped_quietly(caplog):
    # A 27-example DP-SGD client of the privacy sweep at epsilon 0.5: q = 0.5, sigma 22.6.
    # dp-accounting's series does not converge at some fractional orders; it leaves them out
    # (infinite RDP) and would warn once per order. The epsilon uses the other orders.
    ledger = PrivacyLedger(0, [DpSgdEvent(sample_rate=0.5, noise_multiplier=22.637642, steps=20)])
    with caplog.at_level("WARNING"):
        report = compute_epsilon(ledger, 1e-5)
    assert not [r for r in caplog.records if "failed to converge" in r.getMessage()]
    acc = RdpAccountant(list(RDP_ORDERS))
    acc.compose(
        dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(0.5, dpa.GaussianDpEvent(22.637642)), 20)
    )
    assert np.isinf(acc.rdp).any() and np.isfinite(acc.rdp).any()
    assert report.epsilon_rdp == pytest.approx(acc.get_epsilon(1e-5))
    assert 0 < report.epsilon <= report.epsilon_rdp


def test_empty_ledger_is_zero():
    report = compute_epsilon(PrivacyLedger(client_id=3))
    assert report.epsilon == 0.0 and report.epsilon_rdp == 0.0


def test_epsilon_grows_by_round_and_equals_one_composition():
    ledger = PrivacyLedger(client_id=1, delta=DELTA)
    eps = []
    for r in range(1, 6):
        ledger.add(DpSgdEvent(sample_rate=0.02, noise_multiplier=1.1, steps=50, round=r))
        ledger.add(gaussian_release_event(noise_multiplier=5.0, round=r))
        eps.append(compute_epsilon(ledger).epsilon)
    assert all(b > a for a, b in zip(eps, eps[1:], strict=False)), eps
    # The same events composed in one go by dp-accounting, event by event.
    event = ledger.dp_events()
    assert isinstance(event, dpa.ComposedDpEvent) and len(event.events) == 10
    report = compute_epsilon(ledger)
    assert report.epsilon_pld == pytest.approx(_direct_pld(event, interval=1e-3), rel=0.01)
    assert report.epsilon_rdp == pytest.approx(_direct_rdp(event), rel=0.01)
    # epsilon_after does not modify the ledger and matches appending the events.
    extra = [DpSgdEvent(0.02, 1.1, 50, 6)]
    after = epsilon_after(ledger, extra).epsilon
    assert len(ledger.events) == 10
    ledger.add(extra[0])
    assert compute_epsilon(ledger).epsilon == after


def test_json_round_trip_keeps_epsilon():
    ledger = _reference_ledger()
    ledger.budget_epsilon = 4.0
    text = ledger.to_json()
    json.loads(text)  # valid JSON
    again = PrivacyLedger.from_json(text)
    assert again == ledger
    assert compute_epsilon(again) == compute_epsilon(ledger)

    # With a PATE event too (tuples of floats survive JSON exactly).
    ev = pate_query_event(np.stack([CONSENSUS, SPLIT]), np.array([True, False]), 150.0, 40.0)
    ledger.add(ev)
    again = PrivacyLedger.from_dict(json.loads(ledger.to_json()))
    assert again.events[-1] == ev
    assert compute_epsilon(again).epsilon == compute_epsilon(ledger).epsilon


def test_budget_stops_exactly_at_the_crossing_round():
    budget, per_round = 2.0, dict(sample_rate=0.02, noise_multiplier=1.0, steps=100)
    # Independent: the first round whose cumulative epsilon (dp-accounting, one event for
    # all steps so far) exceeds the budget.
    direct = [
        _direct_pld(
            dpa.SelfComposedDpEvent(
                dpa.PoissonSampledDpEvent(0.02, dpa.GaussianDpEvent(1.0)), 100 * r
            ),
            interval=1e-3,
        )
        for r in range(1, 16)
    ]
    crossing = next(r for r, e in enumerate(direct, start=1) if e > budget)
    assert 2 < crossing < 15
    # Margins well above accountant differences, so "exactly" is meaningful.
    assert direct[crossing - 1] > 1.02 * budget and direct[crossing - 2] < 0.98 * budget

    ledger = PrivacyLedger(client_id=7, budget_epsilon=budget, delta=DELTA)
    stopped_at = None
    for r in range(1, 16):
        event = DpSgdEvent(round=r, **per_round)
        if would_exceed_budget(ledger, [event]):
            stopped_at = r
            break
        ledger.add(event)
    assert stopped_at == crossing
    assert compute_epsilon(ledger).epsilon <= budget
    # No budget: never exceeded.
    assert not would_exceed_budget(PrivacyLedger(client_id=7), [DpSgdEvent(1.0, 0.1, 10**4)])


def test_ledger_validation():
    with pytest.raises(ValueError, match="sample_rate"):
        DpSgdEvent(sample_rate=1.5, noise_multiplier=1.0, steps=1)
    with pytest.raises(ValueError, match="noise_multiplier"):
        GaussianReleaseEvent(noise_multiplier=float("nan"))
    with pytest.raises(ValueError, match="delta"):
        PrivacyLedger(client_id=0, delta=0.0)
    with pytest.raises(ValueError, match="unknown privacy event kind"):
        event_from_dict({"kind": "laplace"})
    with pytest.raises(TypeError):
        PrivacyLedger(client_id=0).add("not an event")
    # Noise 0 is non-private: infinite epsilon, not a crash.
    assert math.isinf(compute_epsilon(PrivacyLedger(0, [DpSgdEvent(0.1, 0.0, 5)])).epsilon)


# ------------------------------------------------------------------------------ PATE


def test_gnmax_data_dependent_below_data_independent():
    orders = np.asarray(RDP_ORDERS)
    ind = rdp_gnmax_data_independent(40.0, orders)
    np.testing.assert_allclose(ind, orders / 40.0**2)

    dep = rdp_gnmax_data_dependent(CONSENSUS, 40.0, orders)
    assert np.all(dep <= ind)
    low = orders <= 100  # mu1 ~ 121.8 for this vote: the bound applies below it
    assert np.all(dep[low] < ind[low])
    i10 = int(np.argmin(np.abs(orders - 10.0)))
    assert dep[i10] < 0.01 * ind[i10]
    # Above mu1 the theorem does not apply: data-independent fallback.
    np.testing.assert_array_equal(dep[orders >= 122], ind[orders >= 122])

    # A medium consensus: Theorem 6 alone would exceed lambda/sigma^2 at low orders (there
    # the min with the data-independent bound is what applies) and wins at higher ones.
    medium = np.array([175, 75, 0, 0, 0, 0, 0, 0, 0, 0], dtype=float)
    dep_m = rdp_gnmax_data_dependent(medium, 40.0, orders)
    assert np.all(dep_m <= ind)
    assert dep_m[0] == ind[0] and np.any(dep_m < ind)

    # A split vote has a large q: no data-dependent gain anywhere.
    np.testing.assert_array_equal(rdp_gnmax_data_dependent(SPLIT, 40.0, orders), ind)


def test_gnmax_bound_matches_hand_computation():
    sigma, lam = 40.0, 10.0
    n_star, others = CONSENSUS[0], CONSENSUS[1:]
    # Proposition 7, in linear space.
    q = sum(0.5 * math.erfc((n_star - n) / (2 * sigma)) for n in others)
    assert log_q_gnmax(CONSENSUS, sigma) == pytest.approx(math.log(q), rel=1e-10)
    # Theorem 6 with mu2 = sigma sqrt(log 1/q), mu1 = mu2 + 1, eps_i = mu_i / sigma^2.
    mu2 = sigma * math.sqrt(math.log(1 / q))
    mu1 = mu2 + 1
    eps1, eps2 = mu1 / sigma**2, mu2 / sigma**2
    assert q < math.exp((mu2 - 1) * eps2) / ((mu1 / (mu1 - 1)) * (mu2 / (mu2 - 1))) ** mu2
    a = (1 - q) / (1 - (q * math.exp(eps2)) ** ((mu2 - 1) / mu2))
    b = math.exp(eps1) / q ** (1 / (mu1 - 1))
    by_hand = math.log((1 - q) * a ** (lam - 1) + q * b ** (lam - 1)) / (lam - 1)
    assert by_hand < lam / sigma**2
    got = rdp_gnmax_data_dependent(CONSENSUS, sigma, [lam])
    assert got[0] == pytest.approx(by_hand, rel=1e-9)
    # Batched (Q, C) input gives the same per-row values.
    batch = rdp_gnmax_data_dependent(np.stack([CONSENSUS, SPLIT]), sigma, [lam])
    assert batch.shape == (2, 1) and batch[0, 0] == got[0] and batch[1, 0] == lam / sigma**2


def test_pate_event_curves_and_composition():
    orders = np.asarray(RDP_ORDERS)
    votes = np.stack([CONSENSUS, CONSENSUS, SPLIT, SPLIT])
    answered = np.array([True, True, True, False])
    ev = pate_query_event(votes, answered, sigma1=150.0, sigma2=40.0, round=2)
    assert (ev.answered, ev.queries) == (3, 4)
    # The guarantee charges GNMax for every query asked, answered or not.
    expect_ind = 4 * orders / (2 * 150.0**2) + 4 * orders / 40.0**2
    np.testing.assert_allclose(ev.data_independent_rdp, expect_ind, rtol=1e-12)
    assert np.all(np.asarray(ev.rdp) <= np.asarray(ev.data_independent_rdp) + 1e-15)

    ledger = PrivacyLedger(client_id=0, events=[ev], delta=DELTA)
    report = compute_epsilon(ledger)
    assert report.method == "rdp" and report.epsilon_pld is None
    # The reported epsilon is the guarantee: a fresh composition of the data-independent
    # curves. The data-dependent figure (a function of the votes) is only reported beside it.
    expect, _ = rdp_to_epsilon(orders, expect_ind, DELTA)
    assert report.epsilon == pytest.approx(expect, rel=1e-12)
    assert report.epsilon_rdp == report.epsilon == report.epsilon_rdp_data_independent
    expect_dep, _ = rdp_to_epsilon(orders, np.asarray(ev.rdp), DELTA)
    assert report.epsilon_data_dependent_unreleased == pytest.approx(expect_dep, rel=1e-12)
    assert report.epsilon_data_dependent_unreleased < report.epsilon
    # What the budget plans before the votes: the same guarantee.
    worst = pate_worst_case_event(4, sigma1=150.0, sigma2=40.0)
    assert worst.data_independent_rdp == worst.rdp == ev.data_independent_rdp

    # Plain GNMax on split votes charges lambda/sigma^2 per query: the RDP of a Gaussian
    # mechanism with noise multiplier sigma/sqrt(2). Composed with DP-SGD by the ledger, it
    # must equal dp-accounting's composition of the equivalent events.
    sgd = DpSgdEvent(0.01, 1.0, 1000)
    gnmax = pate_query_event(np.stack([SPLIT] * 20), None, sigma1=None, sigma2=40.0)
    report = compute_epsilon(PrivacyLedger(0, [sgd, gnmax], delta=DELTA))
    equivalent = dpa.ComposedDpEvent(
        [sgd.dp_event(), dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(40.0 / math.sqrt(2)), 20)]
    )
    acc = RdpAccountant(list(RDP_ORDERS))
    acc.compose(equivalent)
    assert report.epsilon == pytest.approx(acc.get_epsilon(DELTA), rel=1e-9)
    assert report.epsilon == pytest.approx(_direct_rdp(equivalent), rel=0.01)


def test_gnmax_and_confident_gnmax_aggregation():
    votes = torch.tensor(np.stack([CONSENSUS, SPLIT, SPLIT[::-1].copy()]), dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    assert gnmax_aggregate(votes, 1e-3, gen).tolist() == [0, 0, 9]
    labels, answered = confident_gnmax(
        votes, threshold=200.0, sigma1=1e-3, sigma2=1e-3, generator=gen
    )
    assert answered.tolist() == [True, False, False]
    assert labels.tolist() == [0, -1, -1]
    # Same seed, same answers.
    a = confident_gnmax(votes, 125.0, 5.0, 40.0, torch.Generator().manual_seed(3))
    b = confident_gnmax(votes, 125.0, 5.0, 40.0, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    preds = torch.tensor([[0, 1], [0, 1], [2, 1]])  # 3 teachers, 2 queries
    assert votes_from_predictions(preds, 3).tolist() == [[2, 0, 1], [0, 3, 0]]


# ------------------------------------------------------------------------------ release


def test_gaussian_release_noise_scale():
    clip, sigma = 0.5, 3.0
    zeros = torch.zeros(3, 200, 50)
    gen = torch.Generator().manual_seed(1234)
    noisy = private_sum_of_probabilities(zeros, clip, sigma, gen)
    assert noisy.shape == (200, 50)
    assert noisy.std().item() == pytest.approx(sigma * clip, rel=0.03)
    assert abs(noisy.mean().item()) < 0.05 * sigma * clip


def test_label_histogram_release_noise_scale_and_repeatability():
    labels = np.array([0, 0, 1, 3, 3, 3])
    exact = released_label_histogram(labels, 4, 0.0, torch.Generator())
    assert exact.tolist() == [2.0, 1.0, 0.0, 3.0]
    # Same seed, same release: a client resends it every round without new privacy cost.
    again = [
        released_label_histogram(labels, 4, 7.0, torch.Generator().manual_seed(5)) for _ in range(2)
    ]
    np.testing.assert_array_equal(again[0], again[1])
    # Noise std per count = noise_std (sensitivity 1 under add/remove of one example).
    many = released_label_histogram(np.zeros(10, dtype=int), 20_000, 3.0, torch.Generator())
    many[0] -= 10
    assert many.std() == pytest.approx(3.0, rel=0.03)
    assert label_histogram_event(3.0, 1).noise_multiplier == 3.0
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        released_label_histogram(np.array([4]), 4, 0.0, torch.Generator())


def test_clipping_and_teacher():
    big = torch.full((2, 10, 4), 0.25)
    big[1] = torch.eye(4)[torch.arange(10) % 4]  # one-hot rows, norm sqrt(10)
    clipped = clip_l2(big, 1.0)
    np.testing.assert_allclose(clipped.flatten(1).norm(dim=1).numpy(), [1.0, 1.0], rtol=1e-6)
    small = torch.full((1, 2, 2), 0.1)  # norm 0.2 < clip: unchanged
    assert torch.equal(clip_l2(small, 1.0), small)
    # Without noise the release is the plain clipped sum.
    out = private_sum_of_probabilities(big, 1.0, 0.0, torch.Generator())
    torch.testing.assert_close(out, clipped.sum(0))

    teacher = private_mean_teacher(big, 1.0, 0.5, torch.Generator().manual_seed(0))
    assert torch.all(teacher.probs >= 0)
    torch.testing.assert_close(teacher.probs.sum(1), torch.ones(10))
    assert torch.isfinite(teacher.logits).all()
    with pytest.raises(ValueError, match="NaN"):
        private_sum_of_probabilities(
            torch.full((1, 2, 2), float("nan")), 1.0, 1.0, torch.Generator()
        )
    # Ledger events: per-example sensitivity sqrt(2) clip, per-client clip.
    assert gaussian_release_event(2.0, round=1).noise_multiplier == pytest.approx(2 / 2**0.5)
    assert gaussian_release_event(2.0, round=1, unit="client").noise_multiplier == 2.0


# ------------------------------------------------------------------------------ calibration


def test_calibration_hits_target():
    target, q, steps = 1.0, 0.02, 300
    sigma = calibrate_noise_multiplier(target, DELTA, q, steps)
    eps = _direct_pld(
        dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps)
    )
    assert 0.99 * target <= eps <= target


def test_calibration_leaves_room_for_one_time_releases():
    target, q, steps = 1.0, 0.02, 300
    histogram = label_histogram_event(20.0)
    alone = calibrate_noise_multiplier(target, DELTA, q, steps)
    sigma = calibrate_noise_multiplier(target, DELTA, q, steps, other_events=(histogram,))
    assert sigma > alone
    both = dpa.ComposedDpEvent(
        [
            dpa.SelfComposedDpEvent(
                dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps
            ),
            dpa.GaussianDpEvent(20.0),
        ]
    )
    # The search runs on a coarse (pessimistic) PLD grid: within about 1% below the target.
    assert 0.98 * target <= _direct_pld(both) <= target
    with pytest.raises(ValueError, match="histogram_noise"):
        calibrate_noise_multiplier(0.01, DELTA, q, steps, other_events=(histogram,))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(target_epsilon=0.0), "target_epsilon"),
        (dict(target_epsilon=-1.0), "target_epsilon"),
        (dict(delta=0.0), "delta"),
        (dict(delta=1.0), "delta"),
        (dict(sample_rate=0.0), "sample_rate"),
        (dict(sample_rate=1.5), "sample_rate"),
        (dict(steps=0), "steps"),
        (dict(accountant="moments"), "accountant"),
    ],
)
def test_calibration_rejects_bad_arguments(kwargs, name):
    args = dict(target_epsilon=1.0, delta=DELTA, sample_rate=0.01, steps=100) | kwargs
    with pytest.raises(ValueError, match=name):
        calibrate_noise_multiplier(**args)
