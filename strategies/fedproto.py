"""FedProto: federated prototype learning (Tan et al., "FedProto: federated prototype learning
across heterogeneous clients", AAAI 2022).

Feature knowledge instead of logits, and no proxy set: each client uploads its prototypes, the
per-class means of its embeddings on its private training data, with per-class counts
(classes x width numbers, `fedkd.models.zoo.EMBEDDING_WIDTH` wide for every architecture, so
that heterogeneous students are comparable). The server averages them per class, weighted by
the counts, into global prototypes and sends them with the next training request; each client
then trains with cross-entropy plus ``proto_weight`` times the mean squared distance of an
example's embedding to its class's global prototype.

Clients are evaluated by their own classification head (``client_test_acc_*``), like every
other algorithm's students; there is no global model.

Privacy: the regulariser runs outside DP-SGD, so DP-SGD is not supported; the counts are the
clients' exact label counts.
"""

from __future__ import annotations

from dataclasses import dataclass

from strategies.params import AlgorithmParams, Capabilities, check_positive
from strategies.per_class import PerClassStrategy


@dataclass
class FedProtoParams(AlgorithmParams):
    """FedProto's parameters."""

    # Weight of the prototype-distance regulariser in the clients' local training (lambda).
    proto_weight: float = 1.0

    def check(self) -> None:
        super().check()
        check_positive("proto_weight", self.proto_weight, zero_ok=True)


class FedProto(PerClassStrategy):
    """Count-weighted per-class averaging of the clients' embedding prototypes.

    Parameters
    ----------
    **kwargs
        See `strategies.base.Strategy`; no proxy set and no server student are used. The
        regulariser's weight is the spec's ``algorithm.proto_weight`` (applied by the clients).
    """

    name = "fedproto"
    Params = FedProtoParams
    capabilities = Capabilities(
        uploads=("prototypes",), server_student="unused", supports_dpsgd=False
    )
    space = "embeddings"
    means_key = "prototypes"
    counts_key = "prototype_counts"
    present_key = "prototype_present"

    @classmethod
    def regulariser_weight(cls, params: AlgorithmParams) -> float:
        assert isinstance(params, FedProtoParams)
        return params.proto_weight

    def round_metrics(self) -> dict[str, float]:
        """How many classes have a global prototype."""
        if self._present is None:
            return {}
        return {"prototype_classes": float(self._present.sum())}
