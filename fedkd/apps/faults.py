"""Simulated faults and attacks on the replies a round receives, and the defence (the spec's
[faults]; docs/faults.md).

The clients compute honestly; the server then treats each reply as the faulty or malicious
client would have sent it: a crashed client's reply is lost, a straggler's is lost when its
delay reaches ``resources.round_timeout`` (a late reply: the DP-SGD steps it took are charged
when the client next replies), a NaN upload meets the usual non-finite rejection, and a
Byzantine client's logits are replaced by its attack's (``label_flip`` poisons its private
labels at assembly instead). The defence then screens the logit uploads before the strategy
aggregates them. Every draw comes from the run seed, so a faulty run repeats exactly.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np

from fedkd.assembly import run_byzantine_clients
from fedkd.faults import FAULT_COUNTS, LOGIT_ATTACKS, HistoryDefence, attack_upload, client_faults
from fedkd.learner.cohort import ClientResult
from fedkd.spec import Spec

if TYPE_CHECKING:
    from fedkd.apps.server_app import Exchange


def _with_array(result: ClientResult, key: str, value: np.ndarray) -> ClientResult:
    return dataclasses.replace(result, arrays={**result.arrays, key: value})


class ServerFaults:
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
        self.upload_key = spec.algorithm.capabilities.upload
        f = spec.faults
        self.defence = (
            HistoryDefence(f.defence_decay, f.defence_threshold) if f.defence == "history" else None
        )

    def act(self, round_num: int, exchange: Exchange) -> dict[str, Any]:
        """Apply this round's faults, attacks and defence to `exchange` (in place).

        Parameters
        ----------
        round_num : int
            The round whose training replies `exchange` holds.
        exchange : Exchange
            The round's exchange; its ``train`` results change, lost or rejected clients move
            to its failures with their cause.

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
        seed = self.spec.seed
        train = exchange.results["train"]
        for cid in sorted(train):
            fault = client_faults(seed, round_num, cid, f.crash_rate, f.straggler_rate, f.nan_rate)
            if fault.crashed:
                hit["crashed"].append(cid)
                exchange.lose(cid, "simulated crash: the client's reply was lost")
            elif fault.straggled:
                hit["straggled"].append(cid)
                if f.straggler_delay >= timeout:
                    hit["late"].append(cid)
                    exchange.lose(
                        cid,
                        f"no reply within resources.round_timeout ({timeout:g} s): a simulated "
                        f"straggler {f.straggler_delay:g} s late",
                    )
            elif fault.nan:
                hit["nan"].append(cid)
                res = train.pop(cid)
                nan = {
                    k: np.full_like(a, np.nan) if a.dtype.kind == "f" else a
                    for k, a in res.arrays.items()
                }
                exchange.admit("train", cid, dataclasses.replace(res, arrays=nan))
        for cid in sorted(self.byzantine & set(train)):
            hit["byzantine"].append(cid)
            if f.attack in LOGIT_ATTACKS:
                honest = train[cid].arrays[self.upload_key]
                sent = attack_upload(f.attack, honest, seed, round_num, cid, f.top_k)
                train[cid] = _with_array(train[cid], self.upload_key, sent)
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
