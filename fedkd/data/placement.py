"""Which node hosts which clients: cohorts balanced by example count.

A node's learner time grows with the examples its clients train on, and a round waits for the
slowest node; so clients go to nodes by size, not by id.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence


def balanced_groups(sizes: Sequence[int], num_groups: int) -> list[list[int]]:
    """Split item indices into `num_groups` groups whose summed sizes are close.

    Longest-processing-time-first: items from the largest to the smallest (ties by index) each
    go to the group with the smallest total so far (ties by group index) among the groups with
    fewer than ``ceil(len(sizes) / num_groups)`` items, so no group holds more items than an
    even split by count would give it. Deterministic from `sizes`.

    Parameters
    ----------
    sizes : Sequence[int]
        Size (e.g. training examples) of each item; item ``i`` has size ``sizes[i]``.
    num_groups : int
        Number of groups (nodes), at least 1.

    Returns
    -------
    list[list[int]]
        For each group, its item indices in increasing order.
    """
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    cap = math.ceil(len(sizes) / num_groups) if len(sizes) else 0
    groups: list[list[int]] = [[] for _ in range(num_groups)]
    # (total size, group index) of the groups that still have room
    open_groups = [(0, g) for g in range(num_groups)]
    for item in sorted(range(len(sizes)), key=lambda i: (-int(sizes[i]), i)):
        total, g = heapq.heappop(open_groups)
        groups[g].append(item)
        if len(groups[g]) < cap:
            heapq.heappush(open_groups, (total + int(sizes[item]), g))
    return [sorted(g) for g in groups]


__all__ = ["balanced_groups"]
