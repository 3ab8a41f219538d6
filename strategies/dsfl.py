"""DS-FL: Distillation-based Semi-supervised FL (Itahara et al., 2021).

Clients upload probabilities on a subset of the unlabeled open (proxy) set; the server averages
them and sharpens the average with Entropy Reduction Aggregation (ERA, a softmax at a
temperature below 1), which counters the high-entropy average of non-IID clients. Clients and
the server student distill from the sharpened soft labels.
"""

from __future__ import annotations

from strategies.base import LogitTeacherStrategy


class DSFL(LogitTeacherStrategy):
    """DS-FL with ERA.

    Parameters
    ----------
    **kwargs
        See `strategies.base.Strategy`; ``teacher`` defaults to ``"era"`` and
        ``era_temperature`` (0.1 in the paper) sets the sharpening. Spec parameters:
        `strategies.params.TeacherParams`.
    """

    name = "dsfl"

    def __init__(self, *args, teacher: str = "era", **kwargs) -> None:
        super().__init__(*args, teacher=teacher, **kwargs)
