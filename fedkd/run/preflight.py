"""Checks a `fedkd run` makes before it starts Ray: what the machine, the data and the privacy
budget can give.

The spec layer checks a spec on its own (`fedkd.spec.validate`); these checks need the machine
(CPUs, GPUs) or the data itself (a file's contents, a partition's feasibility), and would
otherwise fail inside the ServerApp once the simulation engine runs, or hang it: Ray never
starts an actor that asks for more CPUs or GPUs than there are, and Flower waits for it.
"""

from __future__ import annotations

import os

from fedkd.spec import Spec, SpecError

__all__ = ["check_algorithm", "check_data", "check_machine", "check_privacy", "usable_cpus"]


def usable_cpus() -> int:
    """CPUs Ray offers on this machine (its own count, which a container's quota limits).

    Falls back to this process's affinity mask where Ray's count is unavailable.
    """
    try:
        from ray._private.utils import get_num_cpus

        return max(1, int(get_num_cpus()))
    except Exception:  # another Ray layout: the OS's view
        pass
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_machine(spec: Spec) -> None:
    """Refuse resources this machine cannot give one simulated node.

    Parameters
    ----------
    spec : Spec
        The run's spec (``resources``).

    Raises
    ------
    SpecError
        If a node asks for more CPUs or GPUs than the machine has, or for a CUDA device
        without one.
    """
    r = spec.resources
    cpus = usable_cpus()
    if r.num_cpus > cpus:
        raise SpecError(
            f"resources.num_cpus: each node asks for {r.num_cpus:g} CPUs but this machine has "
            f"{cpus}; give at most {cpus} (nodes share the CPUs: {cpus} / num_cpus run at once)"
        )
    if r.num_gpus == 0 and r.device != "cuda":
        return
    import torch  # imported only when a GPU is asked for

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if r.device == "cuda" and gpus == 0:
        raise SpecError(
            "resources.device: 'cuda' but this machine has no usable CUDA GPU; "
            "set resources.device = 'cpu' (or 'auto')"
        )
    if r.num_gpus > gpus:
        raise SpecError(
            f"resources.num_gpus: each node asks for {r.num_gpus:g} GPUs but this machine has "
            f"{gpus}; give at most {gpus} (a fraction such as 0.25 shares one GPU between nodes)"
        )


def check_data(spec: Spec) -> None:
    """Load and split the run's data once, so that a data problem stops the run before Ray.

    The result stays in this process's cache (`fedkd.assembly.federated_data`), where the
    ServerApp, which `fedkd run` runs in this process, finds it; the nodes' processes read the
    partitions from the on-disk cache.

    Raises
    ------
    SpecError
        With the data layer's one-line message (the file, its contents, the partition or the
        proxy set).
    """
    from fedkd.assembly import federated_data
    from fedkd.data import DataError

    try:
        federated_data(spec)
    except DataError as err:
        raise SpecError(str(err)) from None


def check_algorithm(spec: Spec) -> None:
    """Build the algorithm's server side once, so that a parameter its constructor refuses for
    this run's data (`strategies.params.ParamError`, e.g. more inputs per group than a round
    sends) stops the run before Ray.

    Raises
    ------
    SpecError
        With the parameter's one-line message.
    """
    from fedkd.assembly import build_strategy, federated_data
    from strategies.params import ParamError

    try:
        build_strategy(spec, federated_data(spec))
    except ParamError as err:
        raise SpecError(f"algorithm.{err}") from None


def check_privacy(spec: Spec) -> None:
    """Refuse a DP-SGD target that the client's other releases use up on their own.

    Each client would find out while calibrating its noise, inside the engine; the check needs
    no data (the other releases' cost depends on their noise only).

    Raises
    ------
    SpecError
        If nothing of ``privacy.target_epsilon`` is left for DP-SGD.
    """
    from fedkd.assembly import dpsgd_settings

    settings = dpsgd_settings(spec)
    if settings is None or settings.target_epsilon <= 0:
        return
    from fedkd.privacy.calibration import check_room_for_dpsgd  # imports dp-accounting

    try:
        check_room_for_dpsgd(settings.target_epsilon, settings.delta, settings.other_releases)
    except ValueError as err:
        raise SpecError(f"privacy.target_epsilon: {err}") from None
