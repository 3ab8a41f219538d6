"""FedDF-logit: ensemble distillation into a server student, fed by logits only.

FedDF (Lin et al., 2020) distills the ensemble of client models into a server model on unlabeled
data. Here clients never send weights: the ensemble is the average of their logits on the proxy
subset, the server student is distilled from it (KL at temperature T), and clients distill either
from the ensemble or from the server student's logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from strategies.base import BuildContext, LogitTeacherStrategy
from strategies.params import AlgorithmParams, Capabilities, TeacherParams, check_one_of

CLIENT_TEACHERS = ("ensemble", "server_student")


@dataclass
class FedDFParams(TeacherParams):
    """FedDF-logit's parameters: the teacher's, and what clients distill from."""

    client_teacher: str = "ensemble"  # one of CLIENT_TEACHERS

    def check(self) -> None:
        super().check()
        check_one_of("client_teacher", self.client_teacher, CLIENT_TEACHERS)


class FedDFLogit(LogitTeacherStrategy):
    """FedDF with a logit ensemble.

    Parameters
    ----------
    client_teacher : {"ensemble", "server_student"}, default "ensemble"
        What clients distill from.
    **kwargs
        See `strategies.base.Strategy`; a ``server_student`` is required.
    """

    name = "feddf"
    Params = FedDFParams
    capabilities = Capabilities(
        uploads=("logits",),
        needs_proxy=True,
        server_student="required",
        logit_teacher=True,
        teacher_release=True,
    )

    def __init__(
        self, *args, client_teacher: str = "ensemble", teacher: str = "mean_logits", **kwargs
    ) -> None:
        super().__init__(*args, teacher=teacher, **kwargs)
        if self.server_student is None:
            raise ValueError("feddf needs a server student (spec: server.student)")
        self.client_teacher = client_teacher

    @classmethod
    def init_kwargs(cls, params: AlgorithmParams, context: BuildContext) -> dict[str, Any]:
        assert isinstance(params, FedDFParams)
        return {**super().init_kwargs(params, context), "client_teacher": params.client_teacher}

    def digest_payload(self, round_num: int) -> dict[str, np.ndarray] | None:
        payload = super().digest_payload(round_num)
        if payload is None or self.client_teacher == "ensemble":
            return payload
        student_logits = self.server_student.logits(self.proxy_set()[self._proxy_idx])
        payload["teacher_logits"] = student_logits.numpy().astype(np.float32)
        return payload
