"""Knowledge layer: distillation losses and teacher builders, pure tensor functions."""

from fedkd.knowledge.losses import (
    DISTILL_LOSSES,
    distillation_loss,
    kl_distillation_loss,
    mae_logit_loss,
    mse_logit_loss,
    soft_targets,
)
from fedkd.knowledge.teachers import (
    HISTOGRAM_TEACHERS,
    TEACHER_KINDS,
    aggregate_per_class,
    build_teacher,
    class_weighted_probs,
    era,
    match_class_prior,
    mean_logits,
    mean_probs,
    median_logits,
    per_class_mean_logits,
    pooled_likelihood,
    trimmed_mean_logits,
)

__all__ = [
    "DISTILL_LOSSES",
    "HISTOGRAM_TEACHERS",
    "TEACHER_KINDS",
    "aggregate_per_class",
    "build_teacher",
    "class_weighted_probs",
    "distillation_loss",
    "era",
    "kl_distillation_loss",
    "mae_logit_loss",
    "match_class_prior",
    "mean_logits",
    "mean_probs",
    "median_logits",
    "mse_logit_loss",
    "per_class_mean_logits",
    "pooled_likelihood",
    "soft_targets",
    "trimmed_mean_logits",
]
