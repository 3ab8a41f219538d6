"""Simulated faults and Byzantine clients, and a history-based defence (the spec's [faults]).

A simulation injects them: `draws` decides, from the run seed, which sampled client crashes,
straggles or uploads NaN in a round and which clients are Byzantine for the whole run;
`attacks` turns an honest client's logit upload into what a Byzantine client would send (or
poisons its private labels, ``label_flip``); `defence` scores every upload against a robust
consensus over the rounds and rejects or down-weights the outliers. Pure numpy, no Flower: the
ClientApp applies them to what its clients reply, the ServerApp runs the defence (see
docs/faults.md).
"""

from fedkd.faults.attacks import (
    ATTACKS,
    LOGIT_ATTACKS,
    attack_upload,
    attacked_upload,
    with_flipped_labels,
)
from fedkd.faults.defence import DEFENCES, HistoryDefence, Screening
from fedkd.faults.draws import PHASE_FAULTS, ClientFaults, byzantine_clients, client_faults
from fedkd.faults.record import FAULT_COUNTS, fault_totals

__all__ = [
    "ATTACKS",
    "FAULT_COUNTS",
    "DEFENCES",
    "LOGIT_ATTACKS",
    "attacked_upload",
    "PHASE_FAULTS",
    "ClientFaults",
    "HistoryDefence",
    "Screening",
    "attack_upload",
    "byzantine_clients",
    "client_faults",
    "fault_totals",
    "with_flipped_labels",
]
