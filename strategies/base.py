"""What every fedkd algorithm provides: its server side to the ServerApp's round loop, its
client side to the ClientApp.

A round: the server plans the clients' local phase (`plan_local`, arrays sent with the training
request), each sampled client trains and computes its uploads (`client_round`), the server
builds its knowledge from them (`aggregate`), sends clients arrays to digest
(`digest_payload`), which they digest (`client_digest`), and reports the global model's
accuracy (`server_test_acc`); the clients' own evaluation may carry metrics of the algorithm
(`evaluate_payload`, `client_evaluate`). Every payload is a plain ``dict[str, np.ndarray]`` that the
algorithm builds and reads itself: the apps only move arrays. The client side is written
against the learner interface (`fedkd.learner.protocol.Learner`) and needs no server state
(class methods taking the algorithm's parameters). Strategies call the knowledge layer and the
server student; they run no training loop of their own and never see Flower messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from fedkd.data.splits import FederatedData
from fedkd.knowledge.teachers import HISTOGRAM_TEACHERS, build_teacher, era, match_class_prior
from fedkd.learner.cohort import ClientResult
from fedkd.learner.generator import ProxyGenerator, payload_proxy_inputs
from fedkd.learner.loop import PHASE_SAMPLE, derive_seed, seeded_generator
from fedkd.learner.protocol import Learner
from fedkd.learner.server_student import ServerStudent
from fedkd.privacy.gaussian_release import GaussianRelease
from fedkd.privacy.label_histogram import LabelHistogramRelease
from fedkd.privacy.ledger import PrivacyEvent
from fedkd.privacy.noise import NoiseSource, noise_source
from strategies.mutual import knowledge_model, train_on_private_data
from strategies.params import AlgorithmParams, Capabilities, SelfTrainingParams, TeacherParams
from strategies.self_distill import distill_with_earlier_self, keep_earlier_logits


@dataclass(frozen=True)
class BuildContext:
    """What the assembly hands an algorithm to build its server side, besides its parameters.

    Parameters
    ----------
    data : FederatedData
        The run's data.
    seed : int
        The run's seed.
    client_arch : str
        Client 0's architecture (the one every client shares where the upload is weights).
    server_student : ServerStudent or None, default None
        The global model, built as the algorithm's `Capabilities.server_student` asks.
    proxy_per_round : int, default 0
        Proxy inputs per round (0: the whole proxy set).
    noise_rng : str, default "seeded"
        Where the server's releases draw their noise from (`fedkd.privacy.noise`).
    release : GaussianRelease or None, default None
        The Gaussian release of a logit teacher (`fedkd.privacy.gaussian_release`), if the
        spec asks for it.
    label_histograms : LabelHistogramRelease or None, default None
        The mechanism of the clients' label histograms (`fedkd.privacy.label_histogram`),
        where the teacher uses them.
    confident_fraction : float, default 0.0
        The confident-labels server student (the spec's ``server.confident_fraction``).
    generator : ProxyGenerator or None, default None
        The generator proxy (``proxy.synthetic = "generator"``), trained against
        `server_student`.
    """

    data: FederatedData
    seed: int
    client_arch: str
    server_student: ServerStudent | None = None
    proxy_per_round: int = 0
    noise_rng: str = "seeded"
    release: GaussianRelease | None = None
    label_histograms: LabelHistogramRelease | None = None
    confident_fraction: float = 0.0
    generator: ProxyGenerator | None = None


def stack_uploads(updates: dict[int, ClientResult], key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack one array from every client (in client-id order) with example-count weights."""
    ids = sorted(updates)
    stacked = torch.from_numpy(np.stack([updates[c].arrays[key] for c in ids]))
    weights = torch.tensor([updates[c].metrics["num_examples"] for c in ids], dtype=torch.float32)
    return stacked, weights


def surest_per_class(teacher: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mask of the inputs the teacher is surest of: within each class it predicts, the
    `fraction` (rounded, at least one) with the highest top probability.

    Per class rather than over all inputs: a skewed ensemble is surest of a few easy classes,
    and a global cut can keep only a handful of the inputs of a hard class, which the student
    then barely learns.
    """
    conf, label = torch.softmax(teacher, dim=1).max(dim=1)
    sure = torch.zeros(len(conf), dtype=torch.bool)
    for cls in label.unique():
        members = (label == cls).nonzero().squeeze(1)
        keep = max(1, round(fraction * len(members)))
        sure[members[torch.argsort(conf[members], descending=True, stable=True)[:keep]]] = True
    return sure


class Strategy:
    """Base class: proxy subsets, teacher building and the optional server student.

    Parameters
    ----------
    data : FederatedData
        The run's data (the server uses the proxy and global test sets only).
    seed : int
        Run seed; per-round proxy subsets derive from it.
    proxy_per_round : int, default 0
        Proxy inputs sent per round; 0 = the whole proxy set.
    teacher : str, default "mean_logits"
        Teacher builder from `fedkd.knowledge.teachers.TEACHER_KINDS`.
    era_temperature : float, default 0.1
        ERA sharpening temperature (teacher "era").
    trim_fraction : float, default 0.2
        Fraction trimmed at each end (teacher "trimmed_mean").
    held_class_count : float, default 100.0
        Teacher "pooled_likelihood": label counts above this mean a client holds the class.
    teacher_confidence : str, default "none"
        Weigh each client's vote on each input by its confidence there
        (`fedkd.knowledge.teachers.client_confidence`: ``"negative_entropy"``, ``"max_prob"``),
        times its base weight (example counts, or label histograms for ``"class_weighted"``);
        ``"none"``: the base weights alone. Computed from the uploaded logits: no privacy cost.
    teacher_prior_agreement : bool, default False
        Teacher ``"class_weighted"``: also weigh each client per input by how much the
        ensemble's prediction there agrees with its released label histogram
        (`fedkd.knowledge.teachers.histogram_agreement`; post-processing of the release).
    match_class_prior : bool, default False
        Histogram teachers: rescale the teacher so that its class totals on the inputs it labels
        (each round's proxy inputs; the test set for ``teacher_test_acc``) follow the pooled
        prior of the released label histograms (`match_class_prior`; post-processing, no privacy
        cost).
    server_student : ServerStudent or None, default None
        Global model distilled from the teacher each round.
    release : GaussianRelease or None, default None
        Release the teacher through this mechanism: clip each client's probability matrix,
        sum, add noise once, then the teacher builder's post-processing (ERA's sharpening).
        Every contributing client is charged the mechanism's event.
    label_histograms : LabelHistogramRelease or None, default None
        Teachers ``"class_weighted"``, ``"pooled_likelihood"``: the mechanism of the label
        histograms clients send with their logits. Each client is charged what it says a
        received histogram costs (the first one, `one_time_events`); a client resends the
        same noisy values.
    confident_fraction : float, default 0.0
        If > 0, the server student does not distill the soft teacher: it learns the teacher's
        argmax on this fraction of each round's proxy inputs, those the teacher is most sure of
        within each class it predicts (`surest_per_class`; each input keeps its latest
        verdict), restarting from its initial weights every round,
        and self-trains on the other proxy inputs (post-processing: no privacy cost). A
        fraction rather than a probability threshold: teachers differ in how sharp they are.
    self_training_confidence : float, default 0.0
        Self-training of the server student (here, and on PATE's unanswered inputs): unlabelled
        inputs it is at least this sure of join its training set with its own labels (0: off).
    self_training_iterations : int, default 1
        How many times the student relabels those inputs and fits again.
    generator : ProxyGenerator or None, default None
        A logit teacher's proxy set is made afresh each round by this generator
        (`fedkd.learner.generator`), whose weights travel with the round's plan and digest;
        it is trained against the server student after each round's distillation.
    """

    name = "base"
    # The spec's [algorithm] table is read into this (every key but name).
    Params: ClassVar[type[AlgorithmParams]] = AlgorithmParams
    capabilities: ClassVar[Capabilities] = Capabilities()

    def __init__(
        self,
        data: FederatedData,
        seed: int,
        proxy_per_round: int = 0,
        teacher: str = "mean_logits",
        era_temperature: float = 0.1,
        trim_fraction: float = 0.2,
        held_class_count: float = 100.0,
        teacher_confidence: str = "none",
        teacher_prior_agreement: bool = False,
        match_class_prior: bool = False,
        server_student: ServerStudent | None = None,
        release: GaussianRelease | None = None,
        label_histograms: LabelHistogramRelease | None = None,
        confident_fraction: float = 0.0,
        self_training_confidence: float = 0.0,
        self_training_iterations: int = 1,
        noise_rng: str = "seeded",
        generator: ProxyGenerator | None = None,
    ) -> None:
        self.data = data
        self.generator = generator
        # The generator's payload of the round and the proxy set it makes (None: data.proxy_x).
        self._generator_payload: dict[str, np.ndarray] = {}
        self._generated_x: np.ndarray | None = None
        self._generator_metrics: dict[str, float] = {}
        self.noise_rng = noise_rng  # the server's releases: "seeded" or "secure" noise
        self.release = release
        self._release_events: dict[int, list[PrivacyEvent]] = {}
        self.label_histograms = label_histograms
        self._histograms: dict[int, np.ndarray] = {}  # latest released (charged once), per client
        self._one_time_events: dict[int, list[PrivacyEvent]] = {}
        self.confident_fraction = confident_fraction
        self.self_training_confidence = self_training_confidence
        self.self_training_iterations = self_training_iterations
        # Confident-labels student: the teacher's latest label per proxy input (-1: none).
        self._server_labels = np.full(len(data.proxy_x), -1, dtype=np.int64)
        self._server_pseudo_labelled = 0
        self.seed = seed
        self.proxy_per_round = proxy_per_round
        self.teacher = teacher
        self.era_temperature = era_temperature
        self.trim_fraction = trim_fraction
        self.held_class_count = held_class_count
        if teacher_confidence != "none" and release is not None:
            raise ValueError(
                "teacher_confidence weighs clients per input; the Gaussian release is a plain "
                "noisy mean: remove one of them"
            )
        self.teacher_confidence = teacher_confidence
        self.teacher_prior_agreement = teacher_prior_agreement
        if match_class_prior and teacher not in HISTOGRAM_TEACHERS:
            raise ValueError(
                f"match_class_prior needs the clients' label histograms, which teacher "
                f"'{teacher}' does not use: choose one of {', '.join(HISTOGRAM_TEACHERS)}"
            )
        self.match_class_prior = match_class_prior
        self.server_student = server_student
        self._proxy_idx = np.empty(0, dtype=np.int64)
        self._teacher_logits: np.ndarray | None = None

    # Attributes that are the run's inputs, rebuilt from the spec on resume: never checkpointed.
    run_inputs: ClassVar[tuple[str, ...]] = ("data",)

    def state_dict(self) -> dict[str, Any]:
        """Everything the next round depends on, for a checkpoint: by default every attribute
        but `run_inputs` (teachers kept across rounds, the server student and its optimizer,
        released histograms). Override where an attribute cannot be pickled or is rebuilt."""
        return {k: v for k, v in vars(self).items() if k not in self.run_inputs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what `state_dict` returned (on resume, into a freshly built strategy)."""
        vars(self).update(state)

    @classmethod
    def from_params(cls, params: AlgorithmParams, context: BuildContext) -> Strategy:
        """The algorithm's server side, built from its parameters and the run's context."""
        return cls(context.data, context.seed, **cls.init_kwargs(params, context))

    @classmethod
    def init_kwargs(cls, params: AlgorithmParams, context: BuildContext) -> dict[str, Any]:
        """Keyword arguments of the constructor (besides data and seed) for `from_params`."""
        kwargs: dict[str, Any] = {
            "proxy_per_round": context.proxy_per_round,
            "server_student": context.server_student,
            "noise_rng": context.noise_rng,
        }
        if context.generator is not None:
            kwargs["generator"] = context.generator
        return kwargs

    # -- helpers shared by the logit-exchanging strategies --------------------------------------
    def proxy_set(self) -> np.ndarray:
        """The proxy set the round's indices point into: the run's, or the inputs the
        generator made for the round."""
        return self.data.proxy_x if self._generated_x is None else self._generated_x

    def _sample_proxy(self, round_num: int) -> np.ndarray:
        n = self.generator.size if self.generator is not None else len(self.data.proxy_x)
        if self.proxy_per_round == 0 or self.proxy_per_round >= n:
            return np.arange(n, dtype=np.int64)
        rng = np.random.default_rng(derive_seed(self.seed, round_num, PHASE_SAMPLE, 1))
        return np.sort(rng.choice(n, self.proxy_per_round, replace=False)).astype(np.int64)

    def build_teacher(self, logits: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        teacher = build_teacher(
            self.teacher,
            logits,
            weights,
            era_temperature=self.era_temperature,
            trim_fraction=self.trim_fraction,
            held_count=self.held_class_count,
            confidence=self.teacher_confidence,
            prior_agreement=self.teacher_prior_agreement,
        )
        if self.match_class_prior:  # weights: the label histograms (K, C)
            teacher = match_class_prior(teacher, weights.clamp(min=0).sum(dim=0))
        return teacher

    def _ensemble(self, round_num: int, updates: dict[int, ClientResult]) -> None:
        """Teacher on this round's proxy subset from the clients' logits; fit the server student."""
        logits, weights = stack_uploads(updates, "logits")
        if self.teacher in HISTOGRAM_TEACHERS:
            weights = self._class_weights(round_num, updates)
        if self.release is None:
            teacher = self.build_teacher(logits, weights)
        else:
            teacher = self._released_teacher(round_num, logits, sorted(updates))
        self._teacher_logits = teacher.numpy().astype(np.float32)
        if self.server_student is None:
            return
        if self.confident_fraction > 0:
            self._fit_confident_fraction(round_num, teacher)
        else:
            self.server_student.fit(
                round_num, self.proxy_set(), self._proxy_idx, self._teacher_logits
            )
        if self.generator is not None:  # after the round's distillation, for the next round
            self._generator_metrics = self.generator.train(round_num, self.server_student.model)

    def _fit_confident_fraction(self, round_num: int, teacher: torch.Tensor) -> None:
        label = teacher.argmax(dim=1)
        sure = surest_per_class(teacher, self.confident_fraction)
        self._server_labels[self._proxy_idx] = torch.where(sure, label, -1).numpy()
        pseudo_labelled = self._fit_proxy_labels(round_num, self._server_labels)
        if pseudo_labelled is not None:
            self._server_pseudo_labelled = pseudo_labelled

    def _fit_proxy_labels(self, round_num: int, labels: np.ndarray) -> int | None:
        """The server student, from its initial weights, on the proxy inputs with a label
        (``labels >= 0``) and self-training on the others; returns how many it labelled itself,
        or None (nothing fitted) when no input has a label."""
        known = np.flatnonzero(labels >= 0)
        if len(known) == 0:
            return None
        rest = np.flatnonzero(labels < 0)
        return self.server_student.fit_self_training(
            round_num,
            self.data.proxy_x[known],
            labels[known],
            self.data.proxy_x[rest],
            self.self_training_confidence,
            self.self_training_iterations,
        )

    def _proxy_label_accuracy(self, labels: np.ndarray) -> float | None:
        """Share of the labelled proxy inputs (``labels >= 0``) whose label is right: a
        diagnostic, the proxy's true labels reach no learner."""
        known = labels >= 0
        if not known.any() or self.data.proxy_y is None:
            return None
        return float((labels[known] == self.data.proxy_y[known]).mean())

    def _noise(self, round_num: int, stream: int) -> NoiseSource:
        """The source of a release's noise (`fedkd.privacy.noise`); seeded noise is seeded by
        run, round and `stream` (one per kind of release)."""
        return noise_source(
            self.noise_rng, lambda: seeded_generator(self.seed, round_num, PHASE_SAMPLE, stream)
        )

    def _released_teacher(
        self, round_num: int, logits: torch.Tensor, client_ids: list[int]
    ) -> torch.Tensor:
        released = self.release.mean_teacher(
            torch.softmax(logits, dim=-1), self._noise(round_num, 2)
        )
        event = self.release.event(round_num)
        self._release_events = {cid: [event] for cid in client_ids}
        if self.teacher == "era":  # post-processing of the released mean
            return era(released.logits.unsqueeze(0), self.era_temperature)
        return released.logits

    def _class_weights(self, round_num: int, updates: dict[int, ClientResult]) -> torch.Tensor:
        """The clients' released label histograms (K, C); charges what the mechanism says each
        received one costs (`LabelHistogramRelease.charges`: a client's first, and any that
        differs from the one it sent before)."""
        if any("label_histogram" not in updates[c].arrays for c in updates):
            raise ValueError(
                f"teacher '{self.teacher}' needs every client's label_histogram with its logits"
            )
        if self.label_histograms is not None:
            for cid in sorted(updates):
                sent, before = updates[cid].arrays["label_histogram"], self._histograms.get(cid)
                events = self.label_histograms.charges(round_num, sent, before)
                if events:
                    self._one_time_events.setdefault(cid, []).extend(events)
        self._histograms.update({c: updates[c].arrays["label_histogram"] for c in updates})
        histograms, _ = stack_uploads(updates, "label_histogram")
        return histograms

    def planned_release_events(self, round_num: int) -> list[PrivacyEvent]:
        """A bound, known before the round, on what its aggregation will charge each
        contributing client (the budget check plans with it): the teacher release's; [] when
        the strategy has none (the check then projects the client's last round)."""
        return [] if self.release is None else self.release.planned_events(round_num)

    def planned_once_events(self, round_num: int) -> list[PrivacyEvent]:
        """What a client is charged once, the first round it contributes (its label
        histogram's release), which the budget check adds to the plan of that round."""
        if self.label_histograms is None:
            return []
        return self.label_histograms.planned_events(round_num)

    def release_events(self, round_num: int) -> dict[int, list[PrivacyEvent]]:
        """Privacy events this round's aggregation charged, per client (then cleared)."""
        events, self._release_events = self._release_events, {}
        return events

    def one_time_events(self, round_num: int) -> dict[int, list[PrivacyEvent]]:
        """Events charged once per run (a client's label histogram), per client (then
        cleared); unlike `release_events` they do not recur in the next round's cost."""
        events, self._one_time_events = self._one_time_events, {}
        return events

    # -- the interface the round loop calls -----------------------------------------------------
    def plan_local(self, round_num: int) -> dict[str, np.ndarray]:
        """The arrays the sampled clients get with their training request (`client_round`'s
        payload): a logit teacher's proxy indices (with the generator proxy, the generator's
        payload too, and the round's inputs made from it); nothing by default."""
        if not self.capabilities.logit_teacher:
            return {}
        if self.generator is not None:
            self._generator_payload = self.generator.payload(round_num)
            self._generated_x = self.generator.inputs(self._generator_payload)
        self._proxy_idx = self._sample_proxy(round_num)
        return {"proxy_idx": self._proxy_idx.astype(np.int32), **self._generator_payload}

    def aggregate(self, round_num: int, updates: dict[int, ClientResult]) -> None:
        """Build the round's knowledge from the clients' uploads (a logit teacher's ensemble)."""
        if self.capabilities.logit_teacher:
            self._ensemble(round_num, updates)

    def digest_payload(self, round_num: int) -> dict[str, np.ndarray] | None:
        """The arrays the clients that uploaded get to digest (`client_digest`'s payload), or
        None: a logit teacher's proxy indices and teacher logits (and the round's generator
        payload with the generator proxy)."""
        if self._teacher_logits is None:
            return None
        return {
            "proxy_idx": self._proxy_idx.astype(np.int32),
            "teacher_logits": self._teacher_logits,
            **self._generator_payload,
        }

    # -- the client side (`fedkd.learner.protocol.Learner`; no server state) -------------------
    @classmethod
    def client_round(
        cls,
        params: AlgorithmParams,
        learner: Learner,
        round_num: int,
        client_ids: list[int],
        payload: dict[str, np.ndarray],
    ) -> dict[int, ClientResult]:
        """What each sampled client does in the local phase and uploads.

        Parameters
        ----------
        params : AlgorithmParams
            The algorithm's parameters.
        learner : Learner
            The node's learner.
        round_num : int
            The round.
        client_ids : list of int
            The sampled clients the node hosts.
        payload : dict of str to ndarray
            What `plan_local` built.

        Returns
        -------
        dict of int to ClientResult
            Per client: its uploads (arrays) and metrics (``num_examples`` at least).

        Notes
        -----
        By default: private training; a logit teacher's clients upload their logits on the
        payload's proxy inputs, with their released label histogram where the run has one.
        With self-distillation (`TeacherParams.self_distill_weight`) each client first keeps
        its logits on those inputs (its model before this round's training). With mutual
        learning (`TeacherParams.mutual_weight`, `strategies.mutual`) the client's local and
        meme models train together and the meme model computes what is uploaded.
        """
        knower = knowledge_model(params, learner)
        needs_inputs = cls.capabilities.logit_teacher or _self_distills(params)
        inputs = payload_proxy_inputs(learner.data, payload) if needs_inputs else None
        if _self_distills(params):
            keep_earlier_logits(knower, round_num, client_ids, payload["proxy_idx"], inputs)
        results = train_on_private_data(params, learner, round_num, client_ids)
        if cls.capabilities.logit_teacher:
            for cid, logits in knower.logits(client_ids, inputs).items():
                results[cid].arrays["logits"] = logits
                results[cid].arrays.update(learner.label_histogram(cid))
        return results

    @classmethod
    def client_digest(
        cls,
        params: AlgorithmParams,
        learner: Learner,
        round_num: int,
        client_ids: list[int],
        payload: dict[str, np.ndarray],
    ) -> dict[int, ClientResult]:
        """How the clients digest `digest_payload`'s arrays (arguments as `client_round`'s);
        by default they distill towards its teacher logits on its proxy inputs (mixed with
        their earlier logits under self-distillation,
        `strategies.self_distill.distill_with_earlier_self`), into their meme model under
        mutual learning (`strategies.mutual`)."""
        learner = knowledge_model(params, learner)
        inputs = payload_proxy_inputs(learner.data, payload)
        if _self_distills(params):
            return distill_with_earlier_self(
                learner,
                round_num,
                client_ids,
                payload["proxy_idx"],
                inputs,
                payload["teacher_logits"],
                params.self_distill_weight,
            )
        return learner.distill(round_num, client_ids, inputs, payload["teacher_logits"])

    # Per-client metrics `client_evaluate` adds to the evaluation (the row gets each one's
    # mean over the evaluated clients as ``<name>_mean``). A name ending in ``local_acc`` or
    # ``val_acc`` is a private statistic (`fedkd.learner.cohort.PRIVATE_STATISTICS`).
    evaluation_metrics: ClassVar[tuple[str, ...]] = ()

    def evaluate_payload(self, round_num: int) -> dict[str, np.ndarray]:
        """The arrays the clients evaluated after this round get with their evaluation
        (`client_evaluate`'s payload); nothing by default."""
        return {}

    @classmethod
    def client_evaluate(
        cls,
        params: AlgorithmParams,
        learner: Learner,
        client_ids: list[int],
        test_idx: np.ndarray,
        payload: dict[str, np.ndarray],
    ) -> dict[int, dict[str, float]]:
        """Each client's `evaluation_metrics`, beside the learner's own evaluation.

        Arguments as `client_round`'s, with `test_idx` the global test subset clients are
        scored on (as `Learner.evaluate`'s) and `payload` what `evaluate_payload` built.
        Returns per client its value of each name in `evaluation_metrics` (NaN: not defined,
        e.g. on an empty slice); nothing by default.
        """
        return {}

    def round_metrics(self) -> dict[str, float | None]:
        """Strategy-specific extras for this round's metrics row: the accuracy of this round's
        teacher on its proxy inputs (a diagnostic: the proxy's labels reach no learner; None
        for a proxy that is not in-domain, which has none)."""
        if self._teacher_logits is None or not self.capabilities.logit_teacher:
            return {}
        metrics: dict[str, float | None] = {"teacher_proxy_acc": None, **self._generator_metrics}
        if self.data.proxy_y is not None:
            truth = self.data.proxy_y[self._proxy_idx]
            metrics["teacher_proxy_acc"] = float((self._teacher_logits.argmax(1) == truth).mean())
        if self.confident_fraction > 0:
            metrics.update(
                server_labels=float((self._server_labels >= 0).sum()),
                server_label_acc=self._proxy_label_accuracy(self._server_labels),
                server_pseudo_labelled=float(self._server_pseudo_labelled),
            )
        return metrics

    def global_model_accuracy(self, x: np.ndarray, y: np.ndarray) -> float | None:
        """Accuracy of the global model (the server student) on ``x``; None without one."""
        if self.server_student is None:
            return None
        return self.server_student.accuracy(x, y)

    def server_test_acc(self) -> float | None:
        """The global model on the global test set; None without one."""
        return self.global_model_accuracy(self.data.test_x, self.data.test_y)

    def server_val_acc(self) -> float | None:
        """The global model on the proxy set's validation slice; None without either."""
        if len(self.data.proxy_val_y) == 0:
            return None
        return self.global_model_accuracy(self.data.proxy_val_x, self.data.proxy_val_y)

    def teacher_test_logits(
        self, test_logits: torch.Tensor, weights: torch.Tensor, client_ids: list[int]
    ) -> torch.Tensor | None:
        """The teacher built from clients' logits on the test set (stacked in `client_ids`
        order); None if it has no teacher, or (class-weighted) a client's histogram is unknown."""
        if not self.capabilities.logit_teacher:
            return None
        if self.teacher in HISTOGRAM_TEACHERS:
            if any(c not in self._histograms for c in client_ids):
                return None
            weights = torch.from_numpy(np.stack([self._histograms[c] for c in client_ids]))
        return self.build_teacher(test_logits, weights)


def _self_distills(params: AlgorithmParams) -> bool:
    """Whether the clients distill from their own earlier model too (`strategies.self_distill`)."""
    return isinstance(params, TeacherParams) and params.self_distill_weight > 0


def self_training_kwargs(params: SelfTrainingParams) -> dict[str, Any]:
    """The server student's self-training settings as constructor arguments ({}: off)."""
    if params.self_training_confidence <= 0:
        return {}
    return {
        "self_training_confidence": params.self_training_confidence,
        "self_training_iterations": params.self_training_iterations,
    }


class LogitTeacherStrategy(Strategy):
    """An algorithm whose knowledge is a teacher built from the clients' logits on proxy
    inputs (DS-FL, FedMD, FedDF-logit): `TeacherParams`, and the teacher's release, label
    histograms and confident-labels server student from the context. Its clients may distill
    from their own earlier model too (``self_distill_weight``, `strategies.self_distill`), and
    learn mutually with a meme model (``mutual_weight``, `strategies.mutual`)."""

    Params: ClassVar[type[AlgorithmParams]] = TeacherParams
    capabilities: ClassVar[Capabilities] = Capabilities(
        uploads=("logits",), needs_proxy=True, logit_teacher=True, teacher_release=True
    )

    @classmethod
    def init_kwargs(cls, params: AlgorithmParams, context: BuildContext) -> dict[str, Any]:
        assert isinstance(params, TeacherParams)
        kwargs = super().init_kwargs(params, context)
        kwargs.update(
            era_temperature=params.era_temperature,
            trim_fraction=params.trim_fraction,
            held_class_count=params.held_class_count,
            teacher_confidence=params.teacher_confidence,
            teacher_prior_agreement=params.teacher_prior_agreement,
            match_class_prior=params.match_class_prior,
            **self_training_kwargs(params),
        )
        if params.teacher:
            kwargs["teacher"] = params.teacher
        if context.release is not None:
            kwargs["release"] = context.release
        if context.label_histograms is not None:
            kwargs["label_histograms"] = context.label_histograms
        if context.confident_fraction > 0:
            kwargs["confident_fraction"] = context.confident_fraction
        return kwargs
