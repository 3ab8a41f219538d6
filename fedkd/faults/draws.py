"""Who misbehaves, drawn from the run seed: per-round faults and the run's Byzantine clients."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedkd.learner.loop import PHASE_HISTOGRAM, derive_seed

# The faults' own phase key for `derive_seed` (after fedkd.learner.loop's phases), and its
# streams: no other draw of the run shares these seeds.
PHASE_FAULTS = PHASE_HISTOGRAM + 1
STREAM_ROUND = 0  # a client's crash / straggler / NaN draws in one round
STREAM_BYZANTINE = 1  # the run's Byzantine clients
STREAM_ATTACK = 2  # a Byzantine client's random logits in one round


@dataclass(frozen=True)
class ClientFaults:
    """What befalls one sampled client in one round (at most one of them acts, in this order)."""

    crashed: bool = False
    straggled: bool = False
    nan: bool = False


def client_faults(
    seed: int, round_num: int, client_id: int, crash: float, straggle: float, nan: float
) -> ClientFaults:
    """One client's faults in one round, each with its rate.

    The draws depend on the seed, the round and the client only (not on which other clients
    were sampled or how nodes host them), so a faulty run repeats exactly.

    Parameters
    ----------
    seed : int
        The run seed.
    round_num : int
        The round.
    client_id : int
        The client.
    crash, straggle, nan : float
        Probabilities in [0, 1) of a crash, a straggling reply and a NaN upload.

    Returns
    -------
    ClientFaults
        A crash hides a straggle and a NaN upload; a straggle hides a NaN upload.
    """
    u = np.random.default_rng(derive_seed(seed, round_num, PHASE_FAULTS, STREAM_ROUND, client_id))
    crash_u, straggle_u, nan_u = u.random(3)
    crashed = bool(crash_u < crash)
    straggled = not crashed and bool(straggle_u < straggle)
    return ClientFaults(crashed, straggled, not crashed and not straggled and bool(nan_u < nan))


def byzantine_count(num_clients: int, fraction: float) -> int:
    """How many of `num_clients` are Byzantine at `fraction` (rounded to the nearest)."""
    return int(np.floor(fraction * num_clients + 0.5))


def byzantine_clients(seed: int, num_clients: int, fraction: float) -> list[int]:
    """The run's Byzantine clients: a seeded choice of ``round(fraction * num_clients)``, sorted.

    Fixed for the whole run (a client does not turn Byzantine mid-run); the same seed picks the
    same clients whatever the algorithm or the attack.
    """
    k = byzantine_count(num_clients, fraction)
    if k == 0:
        return []
    rng = np.random.default_rng(derive_seed(seed, 0, PHASE_FAULTS, STREAM_BYZANTINE))
    return sorted(int(c) for c in rng.choice(num_clients, k, replace=False))
