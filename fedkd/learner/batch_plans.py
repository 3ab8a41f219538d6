"""Batch plans: the per-client minibatches of a stack of clients, aligned step by step.

Each client of a stack must see exactly the minibatches the per-client loop would show it, in
the same order. A plan lays each client's batches end to end over its epochs and aligns the
clients' steps by index; a short batch is padded with weight-0 rows. Stacking clients in
order of their step counts, most first, makes the clients that still have a batch at any step
the first ones of the stack, so a step computes on them alone (`BatchPlan.computed`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class BatchPlan:
    """Aligned minibatches of K clients: step t of client k uses rows ``index[t, k, :size]``.

    ``index`` is padded (with a valid row) to the longest batch of each step; ``weight`` is
    ``1 / size`` on a client's real rows and 0 on padding, so a weighted sum of per-example
    losses is the mean over the true batch; ``size`` 0 means the client takes no step.
    """

    index: Tensor  # (T, K, B) int64, rows of the concatenated data
    weight: Tensor  # (T, K, B) float32
    size: Tensor  # (T, K) int64
    width: list[int] = field(default_factory=list)  # longest batch of each step
    # Per step: how many leading clients of the stack it computes: the clients that take it
    # when they are the first ones of the stack (clients ordered by step count), else all K
    # (the steppers are scattered: the whole stack, the others masked out of the update).
    computed: list[int] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return len(self.width)

    @property
    def real_rows(self) -> int:
        """Examples trained on: the rows of all clients' batches."""
        return int(self.size.sum())

    @property
    def computed_rows(self) -> int:
        """Rows the steps compute: each step's computed clients times its longest batch."""
        return sum(a * w for a, w in zip(self.computed, self.width, strict=True))


def batch_rows(batch_size: int, group_size: int = 1) -> int:
    """Rows of a full minibatch made of whole groups of `group_size` rows: as many groups as
    fit in `batch_size`, at least one."""
    return max(1, batch_size // group_size) * group_size


def shuffled_batches(
    n: int, batch_size: int, gen: torch.Generator, group_size: int = 1
) -> list[Tensor]:
    """One epoch's minibatches of `n` rows, in an order drawn from `gen`.

    The ``n // group_size`` groups of `group_size` consecutive rows are permuted by
    ``randperm`` and cut into batches of whole groups (`batch_rows`). With ``group_size=1``
    this is ``randperm(n).split(batch_size)``.

    Raises
    ------
    ValueError
        If `n` is not a multiple of `group_size`.
    """
    if group_size < 1 or n % group_size:
        raise ValueError(f"{n} rows do not split into groups of {group_size}")
    groups = torch.randperm(n // group_size, generator=gen)
    rows = (groups[:, None] * group_size + torch.arange(group_size)).flatten()
    return list(rows.split(batch_rows(batch_size, group_size)))


def plan_batches(
    lengths: Sequence[int],
    offsets: Sequence[int],
    epochs: int,
    batch_size: int,
    generators: Sequence[torch.Generator],
    device: torch.device,
    group_size: int = 1,
) -> BatchPlan:
    """The loop's minibatches of every client (see `fedkd.learner.loop.train_supervised`).

    `shuffled_batches` per client per epoch, in epoch order: the same draws the loop makes, so
    the same examples in the same batches (batches of whole groups of `group_size` rows where
    it is above 1). Client k's steps are laid end to end over its epochs; steps are aligned by
    index.
    """
    per_client: list[list[Tensor]] = []
    for n, off, gen in zip(lengths, offsets, generators, strict=True):
        chunks: list[Tensor] = []
        for _ in range(epochs):
            chunks.extend(
                c + int(off) for c in shuffled_batches(int(n), batch_size, gen, group_size)
            )
        per_client.append(chunks)
    steps = max((len(c) for c in per_client), default=0)
    k = len(per_client)
    width = max(1, min(batch_rows(batch_size, group_size), max(lengths, default=1)))
    index = torch.zeros((steps, k, width), dtype=torch.int64)
    weight = torch.zeros((steps, k, width), dtype=torch.float32)
    size = torch.zeros((steps, k), dtype=torch.int64)
    for j, chunks in enumerate(per_client):
        # Padding points at the client's first row, so it is always a real, finite example.
        index[:, j, :] = int(offsets[j]) if lengths[j] else 0
        for t, c in enumerate(chunks):
            index[t, j, : len(c)] = c
            weight[t, j, : len(c)] = 1.0 / len(c)
            size[t, j] = len(c)
    widths = [max(1, int(size[t].max())) for t in range(steps)]
    computed = leading_steppers(size > 0)
    return BatchPlan(index.to(device), weight.to(device), size.to(device), widths, computed)


def leading_steppers(stepping: Tensor) -> list[int]:
    """Per step, how many leading clients of the stack a step must compute.

    Parameters
    ----------
    stepping : Tensor
        ``(T, K)`` bool: client k takes step t.

    Returns
    -------
    list of int
        The number of clients that take step t when they are the first ones of the stack,
        else K (the whole stack, clients without the step masked out of the update).
    """
    k = stepping.shape[1]
    counts = stepping.sum(1).tolist()
    return [a if bool(stepping[t, :a].all()) else k for t, a in enumerate(counts)]


def most_steps_first(client_ids: Sequence[int], num_examples: Callable[[int], int]) -> list[int]:
    """`client_ids` ordered by training set size, largest first (stable): the stacking order
    under which each step's steppers are a prefix of the stack (see `BatchPlan.computed`)."""
    return sorted(client_ids, key=lambda c: -num_examples(c))


__all__ = [
    "BatchPlan",
    "batch_rows",
    "leading_steppers",
    "most_steps_first",
    "plan_batches",
    "shuffled_batches",
]
