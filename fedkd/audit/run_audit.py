"""Audit a finished run: load it, attack the audited client's student, write ``audit.json``.

What a run keeps for this (with ``[audit] enabled = true``): ``spec.toml`` (data, partition,
canaries and recipe are all reproducible from it), ``audit/client-<id>.pt`` (the client's final
student, sent by its node at the end of the run), ``audit/teachers.npz`` (the teachers it
distilled from each round, which LiRA's shadows replay) and, with DP, ``ledgers.json`` (the
client's theoretical epsilon).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedkd.assembly import distill_loss, dpsgd_settings, federated_data, step_config
from fedkd.audit.canary import audit_canaries
from fedkd.audit.mia import (
    ShadowRecipe,
    attack_summary,
    lira_offline_scores,
    logit_confidence,
    loss_threshold_scores,
    match_by_class,
    shadow_confidences,
)
from fedkd.data.canaries import make_canaries, real_examples
from fedkd.learner.loop import predict_logits
from fedkd.models.zoo import build_model
from fedkd.privacy.accountant import compute_epsilon
from fedkd.privacy.dpsgd import DpSgdSettings
from fedkd.privacy.ledger import DpSgdEvent, PrivacyLedger
from fedkd.results import load_teachers, student_path
from fedkd.spec import Spec, SpecError, load_spec

__all__ = [
    "AuditError",
    "audit_finished_run",
    "audit_run",
    "load_student",
    "render_text",
]

log = logging.getLogger("fedkd")

# Seed streams of the audit's own draws (targets, shadow data), apart from the run's.
_TARGET_STREAM, _SHADOW_STREAM = 102, 103


class AuditError(RuntimeError):
    """The run folder cannot be audited; the message says why and what to do."""


def load_student(
    run_dir: str | Path, client_id: int, input_shape: tuple[int, ...], num_classes: int
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The audited client's student, rebuilt, and its saved metadata."""
    path = student_path(run_dir, client_id)
    if not path.is_file():
        raise AuditError(
            f"{run_dir}: no {path.relative_to(run_dir)}; rerun the spec with [audit] "
            f"enabled = true and client = {client_id} (the run must keep the client's final "
            "student)"
        )
    saved = torch.load(path, weights_only=True)
    model = build_model(saved["arch"], input_shape, num_classes)
    model.load_state_dict(saved["model"])
    model.eval()
    return model, saved


def _client_ledger(run_dir: Path, client_id: int) -> PrivacyLedger | None:
    path = run_dir / "ledgers.json"
    if not path.is_file():
        return None
    book = json.loads(path.read_text())
    raw = book.get("ledgers", {}).get(str(client_id))
    return None if raw is None else PrivacyLedger.from_dict(raw)


def _shadow_dp(spec: Spec, ledger: PrivacyLedger | None) -> DpSgdSettings | None:
    """DP-SGD for the shadows: the client's own noise multiplier, from its ledger."""
    settings = dpsgd_settings(spec)
    if settings is None or ledger is None:
        return settings
    sgd = [e for e in ledger.events if isinstance(e, DpSgdEvent)]
    if not sgd:
        return settings
    return DpSgdSettings(
        max_grad_norm=settings.max_grad_norm,
        delta=settings.delta,
        noise_multiplier=sgd[-1].noise_multiplier,
    )


def audit_run(
    run_dir: str | Path,
    *,
    client: int | None = None,
    shadows: int | None = None,
    write: bool = True,
) -> dict[str, Any]:
    """Membership inference (loss threshold, offline LiRA) and the one-run canary audit.

    Parameters
    ----------
    run_dir : str or Path
        A run folder written with ``[audit] enabled = true``.
    client : int, optional
        The client to audit (default: the spec's ``audit.client``).
    shadows : int, optional
        LiRA shadow models (default: the spec's ``audit.shadows``).
    write : bool, default True
        Write ``audit.json`` into the run folder.

    Returns
    -------
    dict
        What ``audit.json`` holds.

    Raises
    ------
    AuditError
        If the folder is not an auditable run.
    """
    started = time.perf_counter()
    run_dir = Path(run_dir)
    if not (run_dir / "spec.toml").is_file():
        raise AuditError(f"{run_dir}: no spec.toml (is this a fedkd run folder?)")
    try:
        spec = load_spec(run_dir / "spec.toml")
    except SpecError as err:
        raise AuditError(f"{run_dir}/spec.toml: {err}") from None
    caps = spec.algorithm.capabilities
    if not (caps.uses_clients and caps.client_students):
        raise AuditError(
            f"{run_dir}: algorithm '{spec.algorithm.name}' has no client student to audit; "
            "audit a run of an algorithm whose clients train students"
        )
    a = spec.audit
    cid = a.client if client is None else int(client)
    n_shadows = a.shadows if shadows is None else int(shadows)
    if not 0 <= cid < spec.clients.num_clients:
        raise AuditError(f"client {cid}: not a client id in 0..{spec.clients.num_clients - 1}")
    if n_shadows < 2:
        raise AuditError(f"shadows: offline LiRA needs at least 2, got {n_shadows}")
    data = federated_data(spec)
    model, saved = load_student(run_dir, cid, data.input_shape, data.num_classes)
    ledger = _client_ledger(run_dir, cid)
    theory = None if ledger is None else compute_epsilon(ledger, spec.privacy.delta).epsilon

    # Targets: the client's real private examples, and class-matched global-test non-members.
    client_data = data.clients[cid]
    real = real_examples(client_data)
    member_x, member_y = client_data.x_train[real], client_data.y_train[real]
    rng = np.random.default_rng((spec.seed, _TARGET_STREAM, cid))
    mi, ni = match_by_class(member_y, data.test_y, a.max_targets, rng)
    targets_x = np.concatenate([member_x[mi], data.test_x[ni]])
    targets_y = np.concatenate([member_y[mi], data.test_y[ni]])
    is_member = np.r_[np.ones(len(mi), bool), np.zeros(len(ni), bool)]
    loss_attack = attack_summary(
        "loss_threshold", loss_threshold_scores(model, targets_x, targets_y), is_member
    )

    # Offline LiRA: shadows never see a target (other clients' data and the unused test set).
    others = [c for c in data.clients if c.client_id != cid]
    unused_test = np.setdiff1d(np.arange(len(data.test_y)), ni)
    pool_x = np.concatenate([*(c.x_train for c in others), data.test_x[unused_test]])
    pool_y = np.concatenate([*(c.y_train for c in others), data.test_y[unused_test]])
    recipe = ShadowRecipe(
        arch=saved["arch"],
        input_shape=data.input_shape,
        num_classes=data.num_classes,
        rounds=max(1, int(saved.get("rounds_trained", spec.rounds))),
        private=step_config(spec.train),
        dp=_shadow_dp(spec, ledger),
        seed=spec.seed,
        distill=step_config(spec.distill),
        distill_loss=distill_loss(spec),
        distill_temperature=spec.distill.temperature,
        distill_private_weight=spec.distill.private_weight,
        teachers=[
            (data.proxy_x[idx.astype(np.int64)], logits) for idx, logits in load_teachers(run_dir)
        ],
    )
    shadow_phi = shadow_confidences(
        recipe,
        pool_x,
        pool_y,
        member_y,
        targets_x,
        targets_y,
        n_shadows,
        np.random.default_rng((spec.seed, _SHADOW_STREAM, cid)),
    )
    target_phi = logit_confidence(predict_logits(model, targets_x), targets_y)
    lira = attack_summary("lira_offline", lira_offline_scores(target_phi, shadow_phi), is_member)

    canary = None
    if a.canaries > 0:
        canaries = make_canaries(data, cid, a.canaries, spec.seed)
        inserted = client_data.x_train[~real]
        if not np.array_equal(inserted, canaries.x[canaries.included]):
            raise AuditError(
                f"client {cid}: the canaries in its data are not the ones spec.toml describes"
            )
        scores = loss_threshold_scores(model, canaries.x, canaries.y)
        canary = dataclasses.asdict(
            audit_canaries(scores, canaries.included, spec.privacy.delta, a.confidence)
        )

    result = {
        "run_dir": str(run_dir),
        "client": cid,
        "arch": saved["arch"],
        "rounds_trained": recipe.rounds,
        "dp": ledger is not None,
        "delta": spec.privacy.delta,
        "theoretical_epsilon": theory,
        "membership": {
            "members": "the client's private training examples",
            "non_members": "global test examples, class-matched to the members (balanced)",
            "shadows": n_shadows,
            "shadow_digests_replayed": len(recipe.teachers),
            "loss_threshold": dataclasses.asdict(loss_attack),
            "lira_offline": dataclasses.asdict(lira),
        },
        "canary": canary,
        "wall_s": time.perf_counter() - started,
    }
    if write:
        (run_dir / "audit.json").write_text(json.dumps(_json_safe(result), indent=2))
    return result


def audit_finished_run(spec: Spec, run_dir: str | Path) -> None:
    """End-of-run hook of `fedkd run` and `flwr run`: with ``[audit] enabled``, audit the run.

    The result goes to the log (and ``audit.json``); a failed audit never fails the run.

    Parameters
    ----------
    spec : Spec
        The run's spec.
    run_dir : str or Path
        The finished run's results folder.
    """
    if not spec.audit.enabled:
        return
    try:
        result = audit_run(run_dir)
    except Exception as err:  # the run's results are complete; say why the audit is missing
        log.warning("audit failed: %s: %s", type(err).__name__, err)
        return
    log.warning("%s\n(audit.json in %s)", render_text(result), run_dir)


def _json_safe(value: Any) -> Any:
    """JSON has no infinity: an unbounded epsilon is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _eps(value: float | None) -> str:
    return "inf (no DP)" if value is None else f"{value:.3f}"


def render_text(result: dict[str, Any]) -> str:
    """The audit as a few aligned lines for a terminal or a log."""
    mem = result["membership"]
    lines = [
        f"audit of client {result['client']} ({result['arch']}, {result['rounds_trained']} "
        f"rounds): theoretical epsilon {_eps(result['theoretical_epsilon'])} at delta "
        f"{result['delta']:g}",
        f"membership inference: {mem['loss_threshold']['members']} members vs "
        f"{mem['loss_threshold']['non_members']} non-members (class-matched global test)",
        f"  {'attack':<22}{'AUC':>7}{'TPR@1%FPR':>11}{'TPR@0.1%FPR':>13}",
    ]
    for key, label in (
        ("loss_threshold", "loss threshold"),
        ("lira_offline", f"LiRA offline ({mem['shadows']} sh.)"),
    ):
        r = mem[key]
        lines.append(
            f"  {label:<22}{r['auc']:>7.3f}{r['tpr_at_1pct_fpr']:>11.3f}"
            f"{r['tpr_at_0_1pct_fpr']:>13.3f}"
        )
    c = result["canary"]
    if c is None:
        lines.append("one-run canary audit: off (set audit.canaries > 0 before the run)")
    else:
        lines.append(
            f"one-run canary audit: {c['m']} canaries ({c['included']} inserted), "
            f"{c['correct']}/{c['guesses']} guesses correct -> epsilon >= "
            f"{c['epsilon_lower_bound']:.3f} at {c['confidence']:.0%} confidence "
            f"(theoretical {_eps(result['theoretical_epsilon'])})"
        )
    return "\n".join(lines)
