"""Privacy accounting core: ledger, accountant, Gaussian release, PATE, noise calibration.

Plain torch/numpy on top of dp-accounting (composition) and Opacus (calibration); no Flower.
"""

from fedkd.privacy.accountant import (
    RDP_ORDERS,
    EpsilonReport,
    compute_epsilon,
    epsilon_after,
    would_exceed_budget,
)
from fedkd.privacy.calibration import calibrate_noise_multiplier
from fedkd.privacy.gaussian_release import (
    PrivateTeacher,
    clip_l2,
    gaussian_release_event,
    private_mean_teacher,
    private_sum_of_probabilities,
    release_sensitivity,
)
from fedkd.privacy.ledger import (
    DpSgdEvent,
    GaussianReleaseEvent,
    PateQueryEvent,
    PrivacyEvent,
    PrivacyLedger,
    event_from_dict,
)
from fedkd.privacy.pate import (
    confident_gnmax,
    gnmax_aggregate,
    log_q_gnmax,
    pate_query_event,
    rdp_gnmax_data_dependent,
    rdp_gnmax_data_independent,
    rdp_threshold_data_dependent,
    rdp_threshold_data_independent,
    votes_from_predictions,
)

__all__ = [
    "RDP_ORDERS",
    "DpSgdEvent",
    "EpsilonReport",
    "GaussianReleaseEvent",
    "PateQueryEvent",
    "PrivacyEvent",
    "PrivacyLedger",
    "PrivateTeacher",
    "calibrate_noise_multiplier",
    "clip_l2",
    "compute_epsilon",
    "confident_gnmax",
    "epsilon_after",
    "event_from_dict",
    "gaussian_release_event",
    "gnmax_aggregate",
    "log_q_gnmax",
    "pate_query_event",
    "private_mean_teacher",
    "private_sum_of_probabilities",
    "rdp_gnmax_data_dependent",
    "rdp_gnmax_data_independent",
    "rdp_threshold_data_dependent",
    "rdp_threshold_data_independent",
    "release_sensitivity",
    "votes_from_predictions",
    "would_exceed_budget",
]
