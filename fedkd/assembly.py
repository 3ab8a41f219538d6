"""Turn a spec into the objects of the layers below (data, learner config, strategy)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedkd.data.canaries import with_canaries
from fedkd.data.placement import balanced_groups
from fedkd.data.proxy import ProxySource
from fedkd.data.site import SITE_KEY, load_site_data
from fedkd.data.sources import DataError
from fedkd.data.splits import FederatedData, load_federated_data
from fedkd.faults import byzantine_clients, with_flipped_labels
from fedkd.knowledge import HISTOGRAM_TEACHERS
from fedkd.learner.cohort import CohortConfig
from fedkd.learner.device import resolve_device
from fedkd.learner.generator import ProxyGenerator
from fedkd.learner.loop import PHASE_EVAL, OptimConfig, StepConfig, derive_seed
from fedkd.learner.server_student import ServerStudent
from fedkd.privacy.dpsgd import DpSgdSettings
from fedkd.privacy.gaussian_release import GaussianRelease
from fedkd.privacy.label_histogram import LabelHistogramRelease
from fedkd.privacy.ledger import PrivacyEvent
from fedkd.spec import Spec, resolve_path
from strategies import Strategy
from strategies.base import BuildContext
from strategies.params import teacher_kind

if TYPE_CHECKING:
    from fedkd.privacy.book import LedgerBook


def federated_data(spec: Spec) -> FederatedData:
    """The run's data; cached per process, so every actor builds it once.

    With ``audit.canaries``, the audited client's private data carries the one-run audit's
    canaries (each inserted with probability 1/2, reproducibly from the seed). With
    ``faults.attack = "label_flip"``, the Byzantine clients' private training labels are
    flipped (`fedkd.faults.with_flipped_labels`).
    """
    d = spec.data
    data = load_federated_data(
        source=d.source,
        path=str(resolve_path(spec, d.path)) if d.path else None,
        hf_name=d.hf_name or None,
        image_key=d.image_key or None,
        label_key=d.label_key or None,
        num_clients=spec.clients.num_clients,
        partition=d.partition,
        alpha=d.alpha,
        classes_per_client=d.classes_per_client,
        proxy_size=d.proxy_size,
        local_test_fraction=d.local_test_fraction,
        seed=spec.seed,
        validation_fraction=d.validation_fraction,
        proxy_validation_size=d.proxy_validation_size,
        proxy=run_proxy(spec),
    )
    a = spec.audit
    if a.enabled and a.canaries > 0:
        data = with_canaries(data, a.client, a.canaries, spec.seed)
    if spec.faults.attack == "label_flip":
        data = with_flipped_labels(data, run_byzantine_clients(spec))
    return data


def run_proxy(spec: Spec) -> ProxySource | None:
    """The run's proxy source, its file's path resolved; None for the in-domain proxy (so that
    its data are cached under the same key as before the proxy had a source)."""
    if spec.proxy.in_domain:
        return None
    path = str(resolve_path(spec, spec.proxy.path)) if spec.proxy.path else ""
    return dataclasses.replace(spec.proxy, path=path)


def run_byzantine_clients(spec: Spec) -> list[int]:
    """The run's Byzantine clients (none without an attack), fixed by the seed."""
    if spec.faults.attack == "none":
        return []
    return byzantine_clients(spec.seed, spec.clients.num_clients, spec.faults.byzantine_fraction)


def step_config(section) -> StepConfig:
    return StepConfig(
        epochs=section.epochs,
        batch_size=section.batch_size,
        optim=OptimConfig(
            optimizer=section.optimizer,
            lr=section.lr,
            momentum=section.momentum,
            weight_decay=getattr(section, "weight_decay", 0.0),
        ),
        lr_schedule=getattr(section, "lr_schedule", "constant"),
        epochs_schedule=tuple(getattr(section, "epochs_schedule", ())),
    )


def distill_loss(spec: Spec) -> str:
    """The clients' distillation loss: the spec's, else the algorithm's own default."""
    if spec.distill.loss:
        return spec.distill.loss
    return spec.algorithm.capabilities.default_distill_loss


def cohort_config(spec: Spec) -> CohortConfig:
    return CohortConfig(
        seed=spec.seed,
        arch_of=spec.student_for,
        private=step_config(spec.train),
        distill=step_config(spec.distill),
        distill_loss=distill_loss(spec),
        distill_temperature=spec.distill.temperature,
        distill_private_weight=spec.distill.private_weight,
        dp=dpsgd_settings(spec),
        label_histogram_noise=_noise_std(label_histogram_release(spec)),
        noise_rng=spec.privacy.noise,
    )


def learner_choice(spec: Spec, data: FederatedData, *, use_cache: bool = True) -> dict[str, Any]:
    """The cohort learner the run's nodes use, as ``summary.json`` records it.

    ``resources.learner = "auto"`` is resolved here, once per run: by `fedkd.learner.auto`'s
    calibration of each architecture the run's students use, on the device its nodes train on,
    with as many clients as a node trains in a round, at least two (nodes of one client: the
    loop, with no calibration).

    Returns
    -------
    dict
        ``requested`` (the spec's value), ``chosen`` (``loop`` or ``vectorised``: what every
        node runs) and ``calibration`` (per architecture: seconds of a round of each learner;
        None where nothing was calibrated).
    """
    requested = spec.resources.learner
    if requested != "auto":
        return {"requested": requested, "chosen": requested, "calibration": None}
    # Imported here: the vectorised learner's imports are only needed when calibrating.
    from fedkd.learner.auto import CalibrationTask, choose_learner

    c, r = spec.clients, spec.resources
    if c.clients_per_node == 1:  # nothing to vectorise
        return {"requested": requested, "chosen": "loop", "calibration": None}
    # A node's clients in a round (on average), and at least two: there is something to stack.
    sampled = min(c.num_clients, max(c.min_clients, math.ceil(c.fraction * c.num_clients)))
    per_node = max(2, min(c.clients_per_node, math.ceil(sampled / spec.num_nodes)))
    archs = list(dict.fromkeys(spec.student_for(cid) for cid in range(c.num_clients)))
    tasks = [
        CalibrationTask(
            arch=arch,
            input_shape=tuple(data.input_shape),
            num_classes=data.num_classes,
            step=step_config(spec.train),
            dp=dpsgd_settings(spec),
            clients=per_node,
            device=_node_device(spec),
            threads=r.torch_threads,
        )
        for arch in archs
    ]
    chosen, calibration = choose_learner(tasks, use_cache=use_cache)
    return {"requested": requested, "chosen": chosen, "calibration": calibration or None}


def _node_device(spec: Spec) -> str:
    """The device the run's nodes train on: CUDA where asked for, or where ``auto`` finds it
    and nodes are given GPUs; else the CPU."""
    r = spec.resources
    if r.device != "auto":
        return r.device
    return resolve_device("auto").type if r.num_gpus > 0 else "cpu"


def label_histogram_release(spec: Spec) -> LabelHistogramRelease | None:
    """The mechanism of the clients' label histograms; None where the teacher needs none."""
    if teacher_kind(spec.algorithm.params) not in HISTOGRAM_TEACHERS:
        return None
    return LabelHistogramRelease(noise_std=spec.privacy.histogram_noise)


def _noise_std(histograms: LabelHistogramRelease | None) -> float | None:
    return None if histograms is None else histograms.noise_std


def teacher_release(spec: Spec) -> GaussianRelease | None:
    """The Gaussian release of the teacher (``privacy.release_*``); None when it is off."""
    p = spec.privacy
    if p.release_noise <= 0:
        return None
    return GaussianRelease(clip_norm=p.release_clip, noise_multiplier=p.release_noise)


def dpsgd_settings(spec: Spec) -> DpSgdSettings | None:
    p = spec.privacy
    if not p.dpsgd:
        return None
    return DpSgdSettings(
        max_grad_norm=p.max_grad_norm,
        delta=p.delta,
        noise_multiplier=p.noise_multiplier,
        target_epsilon=p.target_epsilon,
        planned_epochs=step_config(spec.train).epochs_through(spec.rounds),
        other_releases=_other_releases(spec),
    )


def _other_releases(spec: Spec) -> tuple[PrivacyEvent, ...]:
    """A client's charges besides DP-SGD over the whole run, at their most (it may take part in
    every round), which DP-SGD's calibration leaves room for: the label histogram of the
    class-weighted teacher (once) and the Gaussian teacher release (every round)."""
    events: list[PrivacyEvent] = []
    histograms = label_histogram_release(spec)
    if histograms is not None and histograms.noise_std > 0:
        events.append(histograms.event())
    release = teacher_release(spec)
    if release is not None:
        events.append(release.event(0, count=spec.rounds))
    return tuple(events)


def unprotected_outputs(spec: Spec) -> list[str]:
    """What the clients of a run that claims privacy send with no mechanism behind it.

    With a mechanism on (a ledger book) but no DP-SGD, the students train on private data
    unprotected, and every value they compute that leaves a client (uploads, test logits and
    accuracy, exported weights) is an unprotected release: such a client's epsilon is infinite.

    Parameters
    ----------
    spec : Spec
        The run's spec.

    Returns
    -------
    list of str
        ``part.key`` names of those values; empty when the run has none (DP-SGD on, or no
        mechanism and so no privacy claim).
    """
    p = spec.privacy
    if p.dpsgd or not p.enabled(spec.algorithm.name):
        return []
    caps = spec.algorithm.capabilities
    values = []
    values += [f"train.{name}" for name in caps.uploads]
    if caps.uploads_weights:
        values.append("train.<student weights>")
    if caps.uses_clients and caps.client_students:
        values += ["evaluate.test_logits", "evaluate.test_acc"]
    if spec.audit.enabled and caps.uses_clients:
        values.append("export.<student weights>")
    return values


def ledger_book(spec: Spec) -> LedgerBook | None:
    """The run's privacy ledgers, or None when no mechanism is on."""
    if not spec.privacy.enabled(spec.algorithm.name):
        return None
    from fedkd.privacy.book import LedgerBook  # the accountants: seconds, server side only

    return LedgerBook(
        delta=spec.privacy.delta, budget_epsilon=spec.privacy.budget, noise_rng=spec.privacy.noise
    )


def hosted_clients(spec: Spec, partition_id: int, num_partitions: int) -> list[int]:
    """Clients node `partition_id` of `num_partitions` hosts.

    One client per node: client `partition_id`. Cohorts: groups balanced by training
    examples (`balanced_groups` over the run's partition), so that no node waits on a busier
    one; every node computes the same split from the spec.
    """
    n = spec.clients.num_clients
    if num_partitions >= n:
        return [partition_id] if partition_id < n else []
    sizes = [c.num_examples for c in federated_data(spec).clients]
    return balanced_groups(sizes, num_partitions)[partition_id]


def node_clients(spec: Spec, node_config: Mapping[str, Any]) -> list[int]:
    """The clients a SuperNode hosts, from its ``partition-id`` and ``num-partitions``."""
    partition_id = int(node_config.get("partition-id", 0))
    num_partitions = int(node_config.get("num-partitions", spec.num_nodes))
    return hosted_clients(spec, partition_id, num_partitions)


# (id of the run's data, site file, its mtime, client) -> (run's data, node's data)
_NODE_DATA: dict[tuple[int, str, int, int], tuple[FederatedData, FederatedData]] = {}


def node_data(spec: Spec, node_config: Mapping[str, Any]) -> FederatedData:
    """The data a SuperNode's learner works on.

    Without ``data-path`` in the node config: the run's data (the client trains on the spec's
    partition with its id). With it, the node hosts exactly one client, which trains on the
    site's own ``.npz`` (see :mod:`fedkd.data.site`); the proxy and global test sets stay the
    spec's, since every party holds them.

    Parameters
    ----------
    spec : Spec
        The run's spec.
    node_config : Mapping
        The SuperNode's node config (``partition-id``, ``num-partitions``, ``data-path``).

    Returns
    -------
    FederatedData
        The run's data, or a copy whose hosted client's private data is the site's.

    Raises
    ------
    DataError
        If the node hosts other than one client with a site file, or the file does not fit.
    """
    data = federated_data(spec)
    path = str(node_config.get(SITE_KEY, "") or "")
    if not path:
        return data
    hosted = node_clients(spec, node_config)
    if len(hosted) != 1:
        raise DataError(
            f"node config {SITE_KEY}: a SuperNode with its own data file hosts exactly one "
            f"client, but this one hosts {len(hosted)} ({hosted[:5]}); start one SuperNode per "
            "client (clients.clients_per_node = 1, num-partitions = clients.num_clients)"
        )
    cid = hosted[0]
    try:
        mtime = Path(path).expanduser().stat().st_mtime_ns
    except OSError:
        mtime = -1  # load_site_data reports the missing file
    key = (id(data), path, mtime, cid)
    hit = _NODE_DATA.get(key)
    if hit is not None and hit[0] is data:
        return hit[1]
    site = load_site_data(
        path,
        client_id=cid,
        input_shape=data.input_shape,
        num_classes=data.num_classes,
        input_mean=data.input_mean,
        input_std=data.input_std,
        local_test_fraction=spec.data.local_test_fraction,
        seed=spec.seed,
        validation_fraction=spec.data.validation_fraction,
    )
    clients = list(data.clients)
    clients[cid] = site
    local = dataclasses.replace(data, clients=clients)
    a = spec.audit
    if a.enabled and a.canaries > 0 and a.client == cid:
        # The canaries go into the data this client really trains on: the site's.
        local = with_canaries(local, cid, a.canaries, spec.seed)
    _NODE_DATA[key] = (data, local)
    return local


def eval_test_indices(spec: Spec, num_test: int) -> np.ndarray:
    """The fixed global-test subset clients are evaluated on (the same every round)."""
    k = spec.eval.client_test_samples
    if k == 0 or k >= num_test:
        return np.arange(num_test, dtype=np.int64)
    rng = np.random.default_rng(derive_seed(spec.seed, PHASE_EVAL))
    return np.sort(rng.choice(num_test, k, replace=False)).astype(np.int64)


def build_strategy(spec: Spec, data: FederatedData) -> Strategy:
    """The algorithm's server side, built by its class from its parameters and the run's
    context (the server student as its capabilities ask, the proxy sampling, the releases)."""
    algorithm = spec.algorithm
    role = algorithm.capabilities.server_student
    server_student = None
    if role == "own":
        # Trained like a client would be, on the clients' training settings.
        server_student = ServerStudent(
            spec.server.student or spec.student_for(0),
            data.input_shape,
            data.num_classes,
            spec.seed,
            step_config(spec.train),
        )
    elif role != "unused" and spec.server.student:
        server_student = ServerStudent(
            spec.server.student,
            data.input_shape,
            data.num_classes,
            spec.seed,
            step_config(spec.server),
            temperature=spec.server.temperature,
            distill_on=spec.server.distill_on,
            proxy_size=len(data.proxy_x),
            augment_shift=spec.server.augment_shift,
        )
    generator = None
    if spec.proxy.kind == "generator":  # the spec made sure there is a server student
        generator = ProxyGenerator(
            spec.proxy,
            data.input_shape,
            spec.seed,
            spec.proxy_inputs,
            server_student.model,
        )
    context = BuildContext(
        data=data,
        seed=spec.seed,
        client_arch=spec.student_for(0),
        server_student=server_student,
        proxy_per_round=spec.distill.proxy_per_round,
        noise_rng=spec.privacy.noise,
        release=teacher_release(spec),
        label_histograms=label_histogram_release(spec),
        confident_fraction=spec.server.confident_fraction,
        generator=generator,
    )
    return algorithm.cls.from_params(algorithm.params, context)
