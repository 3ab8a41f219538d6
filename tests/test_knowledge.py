"""Tests for the knowledge layer: distillation losses and teacher builders."""

from __future__ import annotations

import math

import pytest
import torch

from fedkd.knowledge import (
    DISTILL_LOSSES,
    TEACHER_KINDS,
    aggregate_per_class,
    build_teacher,
    class_weighted_probs,
    client_confidence,
    confidence_weights,
    distillation_loss,
    era,
    histogram_agreement,
    kl_distillation_loss,
    mae_logit_loss,
    match_class_prior,
    mean_logits,
    mean_probs,
    median_logits,
    mse_logit_loss,
    per_class_mean_logits,
    pooled_likelihood,
    soft_targets,
    trimmed_mean_logits,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _entropy(log_p: torch.Tensor) -> torch.Tensor:
    return -(log_p.exp() * log_p).sum(dim=-1)


# ---------------------------------------------------------------------------- losses


def test_soft_targets() -> None:
    t = torch.tensor([[2.0, 0.0, -2.0]])
    torch.testing.assert_close(soft_targets(t, 2.0), torch.softmax(t / 2.0, dim=-1))
    assert soft_targets(t, 4.0).max() < soft_targets(t, 1.0).max()
    with pytest.raises(ValueError, match="temperature"):
        soft_targets(t, 0.0)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_kl_zero_iff_student_equals_teacher(temperature: float) -> None:
    logits = torch.randn(8, 10, generator=_gen())
    target = soft_targets(logits, temperature)
    same = kl_distillation_loss(logits, target, temperature)
    assert abs(same.item()) < 1e-6
    other = kl_distillation_loss(logits.flip(-1), target, temperature)
    assert other.item() > 1e-3


def test_kl_matches_closed_form_and_torch() -> None:
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    p = torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]])
    temperature = 2.0
    q = torch.softmax(s / temperature, dim=-1)
    by_hand = temperature**2 * (p * (p / q).log()).sum() / 2
    torch.testing.assert_close(kl_distillation_loss(s, p, temperature), by_hand)
    reference = torch.nn.functional.kl_div(
        torch.log_softmax(s / temperature, dim=-1), p, reduction="batchmean"
    )
    torch.testing.assert_close(kl_distillation_loss(s, p, temperature), temperature**2 * reference)


def test_kl_t_squared_keeps_gradient_scale() -> None:
    # d/ds [T^2 KL(p || softmax(s/T))] = T (softmax(s/T) - p) / N: with T^2 the gradient grows
    # like T; without it, it would shrink like 1/T.
    s = torch.tensor([[1.0, -1.0, 0.5, 0.0]])
    t_logits = torch.tensor([[0.0, 2.0, -1.0, 1.0]])
    grads = {}
    for temperature in (1.0, 4.0):
        student = s.clone().requires_grad_(True)
        target = soft_targets(t_logits, temperature)
        kl_distillation_loss(student, target, temperature).backward()
        closed = temperature * (torch.softmax(s / temperature, dim=-1) - target)
        torch.testing.assert_close(student.grad, closed)
        grads[temperature] = student.grad.norm().item()
    # For small logits softmax(s/T) - softmax(t/T) ~ (s - t) / (C T), so T * that is ~ T-free.
    ratio = grads[4.0] / grads[1.0]
    assert 0.5 < ratio < 2.0, ratio
    unscaled_ratio = ratio / 16.0
    assert unscaled_ratio < 0.1


def test_kl_finite_with_zero_probability_targets() -> None:
    s = torch.tensor([[3.0, -2.0, 0.0], [0.0, 0.0, 50.0]], requires_grad=True)
    p = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]])
    loss = kl_distillation_loss(s, p, 1.0)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(s.grad).all()
    # Zero-probability classes contribute nothing: row 0 reduces to -log q_0.
    q0 = torch.softmax(s.detach()[0], dim=-1)[0]
    q1 = torch.softmax(s.detach()[1], dim=-1)
    row1 = 0.5 * math.log(0.5 / q1[1].item()) + 0.5 * math.log(0.5 / q1[2].item())
    assert loss.item() == pytest.approx((-math.log(q0.item()) + row1) / 2, rel=1e-5)


def test_kl_from_one_hot_teacher_logits() -> None:
    # A teacher in log-probability space with exact zeros is log 0 = -inf; still finite loss.
    teacher = torch.log(torch.tensor([[1.0, 0.0, 0.0]]))
    loss = distillation_loss("kl", torch.zeros(1, 3), teacher, 2.0)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(4.0 * math.log(3.0), rel=1e-5)


def test_mae_mse_by_hand() -> None:
    s = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    t = torch.tensor([[0.0, 4.0], [3.0, 1.0]])
    # differences: 1, -2, 0, -2
    assert mae_logit_loss(s, t).item() == pytest.approx(5.0 / 4.0)
    assert mse_logit_loss(s, t).item() == pytest.approx(9.0 / 4.0)


def test_distillation_loss_dispatch() -> None:
    s = torch.randn(4, 5, generator=_gen(1))
    t = torch.randn(4, 5, generator=_gen(2))
    assert DISTILL_LOSSES == ("kl", "mae", "mse")
    torch.testing.assert_close(
        distillation_loss("kl", s, t, 3.0), kl_distillation_loss(s, soft_targets(t, 3.0), 3.0)
    )
    torch.testing.assert_close(distillation_loss("mae", s, t, 3.0), mae_logit_loss(s, t))
    torch.testing.assert_close(distillation_loss("mse", s, t), mse_logit_loss(s, t))
    with pytest.raises(ValueError, match="unknown distillation loss 'l1'.*kl, mae, mse"):
        distillation_loss("l1", s, t)
    with pytest.raises(ValueError, match="same shape"):
        distillation_loss("kl", s, t[:, :3])


# ---------------------------------------------------------------------------- teachers


def _client_logits(k: int = 5, n: int = 20, c: int = 10, seed: int = 0) -> torch.Tensor:
    return 3.0 * torch.randn(k, n, c, generator=_gen(seed))


def test_mean_logits_weighted_by_hand() -> None:
    logits = _client_logits(k=3)
    w = torch.tensor([1.0, 3.0, 0.0])
    expected = (1.0 * logits[0] + 3.0 * logits[1]) / 4.0
    torch.testing.assert_close(mean_logits(logits, w), expected)
    torch.testing.assert_close(mean_logits(logits), logits.mean(dim=0))


def test_mean_probs_weighted_by_hand() -> None:
    logits = _client_logits(k=3)
    w = torch.tensor([2.0, 1.0, 1.0])
    probs = torch.softmax(logits, dim=-1)
    expected = 0.5 * probs[0] + 0.25 * probs[1] + 0.25 * probs[2]
    out = mean_probs(logits, w)
    assert out.shape == (20, 10)
    torch.testing.assert_close(out.exp(), expected)
    torch.testing.assert_close(torch.softmax(out, dim=-1), expected)
    torch.testing.assert_close(mean_probs(logits).exp(), probs.mean(dim=0))
    torch.testing.assert_close(build_teacher("weighted", logits, w), out)


def test_mean_probs_zero_weight_ignores_client() -> None:
    logits = _client_logits(k=2)
    out = mean_probs(logits, torch.tensor([0.0, 5.0]))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.log_softmax(logits[1], dim=-1))


def test_era_sharpens_and_keeps_argmax() -> None:
    # Clients that mostly agree, as trained clients do on in-domain proxy data.
    gen = _gen(7)
    labels = torch.randint(0, 10, (20,), generator=gen)
    logits = torch.randn(5, 20, 10, generator=gen) + 4.0 * torch.nn.functional.one_hot(labels, 10)
    averaged = mean_probs(logits)
    sharpened = era(logits, temperature=0.1)
    assert sharpened.shape == averaged.shape
    torch.testing.assert_close(sharpened.exp().sum(-1), torch.ones(20))
    assert (_entropy(sharpened) < _entropy(averaged)).all()
    assert _entropy(sharpened).mean() < 0.5 * _entropy(averaged).mean()
    assert torch.equal(sharpened.argmax(-1), averaged.argmax(-1))
    # Closed form on the probabilities themselves.
    torch.testing.assert_close(
        sharpened, torch.log_softmax(averaged.exp() / 0.1, dim=-1), atol=1e-6, rtol=1e-6
    )
    # A higher temperature sharpens less.
    assert (_entropy(era(logits, 0.5)) > _entropy(sharpened)).all()


def test_era_is_not_sharpening_row_by_row() -> None:
    # softmax(p / T) floors every class at exp(0): near-zero tail classes are lifted. A two-way
    # tie with an empty tail therefore comes out *softer* (documented in era's Notes).
    p = torch.tensor([0.5, 0.5] + [1e-7] * 8)
    logits = p.log().reshape(1, 1, 10)
    out = era(logits, temperature=0.1)
    assert _entropy(out).item() > _entropy(p.log()).item()
    # Largest probability ERA can give: e^(1/T) / (e^(1/T) + C - 1).
    one_hot = torch.tensor([0.0] + [-30.0] * 9).reshape(1, 1, 10)
    bound = math.exp(10) / (math.exp(10) + 9)
    assert era(one_hot, 0.1).exp().max().item() == pytest.approx(bound, rel=1e-5)


def test_median_and_trimmed_mean_resist_outlier() -> None:
    honest = _client_logits(k=4, seed=3)
    outlier = 1000.0 * _client_logits(k=1, seed=4)
    logits = torch.cat([honest, outlier])
    honest_mean = honest.mean(dim=0)
    spread = honest.abs().max().item()

    plain = mean_logits(logits)
    assert (plain - honest_mean).abs().max() > 100.0
    for robust in (median_logits(logits), trimmed_mean_logits(logits, 0.2)):
        # Bounded by the honest clients' range, whatever the outlier sends.
        assert (robust - honest_mean).abs().max() < spread
        assert (robust - honest_mean).abs().mean() < 2.0


def test_median_by_hand_odd_and_even() -> None:
    odd = torch.tensor([1.0, 9.0, 3.0, -4.0, 2.0]).reshape(5, 1, 1)
    assert median_logits(odd).item() == 2.0
    even = torch.tensor([1.0, 9.0, 3.0, -4.0]).reshape(4, 1, 1)
    assert median_logits(even).item() == 2.0  # (1 + 3) / 2, not the lower median 1


def test_trimmed_mean_by_hand() -> None:
    values = torch.tensor([10.0, -7.0, 1.0, 2.0, 3.0]).reshape(5, 1, 1)
    # floor(0.2 * 5) = 1 dropped at each end: mean(1, 2, 3).
    assert trimmed_mean_logits(values, 0.2).item() == pytest.approx(2.0)
    # floor(0.2 * 4) = 0: too few clients to trim, plain mean.
    four = values[:4]
    assert trimmed_mean_logits(four, 0.2).item() == pytest.approx(1.5)
    # floor(0.4 * 5) = 2 at each end: the median.
    assert trimmed_mean_logits(values, 0.4).item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="trim_fraction"):
        trimmed_mean_logits(values, 0.5)


def test_build_teacher_dispatch() -> None:
    logits = _client_logits()
    w = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert TEACHER_KINDS == (
        "mean_logits",
        "mean_probs",
        "weighted",
        "era",
        "median",
        "trimmed_mean",
        "class_weighted",
        "pooled_likelihood",
    )
    cases = {
        "mean_logits": mean_logits(logits, w),
        "mean_probs": mean_probs(logits, w),
        "weighted": mean_probs(logits, w),
        "era": era(logits, 0.3, w),
        "median": median_logits(logits),
        "trimmed_mean": trimmed_mean_logits(logits, 0.4),
    }
    for kind, expected in cases.items():
        out = build_teacher(kind, logits, w, era_temperature=0.3, trim_fraction=0.4)
        assert out.shape == (20, 10)
        torch.testing.assert_close(out, expected)
    assert not torch.allclose(build_teacher("era", logits), build_teacher("mean_probs", logits))
    counts = torch.rand(5, 10, generator=_gen(3)) * 100
    torch.testing.assert_close(
        build_teacher("class_weighted", logits, counts), class_weighted_probs(logits, counts)
    )
    torch.testing.assert_close(
        build_teacher("pooled_likelihood", logits, counts, held_count=30.0),
        pooled_likelihood(logits, counts, 30.0),
    )


def test_class_weighted_teacher_by_hand() -> None:
    # Client 0 holds only class 0, client 1 only class 1; class 2 belongs to nobody.
    probs = torch.tensor([[[0.7, 0.2, 0.1]], [[0.6, 0.3, 0.1]]])  # (K=2, N=1, C=3)
    counts = torch.tensor([[10.0, 0.0, 0.0], [-3.0, 5.0, 0.0]])  # noise: -3 counts as 0
    out = class_weighted_probs(torch.log(probs), counts)
    # Class 0 from client 0 (0.7), class 1 from client 1 (0.3), class 2 the plain mean (0.1).
    scores = torch.tensor([0.7, 0.3, 0.1])
    torch.testing.assert_close(out.exp(), (scores / scores.sum()).unsqueeze(0))
    # Equal holdings reduce to the plain mean of probabilities.
    torch.testing.assert_close(
        class_weighted_probs(torch.log(probs), torch.ones(2, 3)), mean_probs(torch.log(probs))
    )


def test_pooled_likelihood_recovers_the_posterior_of_exact_experts_by_hand() -> None:
    # One input with class likelihoods p(x | c) = (1.0, 0.5, 0.1). Client 0 holds classes 0
    # and 1 (500 each), client 1 holds 1 and 2 (800, 200): each outputs its exact posterior
    # p(x | c) pi_k(c) / Z_k on its own classes, ~0 elsewhere.
    likelihood = torch.tensor([1.0, 0.5, 0.1], dtype=torch.float64)
    counts = torch.tensor([[500.0, 500.0, 0.0], [0.0, 800.0, 200.0]], dtype=torch.float64)
    posterior = likelihood * counts / (likelihood * counts).sum(dim=1, keepdim=True)
    logits = torch.log(posterior.clamp(min=1e-9)).unsqueeze(1)  # (K=2, N=1, C=3)
    out = pooled_likelihood(logits, counts, held_count=100.0)
    # Pooled prior (500, 1300, 200) / 2000: the teacher is p(x | c) pi(c), normalised.
    expected = likelihood * torch.tensor([0.25, 0.65, 0.10], dtype=torch.float64)
    torch.testing.assert_close(out.exp(), (expected / expected.sum()).unsqueeze(0))
    # The class-weighted mean of the same posteriors is not the posterior (0.467 against
    # 0.427 for class 0): it averages client 0's 2/3 as is.
    weighted = class_weighted_probs(logits, counts).exp()
    assert (weighted - out.exp()).abs().max() > 0.03


def test_pooled_likelihood_weights_each_client_by_the_square_root_of_its_counts() -> None:
    # Two clients hold both classes and disagree on one input's log-likelihood ratio l1 - l0:
    # client 0 (400 of each) says 0, client 1 (100 of each) says 3. Eliminating a client's
    # offset leaves weight w0 w1 / (w0 + w1) on its ratio, with row weights w = sqrt(count):
    # 10 and 5, so l1 - l0 = (10 * 0 + 5 * 3) / 15 = 1 (count weights would give 0.6).
    counts = torch.tensor([[400.0, 400.0], [100.0, 100.0]], dtype=torch.float64)
    logits = torch.tensor([[[0.0, 0.0]], [[0.0, 3.0]]], dtype=torch.float64)
    out = pooled_likelihood(logits, counts, held_count=50.0)
    torch.testing.assert_close(out, torch.log_softmax(torch.tensor([[0.0, 1.0]]), dim=1).double())


def test_pooled_likelihood_ignores_barely_held_classes_and_drops_unheld_ones() -> None:
    logits = _client_logits()  # (5, 20, 10)
    counts = torch.full((5, 10), 500.0)
    counts[:, 9] = 0.0  # nobody holds class 9
    counts[0, 3] = 80.0  # client 0 barely saw class 3: below the held count of 100
    out = pooled_likelihood(logits, counts)
    assert out.shape == (20, 10) and out.dtype == logits.dtype
    assert torch.all(out[:, 9] == float("-inf"))
    torch.testing.assert_close(out.exp().sum(dim=1), torch.ones(20))
    # Client 0's log-probability of class 3 does not enter the fit.
    changed = logits.clone()
    changed[0, :, 3] += 5.0
    torch.testing.assert_close(pooled_likelihood(changed, counts), out)
    # Noisy negative counts are zeros; no held class at all falls back to the plain mean.
    torch.testing.assert_close(
        pooled_likelihood(logits, torch.full((5, 10), -3.0)), mean_probs(logits)
    )
    with pytest.raises(ValueError, match=r"class_counts must have shape \(5, 10\)"):
        pooled_likelihood(logits, torch.ones(5, 9))
    with pytest.raises(ValueError, match="pooled_likelihood.*class counts"):
        build_teacher("pooled_likelihood", logits, torch.ones(5))


def test_match_class_prior_moves_a_biased_teachers_hesitant_inputs_to_their_next_class() -> None:
    # 3 balanced classes; the teacher ranks every input's true class high (+2) but is biased
    # towards class 1 (+3), so it calls nearly everything 1.
    gen = _gen(3)
    y = torch.arange(3).repeat_interleave(100)
    logits = 0.3 * torch.randn(300, 3, generator=gen, dtype=torch.float64)
    logits[torch.arange(300), y] += 2.0
    logits[:, 1] += 3.0
    assert (logits.argmax(dim=1) == y).double().mean() < 0.36
    prior = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    out = match_class_prior(logits, prior)
    assert out.dtype == logits.dtype and out.shape == (300, 3)
    probs = out.exp()
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(300, dtype=torch.float64))
    torch.testing.assert_close(
        probs.sum(dim=0), torch.full((3,), 100.0, dtype=torch.float64), rtol=0, atol=1e-3
    )
    assert (out.argmax(dim=1) == y).double().mean() > 0.95
    # One factor per class: every input's log-odds between two classes moves by the same amount.
    change = out - torch.log_softmax(logits, dim=1)
    log_odds_shift = change - change[:, :1]
    torch.testing.assert_close(log_odds_shift, log_odds_shift[:1].expand(300, 3))
    # A prior the teacher already follows changes nothing; the prior need not be normalised.
    again = match_class_prior(out, 7.0 * prior)
    torch.testing.assert_close(again, out)


def test_match_class_prior_leaves_out_classes_the_teacher_never_predicts() -> None:
    logits = torch.log_softmax(_client_logits()[0], dim=1)  # (20, 10)
    logits[:, 9] = float("-inf")  # e.g. held by no client
    prior = torch.arange(1.0, 11.0)
    probs = match_class_prior(logits, prior).exp()
    assert torch.all(probs[:, 9] == 0)
    torch.testing.assert_close(
        probs.sum(dim=0)[:9], 20 * prior[:9] / prior[:9].sum(), rtol=0, atol=1e-4
    )
    with pytest.raises(ValueError, match=r"prior must have shape \(10,\)"):
        match_class_prior(logits, torch.ones(9))
    with pytest.raises(ValueError, match="non-negative with a positive sum"):
        match_class_prior(logits, torch.tensor([-1.0] + [1.0] * 9))
    with pytest.raises(ValueError, match=r"shape \(N, C\)"):
        match_class_prior(logits[None], prior)


def test_build_teacher_errors() -> None:
    logits = _client_logits()
    with pytest.raises(ValueError, match="weighted.*weights"):
        build_teacher("weighted", logits)
    with pytest.raises(ValueError, match="unknown teacher kind 'vote'.*mean_logits.*trimmed_mean"):
        build_teacher("vote", logits)
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        build_teacher("mean_probs", logits, torch.ones(4))
    with pytest.raises(ValueError, match="non-negative"):
        build_teacher("mean_logits", logits, torch.tensor([1.0, -1.0, 1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="all be zero"):
        build_teacher("mean_logits", logits, torch.zeros(5))
    with pytest.raises(ValueError, match=r"\(K clients, N examples, C classes\)"):
        build_teacher("median", logits[0])
    with pytest.raises(ValueError, match=r"class_weighted.*\(K, C\)"):
        build_teacher("class_weighted", logits, torch.ones(5))
    with pytest.raises(ValueError, match=r"shape \(5, 10\)"):
        class_weighted_probs(logits, torch.ones(5, 9))


# ---------------------------------------------------------------------------- confidence weights


def _two_experts() -> tuple[torch.Tensor, torch.Tensor]:
    """Client 0 saw only class 0, client 1 only class 1: each is sure of its own class's
    inputs and hesitant on the other's. Inputs 0-1 are of class 0, inputs 2-3 of class 1."""
    p0 = torch.tensor([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.4, 0.35, 0.25], [0.5, 0.3, 0.2]])
    p1 = torch.tensor([[0.3, 0.4, 0.3], [0.35, 0.45, 0.2], [0.05, 0.9, 0.05], [0.1, 0.85, 0.05]])
    return torch.log(torch.stack([p0, p1])), torch.tensor([0, 0, 1, 1])


@pytest.mark.parametrize("kind", ["negative_entropy", "max_prob"])
def test_confidence_weight_falls_on_the_class_a_client_never_saw(kind: str) -> None:
    logits, label = _two_experts()
    w = confidence_weights(logits, kind)
    torch.testing.assert_close(w.sum(dim=0), torch.ones(4))
    assert (w[0, label == 0] > 0.5).all() and (w[0, label == 1] < 0.5).all()
    assert (w[1, label == 1] > 0.5).all() and (w[1, label == 0] < 0.5).all()
    # Example-count weights multiply in: client 1 with 9 times client 0's data outweighs it
    # on the inputs of client 0's class too, but less than without confidence (0.9).
    counted = confidence_weights(logits, kind, torch.tensor([1.0, 9.0]))
    torch.testing.assert_close(counted.sum(dim=0), torch.ones(4))
    assert (counted[1, label == 0] < 0.9).all() and (
        counted[1, label == 0] > w[1, label == 0]
    ).all()


def test_client_confidence_by_hand() -> None:
    p = torch.tensor([[[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]]])
    entropy = -(p * p.log()).sum(dim=-1)
    torch.testing.assert_close(client_confidence(p.log(), "negative_entropy"), (-entropy).exp())
    torch.testing.assert_close(client_confidence(p.log(), "max_prob"), torch.tensor([[0.5, 1 / 3]]))
    with pytest.raises(ValueError, match="unknown confidence kind 'margin'"):
        client_confidence(p.log(), "margin")


def test_confidence_weight_falls_for_a_trained_client_on_its_unseen_class() -> None:
    # Two small MLPs on scikit-learn's digits: client 0 on every class, client 1 on all but 3.
    from sklearn.datasets import load_digits

    x_np, y_np = load_digits(return_X_y=True)
    x, y = torch.tensor(x_np / 16.0, dtype=torch.float32), torch.tensor(y_np)
    torch.manual_seed(0)
    order = torch.randperm(len(y))
    train, test = order[:1200], order[1200:]
    unseen = 3

    def fit(classes: list[int]) -> torch.nn.Module:
        model = torch.nn.Sequential(
            torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)
        )
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        idx = train[torch.isin(y[train], torch.tensor(classes))]
        for _ in range(200):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        return model

    everything, without = fit(list(range(10))), fit([c for c in range(10) if c != unseen])
    with torch.no_grad():
        logits = torch.stack([everything(x[test]), without(x[test])])
    is_unseen = y[test] == unseen
    for kind in ("negative_entropy", "max_prob"):
        conf = client_confidence(logits, kind)
        assert conf[1, is_unseen].mean() < conf[1, ~is_unseen].mean() - 0.1
        w = confidence_weights(logits, kind)
        torch.testing.assert_close(w.sum(dim=0), torch.ones(len(test)))
        assert w[1, is_unseen].mean() < w[1, ~is_unseen].mean() - 0.03
        assert w[1, is_unseen].mean() < w[0, is_unseen].mean()


def test_build_teacher_with_confidence_weights_then_sharpens() -> None:
    logits = _client_logits()
    counts = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    w = confidence_weights(logits, "negative_entropy", counts)
    assert w.shape == (5, 20)
    out = build_teacher("era", logits, counts, era_temperature=0.3, confidence="negative_entropy")
    # ERA sharpens the confidence-weighted mean of the probabilities (not the other order).
    weighted_mean = (w[:, :, None] * torch.softmax(logits, dim=-1)).sum(dim=0)
    torch.testing.assert_close(out, torch.log_softmax(weighted_mean / 0.3, dim=-1))
    assert not torch.allclose(out, build_teacher("era", logits, counts, era_temperature=0.3))
    torch.testing.assert_close(
        build_teacher("mean_logits", logits, counts, confidence="max_prob"),
        (confidence_weights(logits, "max_prob", counts)[:, :, None] * logits).sum(dim=0),
    )
    torch.testing.assert_close(
        build_teacher("mean_probs", logits, confidence="max_prob"),
        mean_probs(logits, confidence_weights(logits, "max_prob")),
    )
    # "none" is the teacher without confidence, exactly.
    assert torch.equal(
        build_teacher("era", logits, counts, confidence="none"),
        build_teacher("era", logits, counts),
    )


def test_class_weighted_teacher_with_confidence_by_hand() -> None:
    logits, _ = _two_experts()
    counts = torch.tensor([[10.0, 10.0, 0.0], [10.0, 10.0, 0.0]])  # both hold classes 0 and 1
    out = build_teacher("class_weighted", logits, counts, confidence="max_prob")
    e = confidence_weights(logits, "max_prob")
    # Equal holdings: every class's weights are the confidence weights (class 2, held by
    # nobody, too), so the teacher is the confidence-weighted mean of the probabilities.
    torch.testing.assert_close(out, mean_probs(logits, e))
    # A class only client 1 holds takes client 1's probability whatever the confidence.
    only_1 = torch.tensor([[10.0, 0.0, 0.0], [10.0, 10.0, 0.0]])
    scores = build_teacher("class_weighted", logits, only_1, confidence="max_prob").exp()
    p = torch.softmax(logits, dim=-1)
    expected = torch.stack(
        [(e * p[:, :, 0]).sum(dim=0), p[1, :, 1], (e * p[:, :, 2]).sum(dim=0)], dim=1
    )
    torch.testing.assert_close(scores, expected / expected.sum(dim=1, keepdim=True))


def test_prior_agreement_lowers_a_client_on_an_input_of_a_class_it_never_held() -> None:
    # Client 0 holds classes 0 and 1, client 1 classes 1 and 2. On an input of class 2,
    # client 0 (which never saw class 2) votes for class 1 with confidence.
    probs = torch.tensor([[[0.03, 0.95, 0.02]], [[0.05, 0.35, 0.60]]])  # (K=2, N=1, C=3)
    counts = torch.tensor([[50.0, 50.0, 0.0], [0.0, 50.0, 50.0]])
    ones = torch.ones(2, 1)
    agreement = histogram_agreement(probs.log(), counts, ones)
    # q = the class-weighted teacher: class 0 from client 0, 2 from client 1, 1 from both.
    q = torch.tensor([0.03, 0.65, 0.60]) / 1.28
    torch.testing.assert_close(agreement[:, 0], torch.stack([q[0] + q[1], q[1] + q[2]]))
    assert agreement[0, 0] < agreement[1, 0]
    plain = build_teacher("class_weighted", probs.log(), counts).exp()[0]
    agreed = build_teacher("class_weighted", probs.log(), counts, prior_agreement=True).exp()[0]
    assert plain.argmax() == 1 and agreed.argmax() == 2  # class 1's score leans on client 1
    w = agreement[:, 0] / agreement[:, 0].sum()
    scores = torch.stack([probs[0, 0, 0], (w * probs[:, 0, 1]).sum(), probs[1, 0, 2]])
    torch.testing.assert_close(agreed, scores / scores.sum())
    with pytest.raises(ValueError, match="prior agreement needs the clients' label histograms"):
        build_teacher("era", probs.log(), prior_agreement=True)


def test_confidence_refused_by_teachers_that_weigh_no_examples() -> None:
    logits = _client_logits()
    for kind in ("median", "trimmed_mean", "pooled_likelihood"):
        with pytest.raises(ValueError, match=f"teacher '{kind}' takes no per-example weights"):
            build_teacher(kind, logits, torch.ones(5, 10), confidence="max_prob")
    with pytest.raises(ValueError, match="weighted.*weights"):
        build_teacher("weighted", logits, confidence="max_prob")


def test_non_finite_client_logits_rejected() -> None:
    logits = _client_logits()
    logits[3, 0, 0] = float("nan")
    for kind in TEACHER_KINDS:
        with pytest.raises(ValueError, match=r"NaN or inf.*\[3\]"):
            build_teacher(kind, logits, torch.ones(5))


def test_per_class_mean_logits_by_hand() -> None:
    logits = torch.tensor([[1.0, 0.0, 0.0], [3.0, 2.0, 0.0], [0.0, 5.0, 1.0], [0.0, 0.0, 4.0]])
    labels = torch.tensor([0, 0, 1, 0])
    class_logits, counts = per_class_mean_logits(logits, labels, num_classes=3)
    expected = torch.tensor([[4.0 / 3, 2.0 / 3, 4.0 / 3], [0.0, 5.0, 1.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(class_logits, expected)
    assert counts.tolist() == [3, 1, 0]
    assert counts.dtype == torch.int64
    with pytest.raises(ValueError, match="labels must lie in"):
        per_class_mean_logits(logits, torch.tensor([0, 1, 2, 3]), num_classes=3)
    with pytest.raises(ValueError, match="labels must have shape"):
        per_class_mean_logits(logits, labels[:3], num_classes=3)


def test_aggregate_per_class_by_hand() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    b = torch.tensor([[4.0, 3.0], [0.0, 0.0], [0.0, 0.0]])
    counts = torch.tensor([[1, 2, 0], [2, 0, 0]])
    out = aggregate_per_class(torch.stack([a, b]), counts)
    expected = torch.tensor([[(1.0 + 2 * 4.0) / 3, (0.0 + 2 * 3.0) / 3], [0.0, 2.0], [0.0, 0.0]])
    torch.testing.assert_close(out, expected)
    assert torch.isfinite(out).all()


def test_per_class_roundtrip_equals_pooled_class_means() -> None:
    # Count-weighted aggregation of per-client class means is the class mean of the pooled data.
    gen = _gen(5)
    parts = [
        (torch.randn(n, 4, generator=gen), torch.randint(0, 4, (n,), generator=gen))
        for n in (7, 12, 3)
    ]
    stacked = [per_class_mean_logits(x, y, 4) for x, y in parts]
    out = aggregate_per_class(
        torch.stack([s[0] for s in stacked]), torch.stack([s[1] for s in stacked])
    )
    pooled, _ = per_class_mean_logits(
        torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts]), 4
    )
    torch.testing.assert_close(out, pooled)
