"""FD: Federated Distillation (Jeong et al., 2018).

The cheapest exchange: no proxy set. Each client uploads its per-class average logits on its
private data (C x C numbers) with per-class counts; the server averages them per class,
weighted by counts; in the next round each client adds a distillation regulariser pulling its
output on an example of class c towards the global average for c.

The regulariser is bounded: KL between the student's tempered softmax and the softmax of the
global class average. Applying cross-entropy to raw averaged logits, as one public
implementation does, can diverge to NaN within a few rounds. Where the clients fit their own
data well the class averages are near one-hot, and the regulariser repeats the label's
cross-entropy: ``fd_normalise`` divides the loss by ``1 + fd_weight`` so that the step keeps
the scale of cross-entropy alone. The head's logit adjustment is `strategies.per_class`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

from strategies.params import AlgorithmParams, Capabilities, check_positive
from strategies.per_class import PerClassParams, PerClassStrategy


@dataclass
class FDParams(PerClassParams):
    """FD's parameters."""

    # Weight of the distillation regulariser in the clients' local training.
    fd_weight: float = 1.0
    # Divide the clients' loss by 1 + fd_weight (`ClassRegulariser`'s normalise): where the
    # global class averages are near one-hot, the regulariser is a second cross-entropy that
    # would otherwise scale the step up by 1 + fd_weight (results/fd.md).
    fd_normalise: bool = False

    def check(self) -> None:
        super().check()
        check_positive("fd_weight", self.fd_weight, zero_ok=True)


class FD(PerClassStrategy):
    """Federated Distillation with per-class logits.

    Parameters
    ----------
    **kwargs
        See `strategies.per_class.PerClassStrategy`. The regulariser's weight, temperature and
        normalisation are the spec's ``algorithm.fd_weight``, ``distill.temperature`` and
        ``algorithm.fd_normalise`` (applied by the clients).
    """

    name = "fd"
    Params = FDParams
    # The regulariser's training runs outside DP-SGD.
    capabilities = Capabilities(
        uploads=("class_logits",), server_student="unused", supports_dpsgd=False
    )
    space = "logits"
    means_key = "class_logits"
    counts_key = "class_counts"
    present_key = "class_present"

    @classmethod
    def regulariser_weight(cls, params: AlgorithmParams) -> float:
        assert isinstance(params, FDParams)
        return params.fd_weight

    @classmethod
    def regulariser_normalise(cls, params: AlgorithmParams) -> bool:
        assert isinstance(params, FDParams)
        return params.fd_normalise
