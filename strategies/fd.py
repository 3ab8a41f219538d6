"""FD: Federated Distillation (Jeong et al., 2018).

The cheapest exchange: no proxy set. Each client uploads its per-class average logits on its
private data (C x C numbers) with per-class counts; the server averages them per class,
weighted by counts; in the next round each client adds a distillation regulariser pulling its
output on an example of class c towards the global average for c.

The regulariser is bounded: KL between the student's tempered softmax and the softmax of the
global class average. Applying cross-entropy to raw averaged logits, as one public
implementation does, can diverge to NaN within a few rounds.
"""

from __future__ import annotations

from dataclasses import dataclass

from strategies.params import AlgorithmParams, Capabilities, check_positive
from strategies.per_class import PerClassStrategy


@dataclass
class FDParams(AlgorithmParams):
    """FD's parameters."""

    # Weight of the distillation regulariser in the clients' local training.
    fd_weight: float = 1.0

    def check(self) -> None:
        super().check()
        check_positive("fd_weight", self.fd_weight, zero_ok=True)


class FD(PerClassStrategy):
    """Federated Distillation with per-class logits.

    Parameters
    ----------
    **kwargs
        See `strategies.base.Strategy`; no proxy set and no server student are used. The
        regulariser weight and temperature are the spec's ``algorithm.fd_weight`` and
        ``distill.temperature`` (applied by the clients).
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
