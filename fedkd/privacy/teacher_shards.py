"""Which of a client's PATE teachers learns from which private example.

PATE's accounting charges one vote's change per query (the vote histogram moves by at most
sqrt(2) in L2) under the add-or-remove-one-example relation. That holds only if adding or
removing one example changes the training data of exactly one teacher. A split by position
(a permutation of the client's examples cut into slices) breaks it: one example fewer shifts
most examples to another slice, and every teacher's vote can change.

Here each example goes to the teacher given by a keyed hash of its own content (input bytes
and label) modulo the number of teachers. The assignment of an example never depends on the
other examples, so adding or removing one changes exactly one teacher's shard. The key need
not be secret: the guarantee holds for any assignment that is a fixed function of the
example; the key only varies the split between runs and clients. Shards are balanced in
expectation (each example lands on each teacher with probability 1/T); their sizes vary by
about sqrt(n / T) around n / T.
"""

from __future__ import annotations

import hashlib

import numpy as np

__all__ = ["teacher_assignment", "teacher_shards"]


def teacher_assignment(x: np.ndarray, y: np.ndarray, num_teachers: int, key: int) -> np.ndarray:
    """The teacher of every example: a keyed BLAKE2b hash of its content, mod `num_teachers`.

    Parameters
    ----------
    x : ndarray, shape (n, ...)
        Private inputs.
    y : ndarray, shape (n,)
        Their labels.
    num_teachers : int
        Number of teachers T (>= 1).
    key : int
        Hash key (e.g. derived from the run seed and the client id); any value gives a valid
        assignment.

    Returns
    -------
    ndarray of int64, shape (n,)
        Teacher index in ``0 .. T - 1`` of each example; equal examples share a teacher.
    """
    if num_teachers < 1:
        raise ValueError(f"num_teachers must be >= 1, got {num_teachers}")
    if len(x) != len(y):
        raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
    key_bytes = int(key).to_bytes(16, "little", signed=True)
    teachers = np.empty(len(y), dtype=np.int64)
    for i in range(len(y)):
        h = hashlib.blake2b(digest_size=8, key=key_bytes)
        h.update(np.ascontiguousarray(x[i]).tobytes())
        h.update(np.asarray(y[i], dtype=np.int64).tobytes())
        teachers[i] = int.from_bytes(h.digest(), "little") % num_teachers
    return teachers


def teacher_shards(x: np.ndarray, y: np.ndarray, num_teachers: int, key: int) -> list[np.ndarray]:
    """Positions of each teacher's examples (see :func:`teacher_assignment`).

    Returns
    -------
    list of ndarray of int64
        ``num_teachers`` index arrays into ``x``/``y``, disjoint, together covering every
        example; a shard may be empty when a client has few examples.
    """
    teachers = teacher_assignment(x, y, num_teachers, key)
    return [np.flatnonzero(teachers == t) for t in range(num_teachers)]
