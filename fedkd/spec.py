"""Experiment specs: typed sections with defaults, loaded from TOML and validated.

A spec is the unit a user edits, runs, sweeps and shares. Every key has a default, so a spec
file only states what differs. Validation happens before anything starts and fails with one
line naming the key and what is allowed (`SpecError`).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import tomli_w

from fedkd.data import PARTITION_SCHEMES as PARTITIONS
from fedkd.data import SOURCES
from fedkd.data.proxy import (
    NOISE_DISTRIBUTIONS,
    PROXY_SOURCES,
    SEED_SOURCES,
    SYNTHETIC_PROXIES,
    ProxySource,
)
from fedkd.faults import ATTACKS, DEFENCES, LOGIT_ATTACKS, attacked_upload
from fedkd.faults.draws import byzantine_count
from fedkd.knowledge import DISTILL_LOSSES as LOSSES
from fedkd.knowledge import HISTOGRAM_TEACHERS
from fedkd.models import MODEL_NAMES as MODELS
from strategies.base import Strategy
from strategies.params import (
    AlgorithmParams,
    Capabilities,
    ParamError,
    teacher_confidence,
    teacher_kind,
)
from strategies.registry import BUILTIN, DEFAULT_ALGORITHM, AlgorithmNotFound, algorithm_class

# The built-in algorithms' names (`strategies.registry`; a spec may also name an import path).
ALGORITHMS = tuple(BUILTIN)
# The [algorithm] keys of the flat table every spec.toml held before each algorithm declared
# its own parameters, with their defaults then: a key the chosen algorithm does not have is
# still accepted at this value, so that old runs' spec.toml files keep loading.
LEGACY_ALGORITHM_DEFAULTS: dict[str, Any] = {
    "teacher": "",
    "era_temperature": 0.1,
    "trim_fraction": 0.2,
    "held_class_count": 100.0,
    "match_class_prior": False,
    "client_teacher": "ensemble",
    "fd_weight": 1.0,
    "teachers_per_client": 1,
    "pate_threshold": 0.0,
    "pate_sigma_threshold": 150.0,
    "pate_sigma": 40.0,
    "self_training_confidence": 0.0,
    "self_training_iterations": 1,
}
OPTIMIZERS = ("sgd", "adam")
# Cohort learners (fedkd.learner: the per-client loop, torch.func over stacked clients, or the
# faster of the two: fedkd.learner.auto.LEARNER_CHOICES) and the vectorised learner's numerics
# (fedkd.learner.device.PRECISIONS; tests check they agree).
LEARNERS = ("loop", "vectorised", "auto")
PRECISIONS = ("fp32", "tf32", "bf16")
# Sources of the privacy mechanisms' noise (fedkd.privacy.noise.NOISE_RNGS; tests check they
# agree), and which one a spec that names none gets where.
NOISE_RNGS = ("seeded", "secure")
SIMULATION_NOISE_RNG = "seeded"  # fedkd run, fedkd sweep, apps bound to a spec in-process
DEPLOYMENT_NOISE_RNG = "secure"  # fedkd submit, flwr run: specs read from Flower's run config

# Below this no node can answer a round (seconds): the value is a typo, not a deadline.
MIN_ROUND_TIMEOUT = 1.0
# Below this DP-SGD's calibration runs for many minutes per client or runs out of memory (the
# accountant's grid is a fraction of the target), and the noise it finds, hundreds of times the
# clipping norm, leaves a student that learns nothing.
MIN_TARGET_EPSILON = 0.1

# The default spec ships inside the package so `fedkd run` works from any directory.
DEFAULT_SPEC_NAME = "quickstart"


class SpecError(ValueError):
    """A spec problem, phrased as one line that names the key and what is allowed."""


@dataclass
class DataSpec:
    source: str = "digits"
    path: str = ""
    hf_name: str = ""
    image_key: str = ""
    label_key: str = ""
    partition: str = "dirichlet"
    alpha: float = 0.5
    classes_per_client: int = 2
    proxy_size: int = 500
    local_test_fraction: float = 0.1
    # Each client's validation slice, taken from its training data (0 = none): rounds and
    # hyperparameters are selected on it, never on a test set (docs/validation.md).
    validation_fraction: float = 0.1
    # Labelled proxy examples set aside to validate the server student, out of proxy_size and
    # never proxy inputs (0 = none: the proxy set stays unlabelled).
    proxy_validation_size: int = 0


@dataclass
class ClientsSpec:
    num_clients: int = 10
    clients_per_node: int = 1
    fraction: float = 1.0
    min_clients: int = 2
    # One name for all, a list cycled over client ids, or a table {"default" = ..., "3" = ...}.
    students: Any = "cnn_small"


@dataclass
class TrainSpec:
    """Local training on private data (FedMD's revisit)."""

    epochs: int = 1
    # Epochs per round, e.g. [10, 3]: round r trains the r-th value, the last one repeating.
    # Empty = `epochs` every round. DP-SGD calibrates its noise for the schedule's total.
    epochs_schedule: list[int] = field(default_factory=list)
    batch_size: int = 32
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0


@dataclass
class DistillSpec:
    """Client-side distillation from the teacher on the round's proxy subset."""

    epochs: int = 1
    batch_size: int = 64
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    temperature: float = 1.0
    loss: str = ""  # "" = the algorithm's own (FedMD: mae, others: kl)
    # Proxy inputs per round (indices into the proxy set); 0 = the whole proxy set.
    proxy_per_round: int = 0
    # > 0: each distillation batch adds this times cross-entropy on as many of the client's own
    # private examples (a private anchor: the digest keeps what private training taught).
    private_weight: float = 0.0


@dataclass
class AlgorithmSpec:
    """The ``[algorithm]`` table: ``name`` chooses the algorithm (a built-in name, an import
    path ``"package.module:ClassName"`` or an entry point, `strategies.registry`), every other
    key is one of its parameters (its class's ``Params`` dataclass, with the defaults there)."""

    name: str = DEFAULT_ALGORITHM
    params: AlgorithmParams = field(default=None, metadata={"internal": True})  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.params is None:
            self.params = self.cls.Params()

    @property
    def cls(self) -> type[Strategy]:
        """The algorithm's class."""
        return algorithm_class(self.name)

    @property
    def capabilities(self) -> Capabilities:
        return self.cls.capabilities


@dataclass
class ServerSpec:
    """The optional server student, distilled from the teacher on the proxy set."""

    student: str = "cnn_small"  # "" = no server student
    epochs: int = 2
    batch_size: int = 64
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    temperature: float = 1.0
    # "round": distill on this round's proxy subset; "seen": on every proxy input labelled so far,
    # each with its latest teacher output.
    distill_on: str = "round"
    # Random translations of up to this many pixels of the student's training images (0 = off).
    augment_shift: int = 0
    # "constant", or "cosine": every fit anneals the learning rate from lr to 0.
    lr_schedule: str = "constant"
    # > 0: learn the teacher's argmax on this fraction of each round's proxy inputs (those it is
    # most sure of within each class it predicts), then self-train on the rest
    # (algorithm.self_training_*), instead of distilling soft targets.
    confident_fraction: float = 0.0


@dataclass
class PrivacySpec:
    """Differential privacy for the clients' private data, accounted per client over the run."""

    # DP-SGD in local training (Opacus): noise from target_epsilon (calibrated once for the
    # whole planned run: all rounds, all local steps) or a fixed noise_multiplier. Off while
    # another mechanism is on, the students' outputs leave clients unprotected: epsilon inf.
    dpsgd: bool = False
    target_epsilon: float = 0.0
    noise_multiplier: float = 0.0
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    # Per-client budget; a client whose next round would exceed it stops contributing.
    # 0 = target_epsilon when calibrating, else no budget.
    budget_epsilon: float = 0.0
    # Client-level Gaussian mechanism on the teacher: each client's probability matrix on the
    # proxy subset is clipped to L2 norm release_clip, the sum gets noise once. 0 = off.
    release_noise: float = 0.0
    release_clip: float = 1.0
    # Teachers "class_weighted", "pooled_likelihood": noise std on each count of the label
    # histogram every client releases once (sensitivity 1). Required (> 0) when any mechanism
    # is on.
    histogram_noise: float = 0.0
    # Where every noise draw and Poisson sample of the mechanisms comes from: "seeded" (from
    # the seed: reproducible, and removable by anyone who knows the seed; its epsilons hold
    # for the simulation only) or "secure" (the OS CSPRNG of the party adding the noise).
    # "" = the runner's default: seeded for fedkd run / sweep, secure for fedkd submit and
    # flwr run; fedkd submit and deployed SuperNodes refuse "seeded" (docs/noise.md).
    noise_rng: str = ""

    def enabled(self, algorithm: str) -> bool:
        """Whether any mechanism is on (an `always_private` algorithm's, e.g. PATE's noisy
        votes, always is); `algorithm` is the spec's ``algorithm.name``."""
        return (
            self.dpsgd
            or self.release_noise > 0
            or self.histogram_noise > 0
            or algorithm_class(algorithm).capabilities.always_private
        )

    @property
    def noise(self) -> str:
        """The noise source a run uses: `noise_rng`, or (unset) the simulation default."""
        return self.noise_rng or SIMULATION_NOISE_RNG

    @property
    def budget(self) -> float | None:
        if self.budget_epsilon > 0:
            return self.budget_epsilon
        return self.target_epsilon if self.dpsgd and self.target_epsilon > 0 else None


@dataclass
class EvalSpec:
    every: int = 1
    # Global-test examples each client is evaluated on (0 = the whole test set).
    client_test_samples: int = 0


@dataclass
class ResourcesSpec:
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    device: str = "auto"  # auto | cpu | cuda
    # Seconds the server waits for replies in one phase; late nodes count as failed.
    round_timeout: float = 600.0
    # How a node trains its cohort: "loop" (one client after another, the reference),
    # "vectorised" (clients of one architecture together with torch.func), or "auto" (the faster
    # of the two on this machine, chosen once per run by a short calibration: docs/scale.md).
    learner: str = "loop"
    # Vectorised learner only: "fp32", "tf32" (TF32 matmuls/convolutions on CUDA) or "bf16".
    precision: str = "fp32"
    # Torch intra-op threads in every node and in the server process (0: one per CPU of
    # num_cpus, at least 1). Fixed, not left to the machine or the environment: a float sum
    # split over another number of threads rounds differently, and the same seed then gives
    # other numbers.
    num_threads: int = 0
    # MiB of client states (students and optimizers) a node keeps in its memory in a
    # simulation; the rest spill to a file per node under the run's folder (docs/scale.md).
    state_memory_mb: float = 1024.0

    @property
    def torch_threads(self) -> int:
        """The intra-op thread count the run uses (``num_threads``, or derived from num_cpus)."""
        return self.num_threads or max(1, int(self.num_cpus))


@dataclass
class OutputSpec:
    dir: str = ""  # "" = runs/<name>-<timestamp>
    plots: bool = True


@dataclass
class AuditSpec:
    """A privacy audit of one client's student when the run ends (also: ``fedkd audit RUN``)."""

    # Keep the audited client's final student (its node sends it after the last round) and
    # audit it: membership inference and, with canaries, the one-run epsilon lower bound.
    enabled: bool = False
    client: int = 0
    # One-run audit (Steinke et al. 2023): canaries drawn before training, each inserted with
    # probability 1/2 into the audited client's private data. 0 = no canaries.
    canaries: int = 0
    shadows: int = 8  # offline LiRA shadow models
    max_targets: int = 1000  # members attacked (and as many class-matched non-members)
    confidence: float = 0.95


@dataclass
class FaultsSpec:
    """Simulated faults and Byzantine clients, and a defence (docs/faults.md)."""

    # Per round and sampled client: probability that its reply is lost (a crash), that it
    # arrives `straggler_delay` seconds late (lost if that reaches resources.round_timeout),
    # and that its upload is NaN.
    crash_rate: float = 0.0
    straggler_rate: float = 0.0
    straggler_delay: float = 0.0
    nan_rate: float = 0.0
    # Fraction of the clients (a seeded choice, fixed for the run) that send `attack`'s upload.
    byzantine_fraction: float = 0.0
    attack: str = "none"  # none | random | invert | label_flip | loss_max | class_prior | top_k
    top_k: int = 2  # attack "top_k": the k most likely classes rotate
    defence: str = "none"  # none | history
    defence_decay: float = 0.5
    defence_threshold: float = 2.0

    @property
    def active(self) -> bool:
        """Whether the run injects any fault or attack, or screens uploads."""
        rates = (self.crash_rate, self.straggler_rate, self.nan_rate, self.byzantine_fraction)
        return any(rates) or self.defence != "none"


# "none" in a sweep grid turns a mechanism off at that point; these are the keys it is allowed
# on and what it sets (a point without DP-SGD, without the Gaussian release, without a budget).
SWEEP_NONE = "none"
SWEEP_NONE_MEANS: dict[str, dict[str, Any]] = {
    # No DP-SGD, and exact label histograms for a class-weighted teacher: nothing private.
    "privacy.target_epsilon": {
        "privacy.dpsgd": False,
        "privacy.target_epsilon": 0.0,
        "privacy.noise_multiplier": 0.0,
        "privacy.histogram_noise": 0.0,
    },
    "privacy.noise_multiplier": {
        "privacy.dpsgd": False,
        "privacy.target_epsilon": 0.0,
        "privacy.noise_multiplier": 0.0,
        "privacy.histogram_noise": 0.0,
    },
    "privacy.release_noise": {"privacy.release_noise": 0.0},
    "privacy.budget_epsilon": {"privacy.budget_epsilon": 0.0},
}


@dataclass
class SweepSpec:
    """`fedkd sweep`: dotted spec keys, each with a list of values; every combination is a run.

    ``grid = { "privacy.target_epsilon" = [1, 4, "none"], seed = [0, 1] }``; "none" is the point
    without that mechanism (see ``SWEEP_NONE_MEANS``).
    """

    grid: Any = field(default_factory=dict)
    # Grid keys whose values make one privacy budget: `fedkd sweep` selects the other keys
    # (seed aside) by validation accuracy within each (selection.csv). [] = the privacy.* keys.
    select_within: list[str] = field(default_factory=list)


@dataclass
class Spec:
    name: str = DEFAULT_SPEC_NAME
    seed: int = 0
    rounds: int = 10
    data: DataSpec = field(default_factory=DataSpec)
    # Where the proxy inputs come from (fedkd.data.proxy; docs/proxy.md).
    proxy: ProxySource = field(default_factory=ProxySource)
    clients: ClientsSpec = field(default_factory=ClientsSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    distill: DistillSpec = field(default_factory=DistillSpec)
    algorithm: AlgorithmSpec = field(default_factory=AlgorithmSpec)
    server: ServerSpec = field(default_factory=ServerSpec)
    privacy: PrivacySpec = field(default_factory=PrivacySpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    output: OutputSpec = field(default_factory=OutputSpec)
    audit: AuditSpec = field(default_factory=AuditSpec)
    faults: FaultsSpec = field(default_factory=FaultsSpec)
    sweep: SweepSpec = field(default_factory=SweepSpec)

    # Where relative data paths are resolved from (the spec file's folder); not part of the spec.
    base_dir: str = field(default="", metadata={"internal": True})

    @property
    def num_nodes(self) -> int:
        return math.ceil(self.clients.num_clients / self.clients.clients_per_node)

    @property
    def proxy_inputs(self) -> int:
        """Proxy inputs the run has: the in-domain proxy set less its validation slice, or
        ``proxy.size`` (0: ``data.proxy_size``) inputs of another source."""
        if self.proxy.in_domain:
            return self.data.proxy_size - self.data.proxy_validation_size
        return self.proxy.size or self.data.proxy_size

    def student_for(self, client_id: int) -> str:
        """The architecture of one client's student."""
        return student_assignment(self.clients.students, client_id)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("base_dir")
        algorithm = out["algorithm"]
        out["algorithm"] = {"name": algorithm["name"], **algorithm["params"]}
        return out

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())


def student_assignment(students: Any, client_id: int) -> str:
    if isinstance(students, str):
        return students
    if isinstance(students, list):
        return students[client_id % len(students)]
    return students.get(str(client_id), students["default"])


def _section_types(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Check one value against its declared type; ints are accepted where floats are."""
    if typ is Any:
        return value
    if typ is float and isinstance(value, int | float) and not isinstance(value, bool):
        # TOML reads inf and nan; no key means anything by them (a learning rate of inf
        # makes every upload non-finite, a timeout of inf hangs on a dead node).
        if not math.isfinite(value):
            raise SpecError(f"{key}: must be a finite number, got {value}")
        return float(value)
    if typ is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if typ is bool and isinstance(value, bool):
        return value
    if typ is str and isinstance(value, str):
        return value
    if get_origin(typ) is list and isinstance(value, list):
        (inner,) = get_args(typ)
        return [_coerce(v, inner, key) for v in value]
    name = getattr(typ, "__name__", str(typ))
    raise SpecError(f"{key}: expected {name}, got {value!r}")


def _build_section(cls: type, raw: dict[str, Any], prefix: str, base_dir: str = "") -> Any:
    hints = _section_types(cls)
    allowed = [f.name for f in fields(cls) if not f.metadata.get("internal")]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in allowed:
            where = f"[{prefix[:-1]}]" if prefix else "the top level"
            raise SpecError(
                f"unknown key '{full}' in spec; allowed in {where}: {', '.join(allowed)}"
            )
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                raise SpecError(f"{full}: expected a table [{full}], got {value!r}")
            if typ is AlgorithmSpec:
                kwargs[key] = _build_algorithm(value, base_dir)
            else:
                kwargs[key] = _build_section(typ, value, f"{full}.")
        else:
            kwargs[key] = _coerce(value, typ, full)
    return cls(**kwargs)


def _build_algorithm(raw: dict[str, Any], base_dir: str = "") -> AlgorithmSpec:
    """The [algorithm] table: the class ``name`` means, and its parameters read into its
    ``Params`` (a key of the old flat table at its old default is accepted and dropped)."""
    name = _coerce(raw.get("name", DEFAULT_ALGORITHM), str, "algorithm.name")
    try:
        cls = algorithm_class(name, base_dir or None)
    except AlgorithmNotFound as err:
        raise SpecError(f"algorithm.name: {err}") from None
    own = [f.name for f in fields(cls.Params)]
    table = {}
    for key, value in raw.items():
        if key == "name" or (key not in own and LEGACY_ALGORITHM_DEFAULTS.get(key, ...) == value):
            continue
        if key not in own:
            raise SpecError(
                f"unknown key 'algorithm.{key}' in spec; allowed in [algorithm] for '{name}': "
                f"{', '.join(['name', *own])}"
            )
        table[key] = value
    params = _build_section(cls.Params, table, "algorithm.")
    try:
        params.check()
    except ParamError as err:
        raise SpecError(f"algorithm.{err}") from None
    return AlgorithmSpec(name=name, params=params)


def _algorithms_with(capability: str) -> str:
    """The built-in algorithms whose `Capabilities` has `capability` set, for messages."""
    return ", ".join(n for n, c in BUILTIN.items() if getattr(c.capabilities, capability))


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise SpecError(f"{key}: '{value}' is not one of {', '.join(allowed)}")


def _positive(key: str, value: float, *, zero_ok: bool = False) -> None:
    if math.isnan(value) or value < 0 or (value == 0 and not zero_ok):
        bound = ">= 0" if zero_ok else "> 0"
        raise SpecError(f"{key}: must be {bound}, got {value}")


def validate(spec: Spec) -> Spec:
    """Check values and cross-field rules; return the spec or raise `SpecError`."""
    _positive("rounds", spec.rounds)
    d = spec.data
    _one_of("data.source", d.source, SOURCES)
    _one_of("data.partition", d.partition, PARTITIONS)
    _positive("data.alpha", d.alpha)
    _positive("data.classes_per_client", d.classes_per_client)
    _positive("data.proxy_size", d.proxy_size, zero_ok=True)
    if not 0 <= d.local_test_fraction < 1:
        raise SpecError(f"data.local_test_fraction: must be in [0, 1), got {d.local_test_fraction}")
    if not 0 <= d.validation_fraction < 1 - d.local_test_fraction:
        raise SpecError(
            f"data.validation_fraction: must be in [0, 1 - data.local_test_fraction) = "
            f"[0, {1 - d.local_test_fraction:g}), got {d.validation_fraction}"
        )
    if not (d.proxy_validation_size == 0 or 0 < d.proxy_validation_size < d.proxy_size):
        raise SpecError(
            "data.proxy_validation_size: must be 0 (none) or a positive number below "
            f"data.proxy_size ({d.proxy_size}; the slice comes out of the proxy set), got "
            f"{d.proxy_validation_size}"
        )
    if d.source == "npz":
        if not d.path:
            raise SpecError("data.path: required when data.source = 'npz' (path to an .npz file)")
        path = resolve_path(spec, d.path)
        if not path.is_file():
            raise SpecError(
                f"data.path: file '{path}' not found; point it at an .npz holding "
                "x_train, y_train, x_test, y_test (e.g. ../shared/data/mnist.npz)"
            )
    if d.source == "hf" and not d.hf_name:
        raise SpecError("data.hf_name: required when data.source = 'hf' (a Hugging Face data set)")

    c = spec.clients
    _positive("clients.num_clients", c.num_clients)
    _positive("clients.clients_per_node", c.clients_per_node)
    if not 0 < c.fraction <= 1:
        raise SpecError(f"clients.fraction: must be in (0, 1], got {c.fraction}")
    _positive("clients.min_clients", c.min_clients)
    if c.min_clients > c.num_clients:
        raise SpecError(
            f"clients.min_clients: {c.min_clients} exceeds clients.num_clients ({c.num_clients})"
        )
    _validate_students(c.students, c.num_clients)

    for section, cfg in (("train", spec.train), ("distill", spec.distill), ("server", spec.server)):
        _positive(f"{section}.epochs", cfg.epochs, zero_ok=True)
        _positive(f"{section}.batch_size", cfg.batch_size)
        _positive(f"{section}.lr", cfg.lr)
        _one_of(f"{section}.optimizer", cfg.optimizer, OPTIMIZERS)
    for epochs in spec.train.epochs_schedule:
        if epochs < 1:
            raise SpecError(
                f"train.epochs_schedule: every entry must be an int >= 1 (epochs of one round), "
                f"got {spec.train.epochs_schedule}; leave it empty for train.epochs every round"
            )
    _one_of("server.lr_schedule", spec.server.lr_schedule, ("constant", "cosine"))
    if not 0 <= spec.server.confident_fraction <= 1:
        raise SpecError(
            f"server.confident_fraction: must be in [0, 1], got {spec.server.confident_fraction}"
        )
    try:  # a spec built in code names its algorithm unchecked
        caps = spec.algorithm.capabilities
    except AlgorithmNotFound as err:
        raise SpecError(f"algorithm.name: {err}") from None
    if spec.server.confident_fraction > 0 and (not spec.server.student or not caps.logit_teacher):
        raise SpecError(
            "server.confident_fraction: needs a server student (server.student) and a logit "
            f"teacher ({_algorithms_with('logit_teacher')}), not '{spec.algorithm.name}'"
        )
    _positive("distill.temperature", spec.distill.temperature)
    _positive("server.temperature", spec.server.temperature)
    if spec.distill.loss:
        _one_of("distill.loss", spec.distill.loss, LOSSES)
    _positive("distill.proxy_per_round", spec.distill.proxy_per_round, zero_ok=True)
    _validate_private_anchor(spec)
    _validate_proxy(spec)
    if spec.proxy.in_domain and spec.distill.proxy_per_round > d.proxy_size:
        raise SpecError(
            f"distill.proxy_per_round: {spec.distill.proxy_per_round} exceeds data.proxy_size "
            f"({d.proxy_size})"
        )
    if spec.server.student:
        _one_of("server.student", spec.server.student, MODELS)
    _one_of("server.distill_on", spec.server.distill_on, ("round", "seen"))
    _positive("server.augment_shift", spec.server.augment_shift, zero_ok=True)

    a = spec.algorithm
    try:  # a spec built in code, not read by _build_algorithm
        a.params.check()
    except ParamError as err:
        raise SpecError(f"algorithm.{err}") from None
    if caps.server_student == "required" and not spec.server.student:
        raise SpecError(
            f"algorithm.name = '{a.name}' needs server.student (the global model it trains)"
        )
    if caps.needs_proxy and spec.proxy_inputs == 0:
        key = "data.proxy_size" if spec.proxy.in_domain else "proxy.size"
        raise SpecError(f"{key}: algorithm '{a.name}' needs a proxy set (size > 0)")
    if caps.uploads_weights:
        archs = {spec.student_for(i) for i in range(c.num_clients)}
        if len(archs) > 1:
            raise SpecError(
                f"clients.students: {a.name} averages weights and needs one architecture for "
                f"all clients, got {', '.join(sorted(archs))}"
            )

    _validate_privacy(spec)
    _validate_audit(spec)
    _validate_faults(spec)
    _validate_sweep(spec)
    _positive("eval.every", spec.eval.every)
    _positive("eval.client_test_samples", spec.eval.client_test_samples, zero_ok=True)
    r = spec.resources
    _positive("resources.num_cpus", r.num_cpus)
    _positive("resources.num_gpus", r.num_gpus, zero_ok=True)
    _one_of("resources.device", r.device, ("auto", "cpu", "cuda"))
    if r.round_timeout < MIN_ROUND_TIMEOUT:
        raise SpecError(
            f"resources.round_timeout: {r.round_timeout:g} s is too short for any node to "
            f"reply; give at least {MIN_ROUND_TIMEOUT:g} (seconds per phase, default 600)"
        )
    _positive("resources.num_threads", r.num_threads, zero_ok=True)
    _positive("resources.state_memory_mb", r.state_memory_mb, zero_ok=True)
    _one_of("resources.learner", r.learner, LEARNERS)
    _one_of("resources.precision", r.precision, PRECISIONS)
    if r.precision != "fp32" and r.learner != "vectorised":
        raise SpecError(
            f"resources.precision: '{r.precision}' needs resources.learner = 'vectorised' "
            "(the loop learner trains in fp32, and 'auto' may choose it)"
        )
    return spec


def _digests(cls: type[Strategy]) -> bool:
    """Whether an algorithm's clients distill in a digest: a logit teacher's do, as does any
    algorithm with a `client_digest` of its own."""
    return cls.capabilities.logit_teacher or cls.client_digest.__func__ is not (
        Strategy.client_digest.__func__
    )


def _validate_private_anchor(spec: Spec) -> None:
    weight = spec.distill.private_weight
    _positive("distill.private_weight", weight, zero_ok=True)
    if weight == 0:
        return
    name = spec.algorithm.name
    if not _digests(spec.algorithm.cls):
        raise SpecError(
            f"distill.private_weight: algorithm '{name}' has no client distillation for the "
            f"private anchor to join; set it to 0 or use one of {_algorithms_with('logit_teacher')}"
        )
    if spec.privacy.dpsgd:
        raise SpecError(
            "distill.private_weight: the private anchor trains on private data outside "
            "DP-SGD; set it to 0 or turn privacy.dpsgd off"
        )


def _validate_proxy(spec: Spec) -> None:
    p, d = spec.proxy, spec.data
    _one_of("proxy.source", p.source, PROXY_SOURCES)
    _one_of("proxy.synthetic", p.synthetic, SYNTHETIC_PROXIES)
    _one_of("proxy.noise", p.noise, NOISE_DISTRIBUTIONS)
    _one_of("proxy.seed_source", p.seed_source, SEED_SOURCES)
    _positive("proxy.size", p.size, zero_ok=True)
    _positive("proxy.noise_std", p.noise_std)
    _positive("proxy.mixup_alpha", p.mixup_alpha)
    if p.seed_size < 2:
        raise SpecError(
            f"proxy.seed_size: mixup mixes pairs of at least 2 seeds, got {p.seed_size}"
        )
    if p.in_domain:
        if p.size not in (0, d.proxy_size):
            raise SpecError(
                "proxy.size: the in_domain proxy is data.proxy_size examples of the private "
                "source; set data.proxy_size instead and leave proxy.size at 0"
            )
        return
    # Nothing of a proxy that is not in-domain has a label.
    if d.proxy_validation_size:
        raise SpecError(
            f"data.proxy_validation_size: a proxy from proxy.source '{p.source}' has no labels "
            "to validate the server student on; set it to 0, or use proxy.source = 'in_domain'"
        )
    key = "proxy.seed_source" if p.kind == "mixup" else "proxy.source"
    # The bundled digits are one data set whoever loads them; npz files are compared below.
    if d.source == "digits" and "digits" in p.public_sources():
        raise SpecError(
            f"{key}: '{d.source}' is the private data set (data.source), whose examples would "
            "then be public too; choose another source, or proxy.source = 'in_domain'"
        )
    if p.uses_file():
        if not p.path:
            raise SpecError(f"proxy.path: required for {key} = 'npz' (an .npz with an array x)")
        path = resolve_path(spec, p.path)
        if not path.is_file():
            raise SpecError(
                f"proxy.path: file '{path}' not found; point it at an .npz holding the proxy "
                "inputs as an array x"
            )
        if d.source == "npz" and d.path and path.resolve() == resolve_path(spec, d.path).resolve():
            raise SpecError(
                f"proxy.path: '{path}' is the private data file (data.path), whose examples "
                "would then be public too; use proxy.source = 'in_domain' to carve the proxy "
                "out of it"
            )
    if "hf" in p.public_sources():
        _validate_hf_proxy(spec, key)
    if spec.distill.proxy_per_round > spec.proxy_inputs:
        raise SpecError(
            f"distill.proxy_per_round: {spec.distill.proxy_per_round} exceeds the proxy set's "
            f"{spec.proxy_inputs} inputs (proxy.size, else data.proxy_size)"
        )
    if p.kind == "generator":
        _validate_generator(spec)


def _validate_hf_proxy(spec: Spec, key: str) -> None:
    """A proxy (or mixup seed set) of a Hugging Face data set's inputs: a data set and a split
    to read, neither of them the private data set's train or test split."""
    p, d = spec.proxy, spec.data
    if not p.hf_name:
        raise SpecError(
            f"proxy.hf_name: required for {key} = 'hf' (a Hugging Face data set, or a local "
            "folder that datasets.load_dataset reads)"
        )
    if not p.hf_split:
        raise SpecError(
            f"proxy.hf_split: required for {key} = 'hf' (the split to read, e.g. 'train')"
        )
    # The private side reads the train split (the clients' data) and the test split (the
    # evaluation's); the proxy's inputs may come from any other split of the same data set.
    if d.source == "hf" and p.hf_split in ("train", "test") and _same_hf(p.hf_name, d.hf_name):
        raise SpecError(
            f"proxy.hf_split: '{p.hf_split}' of '{p.hf_name}' is a split of the private data "
            "set (data.hf_name), whose examples would then be public too; choose another data "
            "set or split, or proxy.source = 'in_domain'"
        )


def _same_hf(a: str, b: str) -> bool:
    """Whether two hf_name values name one data set: one local folder, or one hub name."""
    folder_a, folder_b = Path(a).expanduser(), Path(b).expanduser()
    if folder_a.exists() or folder_b.exists():
        return folder_a.resolve() == folder_b.resolve()
    return a == b


def _validate_generator(spec: Spec) -> None:
    """The generator proxy: its settings, and what it needs (a server student to train against,
    a logit teacher to label its inputs) or cannot serve (inputs kept across rounds)."""
    p, caps = spec.proxy, spec.algorithm.capabilities
    for key in ("latent_dim", "generator_hidden", "generator_batch", "generator_lr"):
        _positive(f"proxy.{key}", getattr(p, key))
    for key in ("generator_steps", "generator_balance", "generator_disagreement"):
        _positive(f"proxy.{key}", getattr(p, key), zero_ok=True)
    if not caps.logit_teacher or caps.server_student in ("unused", "own"):
        raise SpecError(
            f"proxy.synthetic: 'generator' feeds a logit teacher and trains against its server "
            f"student, which algorithm '{spec.algorithm.name}' does not have; use dsfl, fedmd, "
            "feddf or relation, or another proxy"
        )
    if not spec.server.student:
        raise SpecError(
            "proxy.synthetic: 'generator' trains against the server student; set server.student"
        )
    # Each round's inputs are new: nothing labelled in an earlier round can be revisited.
    if spec.server.distill_on != "round":
        raise SpecError(
            f"server.distill_on: '{spec.server.distill_on}' revisits earlier rounds' proxy "
            "inputs, which the generator proxy replaces every round; use 'round'"
        )
    if spec.server.confident_fraction > 0:
        raise SpecError(
            "server.confident_fraction: keeps labels of earlier rounds' proxy inputs, which the "
            "generator proxy replaces every round; set it to 0"
        )
    if spec.audit.enabled:
        raise SpecError(
            "audit.enabled: the audit replays digests on a fixed proxy set, and the generator "
            "proxy has none; audit a run with another proxy"
        )


def _validate_privacy(spec: Spec) -> None:
    p = spec.privacy
    if not 0 < p.delta < 1:
        raise SpecError(f"privacy.delta: must be in (0, 1), got {p.delta}")
    if p.noise_rng:
        _one_of("privacy.noise_rng", p.noise_rng, NOISE_RNGS)
    _positive("privacy.max_grad_norm", p.max_grad_norm)
    for key in (
        "target_epsilon",
        "noise_multiplier",
        "budget_epsilon",
        "release_noise",
        "histogram_noise",
    ):
        _positive(f"privacy.{key}", getattr(p, key), zero_ok=True)
    _positive("privacy.release_clip", p.release_clip)
    if 0 < p.target_epsilon < MIN_TARGET_EPSILON:
        raise SpecError(
            f"privacy.target_epsilon: {p.target_epsilon:g} is below {MIN_TARGET_EPSILON:g}, which "
            "DP-SGD cannot be calibrated for; give a larger target (e.g. 1)"
        )
    if p.dpsgd and p.target_epsilon == 0 and p.noise_multiplier == 0:
        raise SpecError(
            "privacy.dpsgd: set privacy.target_epsilon (noise calibrated for the whole run) "
            "or privacy.noise_multiplier"
        )
    name, caps = spec.algorithm.name, spec.algorithm.capabilities
    teacher = teacher_kind(spec.algorithm.params)
    if p.dpsgd and not caps.supports_dpsgd:
        raise SpecError(
            f"privacy.dpsgd: not supported with algorithm '{name}' (its training on private "
            "data runs outside DP-SGD)"
        )
    outside = spec.algorithm.params.trains_outside_dpsgd()
    if p.dpsgd and outside:
        raise SpecError(f"algorithm.{outside}")
    if p.release_noise > 0:
        if not caps.teacher_release:
            raise SpecError(
                "privacy.release_noise: the Gaussian release needs a logit teacher "
                f"({_algorithms_with('teacher_release')}), not '{name}'"
            )
        if teacher in ("median", "trimmed_mean"):
            raise SpecError(
                "privacy.release_noise: the release is a noisy mean; "
                f"algorithm.teacher '{teacher}' cannot be released this way"
            )
        if teacher_confidence(spec.algorithm.params) != "none":
            raise SpecError(
                "privacy.release_noise: the release is a noisy plain mean; "
                "algorithm.teacher_confidence weighs clients per input: set it to 'none'"
            )

    if p.histogram_noise > 0 and teacher not in HISTOGRAM_TEACHERS:
        raise SpecError(
            "privacy.histogram_noise: only the class_weighted and pooled_likelihood teachers "
            "release label histograms; set algorithm.teacher to one of them or remove it"
        )
    if teacher in HISTOGRAM_TEACHERS:
        if p.release_noise > 0:
            raise SpecError(
                f"algorithm.teacher = '{teacher}' cannot be combined with "
                "privacy.release_noise (the release is a noisy plain mean)"
            )
        if p.enabled(name) and p.histogram_noise == 0:
            raise SpecError(
                f"algorithm.teacher = '{teacher}': the clients' exact label counts are "
                "private; set privacy.histogram_noise (noise std per count, e.g. 50)"
            )


def _validate_audit(spec: Spec) -> None:
    a = spec.audit
    if not 0 <= a.client < spec.clients.num_clients:
        raise SpecError(
            f"audit.client: {a.client} is not a client id in 0..{spec.clients.num_clients - 1}"
        )
    if a.canaries < 0 or a.canaries == 1:
        raise SpecError(f"audit.canaries: 0 (none) or at least 2, got {a.canaries}")
    _positive("audit.max_targets", a.max_targets, zero_ok=True)
    if a.shadows < 2:
        raise SpecError(f"audit.shadows: offline LiRA needs at least 2, got {a.shadows}")
    if not 0 < a.confidence < 1:
        raise SpecError(f"audit.confidence: must be in (0, 1), got {a.confidence}")
    if a.canaries > 0 and not a.enabled:
        raise SpecError("audit.canaries: canaries are only inserted with audit.enabled = true")
    caps = spec.algorithm.capabilities
    if a.enabled and not (caps.uses_clients and caps.client_students):
        raise SpecError(
            f"audit.enabled: algorithm '{spec.algorithm.name}' has no client student to audit"
        )


def _validate_faults(spec: Spec) -> None:
    f, caps, name = spec.faults, spec.algorithm.capabilities, spec.algorithm.name
    for key in ("crash_rate", "straggler_rate", "nan_rate", "byzantine_fraction"):
        value = getattr(f, key)
        if not 0 <= value < 1:
            raise SpecError(f"faults.{key}: must be in [0, 1), got {value}")
    _positive("faults.straggler_delay", f.straggler_delay, zero_ok=True)
    if f.straggler_rate > 0 and f.straggler_delay == 0:
        raise SpecError(
            "faults.straggler_delay: stragglers need a delay in seconds (> 0; at least "
            "resources.round_timeout makes their replies late)"
        )
    _one_of("faults.attack", f.attack, ("none", *ATTACKS))
    _one_of("faults.defence", f.defence, DEFENCES)
    if f.top_k < 2:
        raise SpecError(f"faults.top_k: the top-k attack rotates at least 2 classes, got {f.top_k}")
    if not 0 <= f.defence_decay < 1:
        raise SpecError(f"faults.defence_decay: must be in [0, 1), got {f.defence_decay}")
    if f.defence_threshold <= 1:
        raise SpecError(
            "faults.defence_threshold: a score is in typical-client distances (1 = typical); "
            f"give more than 1 (e.g. 2), got {f.defence_threshold}"
        )
    sent = ", ".join(caps.uploads) or ("weights" if caps.uploads_weights else "no logits")
    if f.attack == "none" and f.byzantine_fraction > 0:
        raise SpecError(
            f"faults.attack: Byzantine clients need an attack: one of {', '.join(ATTACKS)}"
        )
    if f.attack != "none":
        if byzantine_count(spec.clients.num_clients, f.byzantine_fraction) == 0:
            raise SpecError(
                f"faults.byzantine_fraction: {f.byzantine_fraction:g} of "
                f"{spec.clients.num_clients} clients is no client; raise it to at least "
                f"{0.5 / spec.clients.num_clients:.3g}"
            )
        if f.attack in LOGIT_ATTACKS and attacked_upload(caps.uploads) is None:
            raise SpecError(
                f"faults.attack: '{f.attack}' edits logit uploads, and '{name}' uploads "
                f"{sent}; use attack 'label_flip', or an algorithm that uploads logits"
            )
    if f.active and not caps.uses_clients:
        raise SpecError(f"[faults]: algorithm '{name}' has no clients to fail or attack")
    if f.defence != "none":
        if not caps.logit_teacher:
            raise SpecError(
                f"faults.defence: '{f.defence}' screens logit uploads on proxy inputs, and "
                f"'{name}' uploads {sent}; use an algorithm that uploads logits"
            )
        if spec.privacy.release_noise > 0:
            raise SpecError(
                "faults.defence: the Gaussian release counts every contributor's clipped upload "
                "once, and the defence reweights them by each other's; remove "
                "privacy.release_noise or the defence"
            )


def _spec_key_type(key: str, spec: Spec) -> Any:
    """The declared type of a dotted spec key, or SpecError naming what is allowed (the
    [algorithm] keys are `spec`'s algorithm's)."""
    cls: Any = Spec
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if cls is AlgorithmSpec and part != "name":
            cls = spec.algorithm.cls.Params
        allowed = [f.name for f in fields(cls) if not f.metadata.get("internal")]
        if cls is spec.algorithm.cls.Params:
            allowed = ["name", *allowed]
        if cls is Spec:
            allowed = [k for k in allowed if k not in ("sweep", "name", "output")]
        if part not in allowed:
            where = f"[{'.'.join(parts[:depth])}]" if depth else "the top level"
            raise SpecError(
                f"sweep.grid: unknown key '{key}'; allowed in {where}: {', '.join(allowed)}"
            )
        typ = _section_types(cls)[part]
        if dataclasses.is_dataclass(typ):
            if depth == len(parts) - 1:
                raise SpecError(f"sweep.grid: '{key}' is a table; sweep one of its keys")
            cls = typ
        elif depth < len(parts) - 1:
            raise SpecError(f"sweep.grid: '{'.'.join(parts[: depth + 1])}' is not a table")
        else:
            return typ
    raise AssertionError  # unreachable


def _flat_grid(grid: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"privacy.x": [..]}` and `privacy = {x = [..]}` (TOML's dotted keys) alike, flattened."""
    out: dict[str, Any] = {}
    for key, value in grid.items():
        if isinstance(value, dict):
            out.update(_flat_grid(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _validate_sweep(spec: Spec) -> None:
    grid = spec.sweep.grid
    if not isinstance(grid, dict):
        raise SpecError(f"sweep.grid: expected a table of key = [values], got {grid!r}")
    grid = _flat_grid(grid)
    for key, values in grid.items():
        typ = _spec_key_type(key, spec)
        if not isinstance(values, list) or not values:
            raise SpecError(f"sweep.grid.'{key}': expected a non-empty list of values")
        for value in values:
            if value == SWEEP_NONE:
                if key not in SWEEP_NONE_MEANS:
                    raise SpecError(
                        f"sweep.grid.'{key}': \"none\" is only allowed for "
                        f"{', '.join(SWEEP_NONE_MEANS)} (the point without that mechanism)"
                    )
                clash = set(SWEEP_NONE_MEANS[key]) & (set(grid) - {key})
                if clash:
                    raise SpecError(
                        f"sweep.grid.'{key}': \"none\" sets {', '.join(sorted(clash))}, which "
                        "the grid also sweeps"
                    )
                continue
            if key == "privacy.target_epsilon" and value == 0:
                raise SpecError(
                    "sweep.grid.'privacy.target_epsilon': 0 is not 'no DP'; write \"none\" for "
                    "the point without DP-SGD"
                )
            _coerce(value, typ, f"sweep.grid.'{key}'")
    spec.sweep.grid = grid
    choices = [k for k in grid if k != "seed"]
    for key in spec.sweep.select_within:
        if key not in choices:
            raise SpecError(
                f"sweep.select_within: '{key}' is not a key of sweep.grid (seed aside); "
                f"choose among: {', '.join(choices) or 'none (the grid has no other key)'}"
            )


def _validate_students(students: Any, num_clients: int) -> None:
    key = "clients.students"
    if isinstance(students, str):
        _one_of(key, students, MODELS)
    elif isinstance(students, list):
        if not students:
            raise SpecError(f"{key}: the list is empty; give at least one of {', '.join(MODELS)}")
        for name in students:
            _one_of(key, str(name), MODELS)
    elif isinstance(students, dict):
        if "default" not in students:
            raise SpecError(f"{key}: a table needs a 'default' entry, e.g. default = 'cnn_small'")
        for cid, name in students.items():
            if cid != "default" and not (cid.isdigit() and int(cid) < num_clients):
                raise SpecError(f"{key}.{cid}: not a client id in 0..{num_clients - 1}")
            _one_of(f"{key}.{cid}", str(name), MODELS)
    else:
        raise SpecError(f"{key}: expected a model name, a list or a table, got {students!r}")


def with_noise_rng(spec: Spec, default: str = SIMULATION_NOISE_RNG) -> Spec:
    """`spec` with `default` as ``privacy.noise_rng`` where it names none: the spec as run,
    which the results folder's spec.toml records."""
    if spec.privacy.noise_rng:
        return spec
    privacy = dataclasses.replace(spec.privacy, noise_rng=default)
    return dataclasses.replace(spec, privacy=privacy)


def refuse_seeded_noise(spec: Spec, where: str) -> None:
    """Raise `SpecError` if `spec` asks for seeded noise where data is real (`where`)."""
    if spec.privacy.noise_rng == "seeded":
        raise SpecError(
            f"privacy.noise_rng: {where} refuses 'seeded' noise (anyone who knows the spec's "
            'seed can remove it); set privacy.noise_rng = "secure" or leave it unset'
        )


def resolve_path(spec: Spec, path: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_absolute() and spec.base_dir:
        p = Path(spec.base_dir) / p
    return p


def spec_from_dict(raw: dict[str, Any], base_dir: str = "") -> Spec:
    spec = _build_section(Spec, raw, "", base_dir)
    spec.base_dir = base_dir
    return validate(spec)


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse one `key.path=value`; the value is read as TOML, else as a plain string."""
    if "=" not in item:
        raise SpecError(f"--set {item!r}: expected key=value, e.g. --set rounds=5")
    key, text = item.split("=", 1)
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SpecError(f"--set {item!r}: '{part}' is not a table")
        node[path[-1]] = value
    return raw


def builtin_spec_path(name: str = DEFAULT_SPEC_NAME) -> Path:
    """A spec shipped with fedkd: the repo's simulations/ folder, or its copy in the wheel."""
    repo = Path(__file__).resolve().parents[1] / "simulations" / f"{name}.toml"
    return repo if repo.is_file() else Path(__file__).parent / "specs" / f"{name}.toml"


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_raw(spec_path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A spec file as a dict, with `extends = "other.toml"` merged in (relative to the file)."""
    if not spec_path.is_file():
        raise SpecError(f"spec file '{spec_path}' not found")
    if spec_path.resolve() in chain:
        raise SpecError(f"{spec_path}: 'extends' loops back to itself")
    try:
        raw = tomllib.loads(spec_path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise SpecError(f"{spec_path}: not valid TOML ({err})") from None
    except UnicodeDecodeError:
        raise SpecError(f"{spec_path}: not UTF-8 text; save the spec as UTF-8 TOML") from None
    except OSError as err:
        raise SpecError(f"{spec_path}: cannot read it ({err.strerror})") from None
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if not isinstance(parent, str):
        raise SpecError(f"{spec_path}: extends must be a path to another spec file")
    base = _read_raw(spec_path.parent / parent, (*chain, spec_path.resolve()))
    return _merge(base, raw)


def load_spec(path: str | Path | None = None, overrides: list[str] | None = None) -> Spec:
    """Read a spec file (None: the built-in default), apply `key=value` overrides, validate.

    Relative paths inside a spec (``data.path``) resolve from the folder of the file that was
    loaded. A spec may start from another with ``extends = "base.toml"``.
    """
    spec_path = Path(path) if path else builtin_spec_path()
    raw = _read_raw(spec_path)
    raw.setdefault("name", spec_path.stem)
    apply_overrides(raw, overrides or [])
    base_dir = spec_path.resolve().parent
    # data.path written in a base spec resolves from the base spec's folder.
    data = raw.get("data", {})
    if not isinstance(data, dict):  # `data = "digits"`: the table's key is data.source
        raise SpecError(
            f"data: expected a table [data], got {data!r}; to choose a data set write "
            "data.source, e.g. --set data.source=digits"
        )
    for table in ("data", "proxy"):
        section = raw.get(table, {})
        path = section.get("path") if isinstance(section, dict) else None
        if isinstance(path, str) and path and not Path(path).is_absolute():
            origin = _origin_of_path(spec_path, overrides or [], table)
            section["path"] = str((origin / path).resolve())
    return spec_from_dict(raw, base_dir=str(base_dir))


def _origin_of_path(spec_path: Path, overrides: list[str], table: str) -> Path:
    """The folder a relative `table`.path is relative to: the cwd for --set, else the spec file
    that sets it."""
    if any(o.split("=", 1)[0].strip() == f"{table}.path" for o in overrides):
        return Path.cwd()
    current = spec_path
    while True:
        raw = tomllib.loads(current.read_text())
        if "path" in raw.get(table, {}) or "extends" not in raw:
            return current.resolve().parent
        current = current.parent / raw["extends"]
