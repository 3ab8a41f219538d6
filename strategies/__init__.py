"""Server-side algorithms, one per file (like Flower's strategies), and their registry."""

from strategies.base import BuildContext, Strategy
from strategies.centralized import Centralized
from strategies.dsfl import DSFL
from strategies.fd import FD
from strategies.fedavg import FedAvg
from strategies.feddf import FedDFLogit
from strategies.fedmd import FedMD
from strategies.local_only import LocalOnly
from strategies.params import AlgorithmParams, Capabilities, ParamError
from strategies.pate import PATE
from strategies.registry import BUILTIN, AlgorithmNotFound, algorithm_class

# The built-in algorithms by name (`strategies.registry` also resolves import paths and
# entry points).
STRATEGIES: dict[str, type[Strategy]] = BUILTIN

__all__ = [
    "STRATEGIES",
    "AlgorithmNotFound",
    "AlgorithmParams",
    "BuildContext",
    "Capabilities",
    "DSFL",
    "FD",
    "PATE",
    "Centralized",
    "FedAvg",
    "FedDFLogit",
    "FedMD",
    "LocalOnly",
    "ParamError",
    "Strategy",
    "algorithm_class",
]
