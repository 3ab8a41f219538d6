"""Server-side algorithms, one per file (like Flower's strategies)."""

from strategies.base import DigestPayload, LocalPlan, Strategy
from strategies.centralized import Centralized
from strategies.dsfl import DSFL
from strategies.fd import FD
from strategies.fedavg import FedAvg
from strategies.feddf import FedDFLogit
from strategies.fedmd import FedMD
from strategies.local_only import LocalOnly
from strategies.pate import PATE

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (DSFL, FedMD, FedDFLogit, FD, FedAvg, LocalOnly, Centralized, PATE)
}

__all__ = [
    "STRATEGIES",
    "DigestPayload",
    "LocalPlan",
    "PATE",
    "Strategy",
    *(c.__name__ for c in STRATEGIES.values()),
]
