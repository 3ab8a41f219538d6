"""Privacy accounting core: ledger, accountant, the mechanisms (Gaussian release of the teacher,
noisy label histograms, PATE), noise calibration, and where the mechanisms' noise comes from
(seeded or secure).

Plain torch/numpy on top of dp-accounting (composition) and Opacus (calibration); no Flower.
Names are imported on first use: dp-accounting and Opacus take seconds to import, and a
ClientApp process without a privacy mechanism needs neither.
"""

import importlib
from typing import Any

_WHERE = {
    "RDP_ORDERS": "accountant",
    "EpsilonReport": "accountant",
    "compute_epsilon": "accountant",
    "epsilon_after": "accountant",
    "would_exceed_budget": "accountant",
    "calibrate_noise_multiplier": "calibration",
    "GaussianRelease": "gaussian_release",
    "GNMax": "gnmax",
    "LabelHistogramRelease": "label_histogram",
    "PrivateTeacher": "gaussian_release",
    "clip_l2": "gaussian_release",
    "gaussian_release_event": "gaussian_release",
    "private_mean_teacher": "gaussian_release",
    "private_sum_of_probabilities": "gaussian_release",
    "release_sensitivity": "gaussian_release",
    "NoiseSource": "noise",
    "SecureNoise": "noise",
    "SeededNoise": "noise",
    "noise_source": "noise",
    "label_histogram_event": "label_histogram",
    "released_label_histogram": "label_histogram",
    "DpSgdEvent": "ledger",
    "GaussianReleaseEvent": "ledger",
    "PateQueryEvent": "ledger",
    "PrivacyEvent": "ledger",
    "PrivacyLedger": "ledger",
    "UnprotectedReleaseEvent": "ledger",
    "event_from_dict": "ledger",
    "confident_gnmax": "pate",
    "gnmax_aggregate": "pate",
    "log_q_gnmax": "pate",
    "pate_query_event": "pate",
    "pate_worst_case_event": "pate",
    "rdp_gnmax_data_dependent": "pate",
    "rdp_gnmax_data_independent": "pate",
    "rdp_threshold_data_dependent": "pate",
    "rdp_threshold_data_independent": "pate",
    "votes_from_predictions": "pate",
}

__all__ = [
    "RDP_ORDERS",
    "DpSgdEvent",
    "EpsilonReport",
    "GNMax",
    "GaussianRelease",
    "GaussianReleaseEvent",
    "LabelHistogramRelease",
    "NoiseSource",
    "PateQueryEvent",
    "PrivacyEvent",
    "PrivacyLedger",
    "PrivateTeacher",
    "SecureNoise",
    "SeededNoise",
    "UnprotectedReleaseEvent",
    "calibrate_noise_multiplier",
    "clip_l2",
    "compute_epsilon",
    "confident_gnmax",
    "epsilon_after",
    "event_from_dict",
    "gaussian_release_event",
    "gnmax_aggregate",
    "label_histogram_event",
    "log_q_gnmax",
    "noise_source",
    "pate_query_event",
    "pate_worst_case_event",
    "private_mean_teacher",
    "private_sum_of_probabilities",
    "rdp_gnmax_data_dependent",
    "rdp_gnmax_data_independent",
    "rdp_threshold_data_dependent",
    "rdp_threshold_data_independent",
    "release_sensitivity",
    "released_label_histogram",
    "votes_from_predictions",
    "would_exceed_budget",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"fedkd.privacy.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'fedkd.privacy' has no attribute {name!r}")
