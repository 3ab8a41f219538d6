"""Membership inference against one client's student: loss threshold and offline LiRA.

Members are the client's private training examples; non-members are global test examples
drawn to match the members' labels class by class (same count per class), so that the attack
cannot win by noticing the client's label skew, and the two sets are balanced.

- **Loss threshold** (Yeom et al. 2018): score = minus the student's cross-entropy loss.
- **Offline LiRA** (Carlini et al. 2022, section on the offline variant): shadow models are
  trained with the client's recipe on data that excludes every target, the logit-scaled
  confidence ``phi = log p_y - log(1 - p_y)`` of each target is modelled under the shadows as a
  Gaussian, and the score is how far the student's ``phi`` lies above it (a one-sided test).
  With few shadows the variance is pooled over targets ("fixed variance"), as the paper advises.

Both report the ROC AUC and the TPR at 1% and 0.1% FPR (with as many non-members as there are,
0.1% FPR may mean "no false positive at all": the counts are reported beside the rates).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from fedkd.learner.loop import (
    PrivateAnchor,
    StepConfig,
    distill,
    init_student,
    make_optimizer,
    predict_logits,
    seeded_generator,
    train_supervised,
)
from fedkd.privacy.dpsgd import DpSgdSettings, train_dpsgd

__all__ = [
    "AttackResult",
    "ShadowRecipe",
    "attack_summary",
    "lira_offline_scores",
    "logit_confidence",
    "loss_threshold_scores",
    "match_by_class",
    "per_example_loss",
    "shadow_confidences",
    "train_shadow",
]

# Seed keys of the shadows (apart from every client id and the server's negative ids).
_SHADOW_KEY = 1 << 20
FPR_LEVELS = (0.01, 0.001)


@dataclass(frozen=True)
class AttackResult:
    """ROC summary of one attack (JSON-ready through :func:`dataclasses.asdict`)."""

    attack: str
    auc: float
    tpr_at_1pct_fpr: float
    tpr_at_0_1pct_fpr: float
    members: int
    non_members: int


def attack_summary(name: str, scores: np.ndarray, is_member: np.ndarray) -> AttackResult:
    """AUC and TPR at 1% / 0.1% FPR of scores where higher means "member".

    Parameters
    ----------
    name : str
        Attack name.
    scores : np.ndarray
        ``(n,)`` attack scores.
    is_member : np.ndarray
        ``(n,)`` bool truth; both classes must be present.

    Returns
    -------
    AttackResult
        TPR at FPR ``a`` is the largest TPR over thresholds whose FPR is at most ``a``.
    """
    # Imported here: scikit-learn takes seconds to import, and every run's driver imports this
    # module (through the end-of-run audit hook) while only an audit scores attacks.
    from sklearn.metrics import roc_auc_score, roc_curve

    is_member = np.asarray(is_member, dtype=bool)
    fpr, tpr, _ = roc_curve(is_member, scores)
    at = [float(tpr[fpr <= a].max()) for a in FPR_LEVELS]
    return AttackResult(
        attack=name,
        auc=float(roc_auc_score(is_member, scores)),
        tpr_at_1pct_fpr=at[0],
        tpr_at_0_1pct_fpr=at[1],
        members=int(is_member.sum()),
        non_members=int((~is_member).sum()),
    )


def match_by_class(
    member_y: np.ndarray, pool_y: np.ndarray, max_per_side: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Members and as many non-members from a pool, with the same count in every class.

    Parameters
    ----------
    member_y : np.ndarray
        Labels of the candidate members.
    pool_y : np.ndarray
        Labels of the non-member pool.
    max_per_side : int
        Cap on the number of members (and so of non-members); 0 = no cap.
    rng : np.random.Generator
        Which members and non-members are drawn.

    Returns
    -------
    tuple of np.ndarray
        Indices into ``member_y`` and into ``pool_y``, of equal length, sorted.
    """
    classes = np.unique(member_y)
    per_class = {
        c: min(int((member_y == c).sum()), int((pool_y == c).sum())) for c in classes.tolist()
    }
    total = sum(per_class.values())
    if max_per_side and total > max_per_side:
        # Scale every class down alike so the members keep their label mix.
        scale = max_per_side / total
        per_class = {c: int(np.floor(k * scale)) for c, k in per_class.items()}
    members, non_members = [], []
    for c, k in per_class.items():
        if k == 0:
            continue
        members.append(rng.choice(np.flatnonzero(member_y == c), k, replace=False))
        non_members.append(rng.choice(np.flatnonzero(pool_y == c), k, replace=False))
    if not members:
        raise ValueError("no class has both members and non-members to compare")
    return np.sort(np.concatenate(members)), np.sort(np.concatenate(non_members))


@torch.no_grad()
def per_example_loss(model: nn.Module, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Cross-entropy of each example, eval mode."""
    logits = predict_logits(model, x)
    return nn.functional.cross_entropy(logits, torch.as_tensor(y), reduction="none").numpy()


def loss_threshold_scores(model: nn.Module, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Minus the loss: members have low loss."""
    return -per_example_loss(model, x, y)


@torch.no_grad()
def logit_confidence(logits: torch.Tensor, y: np.ndarray) -> np.ndarray:
    """``log p_y - log(1 - p_y)``, computed stably as ``z_y - logsumexp(z_j, j != y)``."""
    y = torch.as_tensor(y)
    z = logits.double()
    true = z.gather(1, y[:, None]).squeeze(1)
    others = z.scatter(1, y[:, None], float("-inf")).logsumexp(dim=1)
    return (true - others).numpy()


@dataclass(frozen=True)
class ShadowRecipe:
    """How the audited client trained, for shadows to repeat.

    Attributes
    ----------
    arch : str
        The client's student architecture.
    input_shape : tuple of int
        One input's shape.
    num_classes : int
        Number of classes.
    rounds : int
        Rounds of local training.
    private : StepConfig
        Epochs (per round, `StepConfig.for_round`), batch size and optimizer of the private
        training.
    dp : DpSgdSettings or None
        DP-SGD as the client ran it (same noise calibration, since the shadow has as many
        examples), or None.
    seed : int
        The run seed; shadow ``s`` draws its init and batches from ``(seed, s)``.
    distill : StepConfig or None
        The client's distillation step (None: the shadows only train privately).
    distill_loss : str
        Its loss (``kl``, ``mae``, ``mse``).
    distill_temperature : float
        Its temperature.
    distill_private_weight : float
        Its private anchor's weight (0: none): a shadow anchors on its own training data.
    teachers : list of (np.ndarray, np.ndarray)
        The digests the client distilled from, in round order: proxy inputs and teacher
        logits. Shadow round ``i`` distills from the ``i``-th after its private training.
    """

    arch: str
    input_shape: tuple[int, ...]
    num_classes: int
    rounds: int
    private: StepConfig
    dp: DpSgdSettings | None
    seed: int
    distill: StepConfig | None = None
    distill_loss: str = "kl"
    distill_temperature: float = 1.0
    distill_private_weight: float = 0.0
    teachers: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)


def train_shadow(recipe: ShadowRecipe, x: np.ndarray, y: np.ndarray, shadow: int) -> nn.Module:
    """Train one shadow student on ``(x, y)`` with the client's recipe.

    Each round: the client's private training (DP-SGD when the client used it), then, where
    the run kept that round's digest, the same distillation towards the same teacher on the
    same proxy inputs. The teachers were built partly from the audited client's own uploads,
    so shadows are not perfectly "out": that can only make the attack weaker, never stronger.
    """
    key = _SHADOW_KEY + shadow
    model = init_student(recipe.arch, recipe.input_shape, recipe.num_classes, recipe.seed, key)
    opt = make_optimizer(
        model.parameters(), recipe.private.optim, torch_optimizer=recipe.dp is not None
    )
    distill_opt = None
    if recipe.distill is not None and recipe.teachers:
        distill_opt = make_optimizer(model.parameters(), recipe.distill.optim)
    for rnd in range(1, recipe.rounds + 1):
        gen = seeded_generator(recipe.seed, rnd, key)
        private = recipe.private.for_round(rnd)
        if recipe.dp is None:
            train_supervised(model, opt, x, y, private, gen)
        else:
            train_dpsgd(
                model,
                opt,
                x,
                y,
                epochs=private.epochs,
                batch_size=private.batch_size,
                settings=recipe.dp,
                generator=gen,
                round_num=rnd,
            )
        if distill_opt is not None and rnd <= len(recipe.teachers):
            proxy_x, teacher = recipe.teachers[rnd - 1]
            distill(
                model,
                distill_opt,
                proxy_x,
                teacher,
                recipe.distill,
                seeded_generator(recipe.seed, rnd, key, 1),
                recipe.distill_loss,
                recipe.distill_temperature,
                # The shadow anchors on its own training data, as the client's digest does.
                anchor=PrivateAnchor.seeded(
                    x, y, recipe.distill_private_weight, recipe.seed, rnd, key
                ),
            )
    return model


def shadow_confidences(
    recipe: ShadowRecipe,
    pool_x: np.ndarray,
    pool_y: np.ndarray,
    like_y: np.ndarray,
    targets_x: np.ndarray,
    targets_y: np.ndarray,
    shadows: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Train shadows on random halves of a pool that excludes the targets; score the targets.

    Each shadow draws a random half of the pool, then from it a training set with the client's
    label histogram ``like_y`` (as many examples per class as the client has, where the half
    holds enough), so shadows see data like the client's.

    Returns
    -------
    np.ndarray
        ``(shadows, n_targets)`` logit-scaled confidences.
    """
    out = np.empty((shadows, len(targets_y)), dtype=np.float64)
    classes, counts = np.unique(like_y, return_counts=True)
    for s in range(shadows):
        half = rng.permutation(len(pool_y))[: len(pool_y) // 2]
        picks = []
        for c, k in zip(classes.tolist(), counts.tolist(), strict=True):
            of_c = half[pool_y[half] == c]
            picks.append(rng.choice(of_c, min(k, len(of_c)), replace=False))
        idx = np.concatenate(picks)
        model = train_shadow(recipe, pool_x[idx], pool_y[idx], s)
        out[s] = logit_confidence(predict_logits(model, targets_x), targets_y)
    return out


def lira_offline_scores(target_phi: np.ndarray, shadow_phi: np.ndarray) -> np.ndarray:
    """Offline LiRA: standardised distance of the target's confidence above the OUT Gaussian.

    Parameters
    ----------
    target_phi : np.ndarray
        ``(n,)`` logit-scaled confidence of the audited student on each target.
    shadow_phi : np.ndarray
        ``(S, n)`` the same under ``S >= 2`` shadows trained without any target.

    Returns
    -------
    np.ndarray
        ``(target_phi - mu_out) / sigma_out`` with the OUT variance pooled over targets;
        monotone in the one-sided likelihood-ratio p-value, so the ROC is the same.
    """
    if shadow_phi.shape[0] < 2:
        raise ValueError("offline LiRA needs at least 2 shadow models")
    mu = shadow_phi.mean(axis=0)
    sigma = float(np.sqrt(shadow_phi.var(axis=0, ddof=1).mean()))
    return (target_phi - mu) / max(sigma, 1e-12)
