"""DS-FL with an entropy-weighted teacher: an algorithm written outside fedkd.

DS-FL averages the clients' probabilities on the proxy inputs with equal weights (then sharpens
the average). Under label skew most clients know little about most inputs, and their flat
predictions dilute the few clients that do. Here each client's vote on an input is weighted by
how sure it is of that input: ``softmax(-entropy / confidence_temperature)`` over the clients,
input by input; the weighted mean is then sharpened like DS-FL's ERA.

Everything else (proxy sampling, the server student, the clients' distillation, DP-SGD in
local training) is fedkd's, through the `Strategy` base class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from strategies.base import BuildContext, Strategy
from strategies.params import AlgorithmParams, Capabilities, check_positive


@dataclass
class EntropyWeightedParams(AlgorithmParams):
    """The spec's [algorithm] keys (besides name), with their defaults."""

    # Lower: the surest client dominates each input; higher: towards DS-FL's plain mean.
    confidence_temperature: float = 0.5
    # ERA's sharpening of the weighted mean (DS-FL uses 0.1).
    sharpen_temperature: float = 0.1

    def check(self) -> None:
        super().check()
        check_positive("confidence_temperature", self.confidence_temperature)
        check_positive("sharpen_temperature", self.sharpen_temperature)


class EntropyWeightedDSFL(Strategy):
    """DS-FL whose teacher weights each client's probabilities by its confidence per input."""

    name = "entropy_weighted_dsfl"
    Params = EntropyWeightedParams
    # Clients upload logits on proxy inputs; the teacher is not a plain mean, so it does not
    # support the Gaussian release of one (teacher_release stays False).
    capabilities = Capabilities(uploads=("logits",), needs_proxy=True, logit_teacher=True)

    def __init__(
        self,
        *args: Any,
        confidence_temperature: float = 0.5,
        sharpen_temperature: float = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.confidence_temperature = confidence_temperature
        self.sharpen_temperature = sharpen_temperature

    @classmethod
    def init_kwargs(cls, params: AlgorithmParams, context: BuildContext) -> dict[str, Any]:
        assert isinstance(params, EntropyWeightedParams)
        return {
            **super().init_kwargs(params, context),
            "confidence_temperature": params.confidence_temperature,
            "sharpen_temperature": params.sharpen_temperature,
        }

    def build_teacher(self, logits: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        """The teacher from the clients' logits ``(K, N, C)``, as logits ``(N, C)``."""
        probs = torch.softmax(logits, dim=-1)
        entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(dim=-1)  # (K, N)
        trust = torch.softmax(-entropy / self.confidence_temperature, dim=0)  # over clients
        mean = (trust.unsqueeze(-1) * probs).sum(dim=0)
        return torch.log_softmax(mean / self.sharpen_temperature, dim=-1)
