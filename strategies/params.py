"""What an algorithm declares about itself: its parameters and its capabilities.

Every algorithm (a `strategies.base.Strategy` subclass) names a ``Params`` dataclass, into which
the spec's ``[algorithm]`` table is read (every key but ``name``), and a `Capabilities` value
saying what it needs and supports. The spec's checks, the assembly and the apps read these
instead of testing algorithm names, so that an algorithm written outside fedkd (an import path
or an entry point, `strategies.registry`) is checked and assembled like a built-in one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedkd.knowledge import (
    CONFIDENCE_KINDS,
    CONFIDENCE_TEACHERS,
    HISTOGRAM_TEACHERS,
    TEACHER_KINDS,
)


class ParamError(ValueError):
    """A bad parameter value, phrased as ``key: problem`` (the spec prefixes ``algorithm.``)."""


def check_positive(key: str, value: float, *, zero_ok: bool = False) -> None:
    """Raise `ParamError` unless ``value`` is > 0 (or >= 0 with ``zero_ok``)."""
    if math.isnan(value) or value < 0 or (value == 0 and not zero_ok):
        raise ParamError(f"{key}: must be {'>= 0' if zero_ok else '> 0'}, got {value}")


def check_one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    """Raise `ParamError` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ParamError(f"{key}: '{value}' is not one of {', '.join(allowed)}")


@dataclass
class AlgorithmParams:
    """An algorithm's parameters: the ``[algorithm]`` keys besides ``name`` (none here).

    Subclasses add fields with defaults (every spec key has one) and extend `check`.
    """

    def check(self) -> None:
        """Raise `ParamError` naming the first bad value; cross-section rules (what the rest of
        the spec must provide) follow from `Capabilities` and are checked by the spec."""

    def trains_outside_dpsgd(self) -> str:
        """``key: problem`` of an option under which the clients train on private data outside
        DP-SGD (the spec refuses it with ``privacy.dpsgd``); "" where there is none."""
        return ""


@dataclass
class SelfTrainingParams(AlgorithmParams):
    """A server student that labels unlabelled proxy inputs it is sure of (0: off)."""

    self_training_confidence: float = 0.0
    self_training_iterations: int = 1

    def check(self) -> None:
        super().check()
        check_positive("self_training_iterations", self.self_training_iterations)
        if not 0 <= self.self_training_confidence <= 1:
            raise ParamError(
                f"self_training_confidence: must be in [0, 1], got {self.self_training_confidence}"
            )


@dataclass
class TeacherParams(SelfTrainingParams):
    """A teacher built from the clients' logits on proxy inputs (`fedkd.knowledge.teachers`)."""

    teacher: str = ""  # "" = the algorithm's own default
    era_temperature: float = 0.1
    trim_fraction: float = 0.2
    # Teacher "pooled_likelihood": a client holds a class when its released count of it is
    # above this (about twice privacy.histogram_noise).
    held_class_count: float = 100.0
    # Weigh each client per proxy input by its confidence there (CONFIDENCE_KINDS).
    teacher_confidence: str = "none"
    # Teacher "class_weighted": weigh each client per proxy input also by how much the
    # ensemble's prediction there agrees with its released label histogram.
    teacher_prior_agreement: bool = False
    # Clients distill towards the teacher mixed with their own earlier model's logits, this
    # share of them (strategies.self_distill; 0: off).
    self_distill_weight: float = 0.0
    # Deep mutual learning (strategies.mutual; 0: off): each client's local model learns from
    # its meme model with this weight, the meme from the local model with mutual_meme_weight.
    mutual_weight: float = 0.0
    mutual_meme_weight: float = 1.0
    # Histogram teachers: rescale the teacher so its class totals on the inputs it labels follow
    # the pooled prior of the released label histograms.
    match_class_prior: bool = False

    def check(self) -> None:
        super().check()
        if self.teacher:
            check_one_of("teacher", self.teacher, TEACHER_KINDS)
        check_positive("era_temperature", self.era_temperature)
        if not 0 <= self.trim_fraction < 0.5:
            raise ParamError(f"trim_fraction: must be in [0, 0.5), got {self.trim_fraction}")
        if self.held_class_count < 0:
            raise ParamError(
                f"held_class_count: must be >= 0 (a count), got {self.held_class_count}"
            )
        check_one_of("teacher_confidence", self.teacher_confidence, CONFIDENCE_KINDS)
        if self.teacher_prior_agreement and self.teacher != "class_weighted":
            raise ParamError(
                "teacher_prior_agreement: it weighs clients by their released label histograms; "
                "set algorithm.teacher to class_weighted, or remove it"
            )
        if not 0 <= self.self_distill_weight < 1:
            raise ParamError(
                f"self_distill_weight: must be in [0, 1) (the earlier model's share of the "
                f"teacher), got {self.self_distill_weight}"
            )
        for key in ("mutual_weight", "mutual_meme_weight"):
            if not 0 <= getattr(self, key) < math.inf:
                raise ParamError(f"{key}: must be a finite number >= 0, got {getattr(self, key)}")
        if self.teacher_confidence != "none" and self.teacher not in ("", *CONFIDENCE_TEACHERS):
            raise ParamError(
                f"teacher_confidence: teacher '{self.teacher}' weighs no examples; choose one "
                f"of {', '.join(CONFIDENCE_TEACHERS)} or remove teacher_confidence"
            )
        if self.match_class_prior and self.teacher not in HISTOGRAM_TEACHERS:
            raise ParamError(
                "match_class_prior: the prior comes from the clients' label histograms; "
                "set algorithm.teacher to class_weighted or pooled_likelihood, or remove it"
            )

    def trains_outside_dpsgd(self) -> str:
        """Mutual learning's meme model trains on private data outside DP-SGD."""
        if self.mutual_weight > 0:
            return (
                "mutual_weight: mutual learning trains each client's two models on its private "
                "data outside DP-SGD; set it to 0 or turn privacy.dpsgd off"
            )
        return super().trains_outside_dpsgd()


def teacher_kind(params: AlgorithmParams) -> str:
    """The teacher an algorithm's parameters name ("" where it has none or its default)."""
    return params.teacher if isinstance(params, TeacherParams) else ""


def teacher_confidence(params: AlgorithmParams) -> str:
    """The per-input confidence weighting of the parameters' teacher ("none" without one)."""
    return params.teacher_confidence if isinstance(params, TeacherParams) else "none"


# What the server student is to an algorithm.
SERVER_STUDENT_ROLES = ("unused", "optional", "required", "own")


@dataclass(frozen=True)
class Capabilities:
    """What an algorithm needs and supports, declared as data.

    Parameters
    ----------
    uploads : tuple of str, default ()
        Names of the arrays a client uploads that its student computes from its private data
        (``"logits"``, per-class statistics...): where the run claims privacy but the students
        train without DP-SGD, they are unprotected releases. Arrays that a privacy mechanism
        releases (noisy histograms, noisy votes) are not listed.
    uploads_weights : bool, default False
        Clients upload their student's weights (every client needs the same architecture; the
        weights are an unprotected release unless DP-SGD trains them).
    uses_clients : bool, default True
        False where the server trains alone (no client messages at all).
    client_students : bool, default True
        Clients hold one student each, evaluated on the test sets and auditable (False for
        teacher ensembles).
    needs_proxy : bool, default False
        Uses the unlabelled proxy set (``data.proxy_size`` > 0).
    server_student : str, default "optional"
        ``"unused"``: none is built; ``"optional"``: distilled when ``server.student`` names
        one; ``"required"``: the algorithm needs ``server.student``; ``"own"``: the algorithm
        trains the global model itself like a client's (on ``train``'s settings).
    logit_teacher : bool, default False
        Builds a teacher from the clients' logits on proxy inputs (its accuracy is reported, and
        the confident-labels server student applies).
    teacher_release : bool, default False
        Its teacher can be released through the client-level Gaussian mechanism (a noisy mean
        of the clients' probabilities, ``privacy.release_noise``).
    supports_dpsgd : bool, default True
        Its clients' training on private data can run under DP-SGD.
    always_private : bool, default False
        Its releases go through a privacy mechanism whatever the spec says (accounted always).
    default_distill_loss : str, default "kl"
        The clients' distillation loss when ``distill.loss`` names none.
    """

    uploads: tuple[str, ...] = ()
    uploads_weights: bool = False
    uses_clients: bool = True
    client_students: bool = True
    needs_proxy: bool = False
    server_student: str = "optional"
    logit_teacher: bool = False
    teacher_release: bool = False
    supports_dpsgd: bool = True
    always_private: bool = False
    default_distill_loss: str = "kl"

    def __post_init__(self) -> None:
        if self.server_student not in SERVER_STUDENT_ROLES:
            raise ValueError(
                f"Capabilities.server_student: '{self.server_student}' is not one of "
                f"{', '.join(SERVER_STUDENT_ROLES)}"
            )
