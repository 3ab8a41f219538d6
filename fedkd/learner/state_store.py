"""Where a node keeps its clients' state bytes between rounds: in memory, or spilled to disk.

A client's state (`fedkd.learner.state_codec`: its student and both optimizers) is a few
hundred kB for a small CNN, so a node hosting thousands of clients holds gigabytes. In a
simulation the node's memory is Flower's node state, which the engine hands to the Ray actor
serving the node with every message and takes back with its reply: cheap for a few hundred
clients, a copy of gigabytes per message for thousands. `SpillingStateStore` keeps states in
that memory while their total stays within a budget and writes the rest into a `DiskStateStore`,
one file per node, from which a round reads only the clients it runs. Both hold the same
bytes, so where a state lives never changes a number.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, MutableMapping
from pathlib import Path

import numpy as np

# Header: magic, format version, number of slots, end of the data region (bytes), capacity
# given to a new slot (bytes), then (offset, length, capacity) per slot; length -1 = empty.
_MAGIC = 0x666B645354415445  # "fkdSTATE"
_VERSION = 1
_HEAD = 5
_FIELDS = 3
_ALIGN = 4096  # slots start on page boundaries


class DiskStateStore(MutableMapping[int, bytes]):
    """Client state bytes in one file: a memory-mapped index, and one slot per client.

    Keys are client ids in ``[0, num_slots)``. The index (each slot's offset, length and
    capacity) is a ``numpy.memmap`` at the head of the file; the bytes are read and written
    with positioned reads and writes (``os.pread``/``os.pwrite``) rather than through a
    mapping, so that the pages of states already read or written never count in the process's
    resident memory. A state rewritten in place if it fits its slot, else in a new slot at the
    end of the file (the old one is not reused): a client's state grows at most twice (its
    optimizers' buffers appear on their first steps), and new slots get the largest size seen.

    The file may be opened by another process after this one closed it (a Ray actor serving
    the node next round): everything it needs is in the file. Two processes must not write it
    at the same time.

    Parameters
    ----------
    path : Path
        The file; created (with its folder) if missing.
    num_slots : int
        Client ids it can hold (the run's number of clients); must match an existing file's.
    """

    def __init__(self, path: Path, num_slots: int) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        head_bytes = (_HEAD + _FIELDS * num_slots) * 8
        fresh = not self.path.exists() or self.path.stat().st_size < head_bytes
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        if fresh:
            os.ftruncate(self._fd, _aligned(head_bytes))
        self._head = np.memmap(self.path, dtype=np.int64, mode="r+", shape=(head_bytes // 8,))
        if fresh:
            self._head[:_HEAD] = (_MAGIC, _VERSION, num_slots, _aligned(head_bytes), 0)
            self._slots[:, 1] = -1
        elif tuple(self._head[:3]) != (_MAGIC, _VERSION, num_slots):
            self.close()
            raise ValueError(
                f"{self.path} is not a client state store of {num_slots} slots; "
                "delete it or give the run another folder"
            )

    @property
    def _slots(self) -> np.ndarray:
        return self._head[_HEAD:].reshape(-1, _FIELDS)

    def _slot(self, client_id: int) -> np.ndarray:
        if not 0 <= client_id < len(self._slots):
            raise KeyError(client_id)
        return self._slots[client_id]

    def __getitem__(self, client_id: int) -> bytes:
        offset, length, _ = (int(v) for v in self._slot(client_id))
        if length < 0:
            raise KeyError(client_id)
        blob = os.pread(self._fd, length, offset)
        if len(blob) != length:
            raise OSError(f"{self.path}: client {client_id}'s state is cut short")
        return blob

    def __setitem__(self, client_id: int, blob: bytes) -> None:
        slot = self._slot(client_id)
        if len(blob) > slot[2]:  # a new slot at the end of the file
            capacity = _aligned(max(len(blob), int(self._head[4])))
            slot[0], slot[2] = self._head[3], capacity
            self._head[3] += capacity
            self._head[4] = max(int(self._head[4]), len(blob))
        if os.pwrite(self._fd, blob, int(slot[0])) != len(blob):
            raise OSError(f"{self.path}: short write of client {client_id}'s state")
        slot[1] = len(blob)

    def __delitem__(self, client_id: int) -> None:
        slot = self._slot(client_id)
        if slot[1] < 0:
            raise KeyError(client_id)
        slot[1] = -1

    def __contains__(self, client_id: object) -> bool:
        return (
            isinstance(client_id, int)
            and 0 <= client_id < len(self._slots)
            and self._slots[client_id, 1] >= 0
        )

    def __iter__(self) -> Iterator[int]:
        return (int(c) for c in np.flatnonzero(self._slots[:, 1] >= 0))

    def __len__(self) -> int:
        return int((self._slots[:, 1] >= 0).sum())

    def stored_bytes(self) -> int:
        """Bytes of the states it holds (the file is larger: slots have room to spare)."""
        lengths = self._slots[:, 1]
        return int(lengths[lengths >= 0].sum())

    def close(self) -> None:
        """Release the file (the states stay in it)."""
        if self._fd >= 0:
            del self._head
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0 and hasattr(self, "_head"):
            self.close()


def _aligned(size: int) -> int:
    return -(-size // _ALIGN) * _ALIGN


class SpillingStateStore(MutableMapping[int, bytes]):
    """Client states in `memory` while their total is within `budget_bytes`, else on disk.

    A state is written where it fits: into `memory` if the states held there, with it, stay
    within the budget (it leaves the disk), otherwise into a `DiskStateStore` at `spill_path`
    (it leaves `memory`). Reads look in `memory` first. The two hold disjoint clients; the
    file is created on the first state that spills, so a run within its budget writes none.

    Parameters
    ----------
    memory : MutableMapping[int, bytes]
        The node's own memory (Flower node state in a simulation, a dict in tests).
    spill_path : Path or None
        The node's `DiskStateStore` file; None: everything stays in `memory`.
    num_slots : int
        Client ids the file can hold (the run's number of clients).
    budget_bytes : int
        At most this many bytes of states in `memory` (0: every state goes to disk).
    """

    def __init__(
        self,
        memory: MutableMapping[int, bytes],
        spill_path: Path | None,
        num_slots: int,
        budget_bytes: int,
    ) -> None:
        self.memory = memory
        self.spill_path = spill_path
        self.num_slots = num_slots
        self.budget_bytes = budget_bytes
        self._in_memory = sum(len(memory[c]) for c in memory)
        self._disk: DiskStateStore | None = None
        if spill_path is not None and Path(spill_path).exists():
            self._disk = DiskStateStore(spill_path, num_slots)

    @property
    def disk(self) -> DiskStateStore | None:
        """The spill file, if any state went there (by this store or an earlier one)."""
        return self._disk

    def __getitem__(self, client_id: int) -> bytes:
        if client_id in self.memory:
            return self.memory[client_id]
        if self._disk is not None:
            return self._disk[client_id]
        raise KeyError(client_id)

    def __setitem__(self, client_id: int, blob: bytes) -> None:
        held = len(self.memory[client_id]) if client_id in self.memory else 0
        if self.spill_path is None or self._in_memory - held + len(blob) <= self.budget_bytes:
            self.memory[client_id] = blob
            self._in_memory += len(blob) - held
            if self._disk is not None and client_id in self._disk:
                del self._disk[client_id]
            return
        if self._disk is None:
            self._disk = DiskStateStore(self.spill_path, self.num_slots)
        self._disk[client_id] = blob
        if held:
            del self.memory[client_id]
            self._in_memory -= held

    def __delitem__(self, client_id: int) -> None:
        if client_id in self.memory:
            self._in_memory -= len(self.memory[client_id])
            del self.memory[client_id]
        elif self._disk is not None and client_id in self._disk:
            del self._disk[client_id]
        else:
            raise KeyError(client_id)

    def __contains__(self, client_id: object) -> bool:
        return client_id in self.memory or (self._disk is not None and client_id in self._disk)

    def __iter__(self) -> Iterator[int]:
        yield from self.memory
        if self._disk is not None:
            yield from self._disk

    def __len__(self) -> int:
        return len(self.memory) + (0 if self._disk is None else len(self._disk))

    @property
    def memory_bytes(self) -> int:
        """Bytes of the states held in `memory`."""
        return self._in_memory


__all__ = ["DiskStateStore", "SpillingStateStore"]
