"""Simulated faults and attacks, acting in the clients, and the server's defence (the spec's
[faults]; docs/faults.md).

In the clients (`act_in_clients`, called by the ClientApp on what its clients computed): a
crashed client sends no result (the client trained and kept its state, then died before
replying), a straggler reports how late its reply is (the simulation does not sleep: the server
treats a reply later than ``resources.round_timeout`` as a late one, whose DP-SGD steps are
charged when the client next replies), a NaN client sends NaN, and a Byzantine client sends its
attack's upload in place of its honest one (``label_flip`` poisons its private labels at
assembly instead). Every draw comes from the run seed, the round and the client, so a faulty
run repeats exactly and a client needs nothing from the server to misbehave.

At the server (`ServerFaults`): the late replies are dropped, the round's faults are counted
for the metrics row (the simulation knows its own draws), and the defence screens the logit
uploads before the strategy aggregates them.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np

from fedkd.apps import wire
from fedkd.assembly import run_byzantine_clients
from fedkd.faults import (
    FAULT_COUNTS,
    LOGIT_ATTACKS,
    HistoryDefence,
    attack_upload,
    attacked_upload,
    client_faults,
)
from fedkd.learner.cohort import ClientResult
from fedkd.rounds.hooks import RoundHook
from fedkd.spec import Spec

if TYPE_CHECKING:
    from fedkd.apps.server_app import Exchange

# A straggler's reply metric: how many seconds after the others it would arrive.
STRAGGLER_DELAY = "fault_straggler_delay_s"


def _with_array(result: ClientResult, key: str, value: np.ndarray) -> ClientResult:
    return dataclasses.replace(result, arrays={**result.arrays, key: value})


def act_in_clients(
    spec: Spec, round_num: int, parts: dict[str, dict[int, ClientResult]]
) -> dict[str, dict[int, ClientResult]]:
    """What this round's training clients reply, faults and attacks included.

    Parameters
    ----------
    spec : Spec
        The run's spec (its ``[faults]`` table and seed).
    round_num : int
        The round whose local training ``parts["train"]`` holds.
    parts : dict of str to dict of int to ClientResult
        The node's honest results per part of the request (digest, evaluate, train).

    Returns
    -------
    dict of str to dict of int to ClientResult
        What the node replies: a crashed client left out of every part (it died before
        replying), stragglers marked with their delay, NaN uploads, Byzantine clients'
        attacked uploads.
    """
    f = spec.faults
    results = parts.get("train", {})
    if not f.active or not results:
        return parts
    byzantine = set(run_byzantine_clients(spec))
    key = attacked_upload(spec.algorithm.capabilities.uploads)
    sent: dict[int, ClientResult] = {}
    for cid, res in results.items():
        fault = client_faults(spec.seed, round_num, cid, f.crash_rate, f.straggler_rate, f.nan_rate)
        if fault.crashed:
            continue
        if fault.straggled:
            res = dataclasses.replace(
                res, metrics={**res.metrics, STRAGGLER_DELAY: f.straggler_delay}
            )
        elif fault.nan:
            nan = {
                k: np.full_like(a, np.nan) if a.dtype.kind == "f" else a
                for k, a in res.arrays.items()
            }
            sent[cid] = dataclasses.replace(res, arrays=nan)
            continue
        if cid in byzantine and f.attack in LOGIT_ATTACKS and key is not None:
            honest = res.arrays[key]
            res = _with_array(
                res, key, attack_upload(f.attack, honest, spec.seed, round_num, cid, f.top_k)
            )
        sent[cid] = res
    crashed = set(results) - set(sent)
    others = {
        part: {c: r for c, r in res.items() if c not in crashed}
        for part, res in parts.items()
        if part != "train"
    }
    return {**others, "train": sent}


class ServerFaults(RoundHook):
    """The spec's faults, attacks and defence, acting on each round's training replies.

    Parameters
    ----------
    spec : Spec
        The run's spec (its ``[faults]`` table, seed and ``resources.round_timeout``).
    """

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.faults = spec.faults
        self.byzantine = set(run_byzantine_clients(spec))
        # The upload's array is named as the upload ("logits" or "class_logits").
        self.upload_key = attacked_upload(spec.algorithm.capabilities.uploads)
        f = spec.faults
        self.defence = (
            HistoryDefence(f.defence_decay, f.defence_threshold) if f.defence == "history" else None
        )

    def act(self, round_num: int, exchange: Exchange, sampled: list[int]) -> dict[str, Any]:
        """Drop this round's late replies, count its faults, and screen the uploads.

        Parameters
        ----------
        round_num : int
            The round whose training replies `exchange` holds.
        exchange : Exchange
            The round's exchange; late or rejected clients move to its failures with their
            cause.
        sampled : list of int
            The clients asked to train this round.

        Returns
        -------
        dict
            The metrics row's fault fields ({} when the spec has no ``[faults]``).
        """
        f = self.faults
        if not f.active:
            return {}
        hit: dict[str, list[int]] = {name: [] for name in FAULT_COUNTS.values()}
        timeout = self.spec.resources.round_timeout
        train = exchange.results["train"]
        for cid in sorted(sampled):
            fault = client_faults(
                self.spec.seed, round_num, cid, f.crash_rate, f.straggler_rate, f.nan_rate
            )
            if fault.crashed and exchange.causes.get(cid) == wire.NO_RESULT:
                hit["crashed"].append(cid)
                exchange.causes[cid] = "simulated crash: the client died before replying"
            elif fault.nan and not fault.straggled and cid in exchange.rejected["train"]:
                hit["nan"].append(cid)
        for cid in sorted(train):
            delay = train[cid].metrics.get(STRAGGLER_DELAY)
            if delay is None:
                continue
            hit["straggled"].append(cid)
            metrics = {k: v for k, v in train[cid].metrics.items() if k != STRAGGLER_DELAY}
            train[cid] = dataclasses.replace(train[cid], metrics=metrics)
            if delay >= timeout:
                hit["late"].append(cid)
                exchange.lose(
                    cid,
                    f"no reply within resources.round_timeout ({timeout:g} s): a simulated "
                    f"straggler {delay:g} s late",
                )
        hit["byzantine"] = sorted(self.byzantine & set(train))
        row: dict[str, Any] = {"byzantine_clients": sorted(self.byzantine)}
        if self.defence is not None and train:
            screening = self.defence.screen({c: r.arrays["logits"] for c, r in train.items()})
            for cid in screening.rejected:
                exchange.rejected["train"][cid] = train.pop(cid)
                exchange.causes.setdefault(
                    cid,
                    f"upload rejected by the history defence (score "
                    f"{screening.scores[cid]:.2f} > faults.defence_threshold)",
                )
            for cid, weight in screening.weights.items():  # the teacher's client weights
                metrics = {**train[cid].metrics}
                metrics["num_examples"] = metrics.get("num_examples", 1.0) * weight
                train[cid] = dataclasses.replace(train[cid], metrics=metrics)
            hit["defence_rejected"] = screening.rejected
            hit["defence_downweighted"] = sorted(screening.weights)
            row["defence_scores"] = {str(c): s for c, s in sorted(self.defence.scores.items())}
        row.update({name: len(hit[key]) for name, key in FAULT_COUNTS.items()})
        row["faults_clients"] = hit
        return row

    def state_dict(self) -> dict[str, Any]:
        """The defence's scores so far (a checkpoint keeps them)."""
        return {} if self.defence is None else {"scores": dict(self.defence.scores)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.defence is not None:
            self.defence.scores = dict(state.get("scores", {}))
