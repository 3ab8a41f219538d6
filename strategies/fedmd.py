"""FedMD: heterogeneous FL via model distillation (Li & Wang, 2019).

Each round: communicate (clients' class scores on a public subset), aggregate (the consensus:
the average of the scores), distribute, digest (each client fits its scores to the consensus,
with mean absolute error on logits), revisit (a few epochs on the private data). fedkd's round
starts with the revisit, so the cycle is the same with the private training first.
"""

from __future__ import annotations

from strategies.base import LogitTeacherStrategy
from strategies.params import Capabilities


class FedMD(LogitTeacherStrategy):
    """FedMD consensus on logits; clients digest with MAE (spec: ``distill.loss``).

    Parameters
    ----------
    **kwargs
        See `strategies.base.Strategy`; ``teacher`` defaults to ``"mean_logits"`` (consensus).
        Spec parameters: `strategies.params.TeacherParams`.
    """

    name = "fedmd"
    capabilities = Capabilities(
        uploads=("logits",),
        needs_proxy=True,
        logit_teacher=True,
        teacher_release=True,
        default_distill_loss="mae",
    )

    def __init__(self, *args, teacher: str = "mean_logits", **kwargs) -> None:
        super().__init__(*args, teacher=teacher, **kwargs)
