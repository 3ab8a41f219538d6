"""Checkpoints of a run after every round, and what `fedkd run --resume` reads back.

Layout under the run folder (docs/errors-and-stops.md, "Resume")::

    checkpoints/round-0007/server.pt       the server's state after round 7
    checkpoints/round-0007/COMPLETE        written last: the checkpoint is whole
    checkpoints/clients/client-3/round-0007.npz   client 3's state bytes as of round 7

A server checkpoint is written into a temporary folder and renamed into place (`os.replace`),
so a kill during the write leaves the previous one usable; the last two are kept. Client states
live on the nodes: each node writes the clients it served in a round (a file per client and
round, also renamed into place), and a client's state as of round r is its newest file of a
round up to r. In simulation the nodes write beside the run (the server names the folder); a
deployed site keeps its own folder (its node config's ``checkpoint-dir``).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from fedkd.results import RunRecorder
from fedkd.rounds.hooks import LoopState, RoundHook, RoundState

CHECKPOINTS = "checkpoints"
SERVER_FILE = "server.pt"
COMPLETE = "COMPLETE"
# Server checkpoints kept; and client files kept per client (a node may already have written
# the round after the newest complete server checkpoint when the run was killed).
KEEP_SERVER = 2
KEEP_CLIENT = 3


class CheckpointError(ValueError):
    """A run folder that cannot be resumed, phrased as one line with the fix."""


def round_dir(root: Path, rnd: int) -> Path:
    """The folder of round `rnd`'s server checkpoint under `root` (a run's checkpoints)."""
    return root / f"round-{rnd:04d}"


def _round_of(path: Path) -> int | None:
    stem = path.name.removesuffix(".npz")
    if not stem.startswith("round-") or not stem[6:].isdigit():
        return None
    return int(stem[6:])


def complete_rounds(root: Path) -> list[int]:
    """Rounds with a whole server checkpoint under `root`, oldest first."""
    if not root.is_dir():
        return []
    rounds = [_round_of(p) for p in root.iterdir() if (p / COMPLETE).is_file()]
    return sorted(r for r in rounds if r is not None)


def last_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest whole checkpoint of a run folder, or None."""
    root = Path(run_dir) / CHECKPOINTS
    rounds = complete_rounds(root)
    return round_dir(root, rounds[-1]) if rounds else None


def checkpoint_info(path: Path) -> dict[str, int]:
    """A whole checkpoint's ``round`` and ``rows`` (metrics rows final when it was written)."""
    return json.loads((path / COMPLETE).read_text())


def write_server_checkpoint(root: Path, rnd: int, rows: int, state: dict[str, Any]) -> Path:
    """Write round `rnd`'s server state atomically; prune all but the last `KEEP_SERVER`.

    `rows`: how many metrics rows are final at this point (a resumed run keeps those).
    """
    final = round_dir(root, rnd)
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # Plain pickle, not torch.save: torch's pickler calls back into Python for every object,
    # and a round's open exchange holds thousands of small arrays (the server waits on this
    # write between rounds). Torch tensors still pickle, each through torch's own reduce.
    with open(tmp / SERVER_FILE, "wb") as fh:
        pickle.dump(state, fh, protocol=pickle.HIGHEST_PROTOCOL)
    (tmp / COMPLETE).write_text(json.dumps({"round": rnd, "rows": rows}) + "\n")
    shutil.rmtree(final, ignore_errors=True)  # a half-written one from a killed run
    os.replace(tmp, final)
    for old in complete_rounds(root)[:-KEEP_SERVER]:
        shutil.rmtree(round_dir(root, old), ignore_errors=True)
    return final


def read_server_checkpoint(path: Path) -> dict[str, Any]:
    """A server checkpoint written by `write_server_checkpoint` (fedkd's own file)."""
    file = path / SERVER_FILE
    if zipfile.is_zipfile(file):  # written by torch.save (fedkd before plain pickle)
        import torch  # here only: the run folder's readers (fedkd report) need no torch

        return torch.load(file, weights_only=False)
    with open(file, "rb") as fh:
        return pickle.load(fh)


def _client_dir(root: Path, client_id: int) -> Path:
    return root / "clients" / f"client-{client_id}"


def save_client_state(root: Path, client_id: int, rnd: int, blobs: dict[str, bytes]) -> None:
    """Keep a client's state bytes (per kind: ``client``, ``released``, ``kept``) as of round
    `rnd`."""
    folder = _client_dir(root, client_id)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"round-{rnd:04d}.npz"
    tmp = folder / f".{final.name}.{os.getpid()}.tmp"
    with open(tmp, "wb") as fh:
        np.savez(fh, **{k: np.frombuffer(v, dtype=np.uint8) for k, v in blobs.items()})
    os.replace(tmp, final)
    files = sorted(
        (p for p in folder.glob("round-*.npz") if _round_of(p) is not None), key=_round_of
    )
    for old in files[:-KEEP_CLIENT]:
        old.unlink(missing_ok=True)


def load_client_state(root: Path, client_id: int, rnd: int) -> dict[str, bytes] | None:
    """A client's state bytes as of round `rnd` (its newest file up to it), or None."""
    folder = _client_dir(root, client_id)
    if not folder.is_dir():
        return None
    rounds = [(r, p) for p in folder.glob("round-*.npz") if (r := _round_of(p)) is not None]
    rounds = [(r, p) for r, p in rounds if r <= rnd]
    if not rounds:
        return None
    with np.load(max(rounds)[1]) as npz:
        return {k: npz[k].tobytes() for k in npz.files}


class CheckpointHook(RoundHook):
    """Writes the server's side of a checkpoint after every round.

    Parameters
    ----------
    root : Path
        The run's checkpoints folder.
    strategy : object
        The algorithm's server side (its `state_dict` / `load_state_dict`).
    hooks : list of RoundHook
        The other hooks whose state a round leaves (e.g. the ledger).
    loop : LoopState
        The round loop's own bookkeeping.
    recorder : RunRecorder
        The results folder (how many rows are final at the checkpoint).
    """

    def __init__(
        self,
        root: Path,
        strategy: Any,
        hooks: list[RoundHook],
        loop: LoopState,
        recorder: RunRecorder,
    ) -> None:
        self.root = root
        self.strategy = strategy
        self.hooks = hooks
        self.loop = loop
        self.recorder = recorder

    def after_round(self, rnd: int, row: dict[str, Any], state: RoundState) -> None:
        write_server_checkpoint(
            self.root,
            rnd,
            len(self.recorder.rounds),
            {
                "loop": self.loop,
                "strategy": self.strategy.state_dict(),
                "hooks": [hook.state_dict() for hook in self.hooks],
            },
        )

    def restore(self, path: Path) -> LoopState:
        """Load a checkpoint into the strategy and the hooks; return the loop's bookkeeping."""
        saved = read_server_checkpoint(path)
        self.strategy.load_state_dict(saved["strategy"])
        for hook, hook_state in zip(self.hooks, saved["hooks"], strict=True):
            hook.load_state_dict(hook_state)
        self.loop = saved["loop"]
        return self.loop
