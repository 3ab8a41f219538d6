"""Per-client privacy ledger: a JSON-serialisable list of privacy events.

Every mechanism that touches a client's private data appends one event to that client's
ledger. The ledger only *records*; :mod:`fedkd.privacy.accountant` turns the events into an
epsilon with dp-accounting. Keeping the two apart means a saved ledger can be re-accounted
later (e.g. by ``fedkd report`` or a test) with a fresh accountant and nothing else.

Units: every event is normalised by the L2 sensitivity of the mechanism under the
add-or-remove-one-example relation on the client's data (the relation Opacus uses), so a
``noise_multiplier`` here always means ``noise std / sensitivity``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import dp_accounting

__all__ = [
    "DpSgdEvent",
    "GaussianReleaseEvent",
    "PateQueryEvent",
    "PrivacyEvent",
    "PrivacyLedger",
    "UnprotectedReleaseEvent",
    "event_from_dict",
]


def _check_round(value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"round must be a non-negative int, got {value!r}")


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def _check_noise(value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class DpSgdEvent:
    """``steps`` DP-SGD steps with Poisson sampling and Gaussian noise (Opacus).

    Parameters
    ----------
    sample_rate : float
        Poisson sampling probability of each example per step (``batch_size / n``).
    noise_multiplier : float
        Noise std divided by ``max_grad_norm``.
    steps : int
        Number of optimizer steps taken with these parameters.
    round : int, default 0
        Federated round in which the steps were taken (bookkeeping only).
    """

    sample_rate: float
    noise_multiplier: float
    steps: int
    round: int = 0
    kind: ClassVar[str] = "dp_sgd"

    def __post_init__(self) -> None:
        q = self.sample_rate
        if not (isinstance(q, int | float) and math.isfinite(q) and 0.0 <= q <= 1.0):
            raise ValueError(f"sample_rate must lie in [0, 1], got {q!r}")
        _check_noise(self.noise_multiplier)
        _check_count("steps", self.steps)
        _check_round(self.round)

    def dp_event(self) -> dp_accounting.DpEvent:
        """The dp-accounting event for these steps."""
        import dp_accounting  # here: seconds to import, and only accounting needs it

        return dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(
                self.sample_rate, dp_accounting.GaussianDpEvent(self.noise_multiplier)
            ),
            self.steps,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, with ``kind``."""
        return {
            "kind": self.kind,
            "sample_rate": float(self.sample_rate),
            "noise_multiplier": float(self.noise_multiplier),
            "steps": int(self.steps),
            "round": int(self.round),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DpSgdEvent:
        """Inverse of :meth:`to_dict`."""
        _expect_kind(d, cls.kind)
        return cls(
            sample_rate=float(d["sample_rate"]),
            noise_multiplier=float(d["noise_multiplier"]),
            steps=int(d["steps"]),
            round=int(d.get("round", 0)),
        )


@dataclass(frozen=True)
class GaussianReleaseEvent:
    """``count`` Gaussian-mechanism releases of a sensitivity-bounded quantity.

    Parameters
    ----------
    noise_multiplier : float
        Noise std divided by the release's L2 sensitivity. For the clipped teacher release,
        build it with :func:`fedkd.privacy.gaussian_release.gaussian_release_event`, which
        converts the spec's noise multiplier (std / clip) for the chosen privacy unit.
    count : int, default 1
        Number of such releases.
    round : int, default 0
        Federated round of the release (bookkeeping only).
    """

    noise_multiplier: float
    count: int = 1
    round: int = 0
    kind: ClassVar[str] = "gaussian_release"

    def __post_init__(self) -> None:
        _check_noise(self.noise_multiplier)
        _check_count("count", self.count)
        _check_round(self.round)

    def dp_event(self) -> dp_accounting.DpEvent:
        """The dp-accounting event for these releases."""
        import dp_accounting

        return dp_accounting.SelfComposedDpEvent(
            dp_accounting.GaussianDpEvent(self.noise_multiplier), self.count
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, with ``kind``."""
        return {
            "kind": self.kind,
            "noise_multiplier": float(self.noise_multiplier),
            "count": int(self.count),
            "round": int(self.round),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GaussianReleaseEvent:
        """Inverse of :meth:`to_dict`."""
        _expect_kind(d, cls.kind)
        return cls(
            noise_multiplier=float(d["noise_multiplier"]),
            count=int(d.get("count", 1)),
            round=int(d.get("round", 0)),
        )


@dataclass(frozen=True, kw_only=True)
class PateQueryEvent:
    """A batch of PATE (Confident-)GNMax queries, as Rényi-DP curves.

    PATE's data-dependent analysis (Papernot et al. 2018) has no dp-accounting mechanism, so
    the event carries its RDP curve directly; the accountant adds it to the composed RDP of the
    other events at the same orders. Build it with
    :func:`fedkd.privacy.pate.pate_query_event`.

    Parameters
    ----------
    orders : tuple of float
        Rényi orders (all > 1).
    rdp : tuple of float
        Data-dependent RDP of the whole batch at ``orders`` (Theorem 6 + Proposition 7,
        min'ed with the data-independent bound per query). A function of the private votes:
        the accountant reports it only as ``epsilon_data_dependent_unreleased``.
    data_independent_rdp : tuple of float
        Data-independent RDP of the same batch at ``orders`` (every query asked pays the
        threshold check and GNMax): what the guarantee composes.
    answered : int
        Number of queries that passed the threshold (labels released).
    queries : int
        Number of queries asked.
    round : int, default 0
        Federated round (bookkeeping only).
    """

    orders: tuple[float, ...]
    rdp: tuple[float, ...]
    data_independent_rdp: tuple[float, ...]
    answered: int
    queries: int
    round: int = 0
    kind: ClassVar[str] = "pate_query"

    def __post_init__(self) -> None:
        # Accept lists/arrays from callers, store hashable tuples of plain floats.
        for name in ("orders", "rdp", "data_independent_rdp"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        n = len(self.orders)
        if n == 0:
            raise ValueError("PateQueryEvent needs at least one RDP order")
        if len(self.rdp) != n or len(self.data_independent_rdp) != n:
            raise ValueError(
                "orders, rdp and data_independent_rdp must have the same length, got "
                f"{n}, {len(self.rdp)}, {len(self.data_independent_rdp)}"
            )
        if any(not (o > 1.0 and math.isfinite(o)) for o in self.orders):
            raise ValueError("PATE RDP orders must be finite and > 1")
        for name in ("rdp", "data_independent_rdp"):
            if any(not (v >= 0.0) for v in getattr(self, name)):  # also rejects NaN
                raise ValueError(f"{name} must be >= 0 at every order")
        _check_count("queries", self.queries)
        _check_count("answered", self.answered)
        if self.answered > self.queries:
            raise ValueError(f"answered ({self.answered}) > queries ({self.queries})")
        _check_round(self.round)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, with ``kind``."""
        return {
            "kind": self.kind,
            "orders": list(self.orders),
            "rdp": list(self.rdp),
            "data_independent_rdp": list(self.data_independent_rdp),
            "answered": int(self.answered),
            "queries": int(self.queries),
            "round": int(self.round),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PateQueryEvent:
        """Inverse of :meth:`to_dict`."""
        _expect_kind(d, cls.kind)
        return cls(
            orders=d["orders"],
            rdp=d["rdp"],
            data_independent_rdp=d["data_independent_rdp"],
            answered=int(d["answered"]),
            queries=int(d["queries"]),
            round=int(d.get("round", 0)),
        )


@dataclass(frozen=True)
class UnprotectedReleaseEvent:
    """Values computed from the client's private data left it with no mechanism behind them.

    Nothing bounds what such a release reveals, so the accountant composes it as an infinite
    epsilon: a ledger that holds one reports ``epsilon = inf``, whatever else it holds.

    Parameters
    ----------
    values : str
        What left the client unprotected (e.g. ``"train.logits, evaluate.test_logits"``).
    round : int, default 0
        Federated round of the (first) release.
    """

    values: str
    round: int = 0
    kind: ClassVar[str] = "unprotected_release"

    def __post_init__(self) -> None:
        if not isinstance(self.values, str) or not self.values:
            raise ValueError(f"values must name what was released, got {self.values!r}")
        _check_round(self.round)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, with ``kind``."""
        return {"kind": self.kind, "values": self.values, "round": int(self.round)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UnprotectedReleaseEvent:
        """Inverse of :meth:`to_dict`."""
        _expect_kind(d, cls.kind)
        return cls(values=str(d["values"]), round=int(d.get("round", 0)))


PrivacyEvent = DpSgdEvent | GaussianReleaseEvent | PateQueryEvent | UnprotectedReleaseEvent

_EVENT_TYPES: dict[str, type] = {
    DpSgdEvent.kind: DpSgdEvent,
    GaussianReleaseEvent.kind: GaussianReleaseEvent,
    PateQueryEvent.kind: PateQueryEvent,
    UnprotectedReleaseEvent.kind: UnprotectedReleaseEvent,
}


def _expect_kind(d: dict[str, Any], kind: str) -> None:
    if d.get("kind") != kind:
        raise ValueError(f"expected an event of kind {kind!r}, got {d.get('kind')!r}")


def event_from_dict(d: dict[str, Any]) -> PrivacyEvent:
    """Rebuild any ledger event from its ``to_dict`` form, dispatching on ``kind``.

    Parameters
    ----------
    d : dict
        Output of an event's ``to_dict``.

    Returns
    -------
    PrivacyEvent
        The event.
    """
    kind = d.get("kind")
    if kind not in _EVENT_TYPES:
        raise ValueError(
            f"unknown privacy event kind {kind!r}; expected one of {sorted(_EVENT_TYPES)}"
        )
    return _EVENT_TYPES[kind].from_dict(d)


@dataclass
class PrivacyLedger:
    """Every privacy-relevant event of one client, in the order they happened.

    Parameters
    ----------
    client_id : int
        The client (partition id) the ledger belongs to.
    events : list of PrivacyEvent
        Recorded events.
    budget_epsilon : float or None, default None
        The client's epsilon budget; ``None`` means unlimited.
    delta : float, default 1e-5
        The delta at which epsilon is reported.
    """

    client_id: int
    events: list[PrivacyEvent] = field(default_factory=list)
    budget_epsilon: float | None = None
    delta: float = 1e-5

    def __post_init__(self) -> None:
        if not (0.0 < self.delta < 1.0):
            raise ValueError(f"delta must lie in (0, 1), got {self.delta!r}")
        if self.budget_epsilon is not None and not (self.budget_epsilon > 0):
            raise ValueError(f"budget_epsilon must be > 0 or None, got {self.budget_epsilon!r}")
        self.events = list(self.events)
        for e in self.events:
            _check_event(e)

    def add(self, event: PrivacyEvent) -> None:
        """Append one event."""
        _check_event(event)
        self.events.append(event)

    def extend(self, events: list[PrivacyEvent]) -> None:
        """Append several events."""
        for e in events:
            self.add(e)

    def copy(self) -> PrivacyLedger:
        """A shallow copy (events are immutable)."""
        return PrivacyLedger(self.client_id, list(self.events), self.budget_epsilon, self.delta)

    @property
    def has_unprotected(self) -> bool:
        """Whether an unprotected release is recorded (then epsilon is infinite)."""
        return any(isinstance(e, UnprotectedReleaseEvent) for e in self.events)

    @property
    def has_pate(self) -> bool:
        """Whether any PATE event is recorded (then epsilon is RDP-based)."""
        return any(isinstance(e, PateQueryEvent) for e in self.events)

    def pate_events(self) -> list[PateQueryEvent]:
        """The PATE events, in order."""
        return [e for e in self.events if isinstance(e, PateQueryEvent)]

    def dp_events(self) -> dp_accounting.DpEvent:
        """The DP-SGD and Gaussian events as one dp-accounting event, one per ledger event.

        Returns
        -------
        dp_accounting.ComposedDpEvent
            ``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), steps)``
            per DP-SGD event and ``SelfComposedDpEvent(GaussianDpEvent(sigma), count)`` per
            Gaussian release. PATE events (no dp-accounting mechanism) and unprotected releases
            (no mechanism at all: see `has_unprotected`) are left out.
        """
        import dp_accounting

        return dp_accounting.ComposedDpEvent(
            [e.dp_event() for e in self.events if isinstance(e, DpSgdEvent | GaussianReleaseEvent)]
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "client_id": int(self.client_id),
            "budget_epsilon": None if self.budget_epsilon is None else float(self.budget_epsilon),
            "delta": float(self.delta),
            "events": [e.to_dict() for e in self.events],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PrivacyLedger:
        """Inverse of :meth:`to_dict`."""
        return cls(
            client_id=int(d["client_id"]),
            events=[event_from_dict(e) for e in d.get("events", [])],
            budget_epsilon=None if d.get("budget_epsilon") is None else float(d["budget_epsilon"]),
            delta=float(d["delta"]),
        )

    def to_json(self, indent: int | None = None) -> str:
        """Serialise to a JSON string (floats round-trip exactly)."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> PrivacyLedger:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))


def _check_event(event: object) -> None:
    if not isinstance(event, tuple(_EVENT_TYPES.values())):
        raise TypeError(f"not a privacy event: {event!r}")
