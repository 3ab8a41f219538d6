"""The byte format of a client's state between phases and rounds, written in this one place.

A node keeps each hosted client's state as bytes (Flower node state in a simulation, a dict in
tests), and both learners read and write them: the per-client loop through `ClientState`, the
vectorised learner through its stacked states. Both go through this module, so a client may be
trained by either learner in any round and the format cannot drift between them.

A state blob is ``torch.save`` of a dict: the student's ``state_dict`` and both optimizers'
``state_dict`` in torch's own format (`SavedClientState`); a PATE client keeps its teachers
instead (`encode_teachers`). States live only within a run, so the format has no version.

Decoding runs Python's C unpickler restricted to what these blobs hold (tensors, dicts, lists,
tuples, numbers, strings): ``torch.load(weights_only=True)`` is as strict but runs a pure-Python
unpickler, slow when every client's state is read each phase. Anything else in a blob is refused.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import types
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor


@dataclass
class SavedClientState:
    """A client's state as stored: its student and both optimizers in torch's formats.

    Attributes
    ----------
    client_id : int
        The client's partition id.
    arch : str
        The student's architecture (a zoo name); loading into another architecture is refused.
    model : Mapping[str, Tensor]
        The student's ``state_dict``.
    private_opt, distill_opt : dict
        The private-training and distillation optimizers' ``state_dict`` (``{"state": ...,
        "param_groups": ...}``, torch's format, so ``Optimizer.load_state_dict`` reads them).
    rounds_trained : int
        Rounds of private training the client has done.
    dp_steps : int
        DP-SGD steps over the run (the server charges any its ledger lacks).
    """

    client_id: int
    arch: str
    model: Mapping[str, Tensor]
    private_opt: dict[str, Any]
    distill_opt: dict[str, Any]
    rounds_trained: int = 0
    dp_steps: int = 0


_FIELDS = tuple(f.name for f in fields(SavedClientState))


class _StateUnpickler(pickle.Unpickler):
    """Python's C unpickler, allowed to build only what a client state blob holds.

    torch resolves storage types itself (``persistent_load``) before calling `find_class`, so
    rebuilding tensors and the ``OrderedDict`` of a ``state_dict`` are the only globals needed.
    """

    ALLOWED = frozenset({("torch._utils", "_rebuild_tensor_v2"), ("collections", "OrderedDict")})

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(
                f"a client state never holds '{module}.{name}'; refusing to load it"
            )
        return super().find_class(module, name)


_STATE_PICKLE = types.ModuleType("fedkd_state_pickle")  # what torch.load wants of pickle
_STATE_PICKLE.__dict__.update(
    {k: getattr(pickle, k) for k in ("load", "loads", "Pickler", "UnpicklingError")}
)
_STATE_PICKLE.Unpickler = _StateUnpickler  # type: ignore[attr-defined]


def _dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _loads(blob: bytes) -> Any:
    return torch.load(io.BytesIO(blob), weights_only=False, pickle_module=_STATE_PICKLE)


class StateCache:
    """Decoded client states by content hash: this process's own recent writes.

    A node's blobs come back unchanged in the next phase (digest after local training,
    evaluation after digest) and, when the same Ray actor serves the node, in the next round;
    a hit skips unpickling. Keyed by a hash of the bytes, so a stale entry can never be used.

    Parameters
    ----------
    max_bytes : int, default 1 GiB
        The oldest entries are dropped once the blobs they stand for exceed this size.
    """

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[bytes, tuple[SavedClientState, int]] = OrderedDict()
        self._size = 0

    @staticmethod
    def key(blob: bytes) -> bytes:
        """The cache key of `blob`: a 16-byte hash of its content."""
        return hashlib.blake2b(blob, digest_size=16).digest()

    def get(self, blob: bytes) -> SavedClientState | None:
        """The decoded state of `blob` if this cache holds it, else None."""
        hit = self._entries.get(self.key(blob))
        return None if hit is None else hit[0]

    def put(self, blob: bytes, saved: SavedClientState) -> None:
        """Remember `saved` as the decoded form of `blob`."""
        key = self.key(blob)
        if key in self._entries:
            return
        self._entries[key] = (saved, len(blob))
        self._size += len(blob)
        while self._size > self.max_bytes and self._entries:
            _, (_, size) = self._entries.popitem(last=False)
            self._size -= size


_STATE_CACHE = StateCache()


def encode_client_state(saved: SavedClientState, *, remember: bool = False) -> bytes:
    """The bytes of a client's state.

    Parameters
    ----------
    saved : SavedClientState
        The state to write.
    remember : bool, default False
        Also keep `saved` as the decoded form of the bytes in this process's cache, so that a
        shared decode of them (`decode_client_state` with ``shared=True``) skips unpickling.
        Only for a caller that never changes `saved`'s tensors afterwards.

    Returns
    -------
    bytes
        ``torch.save`` of the state's fields as a dict.
    """
    blob = _dumps({name: getattr(saved, name) for name in _FIELDS})
    if remember:
        _STATE_CACHE.put(blob, saved)
    return blob


def decode_client_state(blob: bytes, *, shared: bool = False) -> SavedClientState:
    """A client's state from its bytes.

    Parameters
    ----------
    blob : bytes
        Bytes written by `encode_client_state`.
    shared : bool, default False
        Serve the state from (and add it to) this process's cache. The result is then shared
        by every caller: its tensors must be copied, never changed in place. Without it the
        tensors are fresh (``Optimizer.load_state_dict`` keeps the state's tensors and steps
        them in place).

    Returns
    -------
    SavedClientState

    Raises
    ------
    pickle.UnpicklingError
        The blob holds an object a client state never holds.
    ValueError
        The blob is not a client state (other fields).
    """
    if shared:
        saved = _STATE_CACHE.get(blob)
        if saved is not None:
            return saved
    raw = _loads(blob)
    if not isinstance(raw, dict) or set(raw) != set(_FIELDS):
        found = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(f"not a client state: expected fields {list(_FIELDS)}, found {found}")
    saved = SavedClientState(**raw)
    if shared:
        _STATE_CACHE.put(blob, saved)
    return saved


def encode_teachers(teachers: list[dict[str, Any]]) -> bytes:
    """The bytes of a PATE client's teachers: one ``{"model": ..., "opt": ...}`` per teacher
    (the teacher's and its optimizer's ``state_dict``)."""
    return _dumps({"teachers": teachers})


def decode_teachers(blob: bytes) -> list[dict[str, Any]]:
    """A PATE client's teachers from `encode_teachers`'s bytes (fresh tensors).

    Raises
    ------
    pickle.UnpicklingError
        The blob holds an object a client state never holds.
    ValueError
        The blob holds no teachers.
    """
    raw = _loads(blob)
    if not isinstance(raw, dict) or set(raw) != {"teachers"}:
        raise ValueError("not a PATE client's teachers: expected the one field 'teachers'")
    return raw["teachers"]


__all__ = [
    "SavedClientState",
    "StateCache",
    "decode_client_state",
    "decode_teachers",
    "encode_client_state",
    "encode_teachers",
]
