"""Client state stores: the disk file, spilling past a memory budget."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedkd.learner.state_store import DiskStateStore, SpillingStateStore


def _blob(cid: int, size: int) -> bytes:
    return bytes((cid + i) % 251 for i in range(size))


def test_disk_store_round_trips_and_reopens(tmp_path: Path) -> None:
    path = tmp_path / "node-0.bin"
    store = DiskStateStore(path, num_slots=10)
    assert len(store) == 0 and 3 not in store
    store[3] = _blob(3, 5000)
    store[7] = _blob(7, 100)
    store[3] = _blob(4, 4000)  # rewritten in its slot
    store[7] = _blob(8, 20000)  # grows: a new slot
    store.close()
    again = DiskStateStore(path, num_slots=10)  # e.g. another Ray actor, next round
    assert sorted(again) == [3, 7]
    assert again[3] == _blob(4, 4000) and again[7] == _blob(8, 20000)
    assert again.stored_bytes() == 24000
    del again[3]
    assert 3 not in again and sorted(again) == [7]
    with pytest.raises(KeyError):
        again[3]
    with pytest.raises(KeyError):
        again[10] = b"x"  # outside the run's client ids


def test_disk_store_refuses_another_runs_file(tmp_path: Path) -> None:
    path = tmp_path / "node-0.bin"
    DiskStateStore(path, num_slots=10).close()
    with pytest.raises(ValueError, match="not a client state store of 20 slots"):
        DiskStateStore(path, num_slots=20)


def test_spilling_store_keeps_memory_within_budget(tmp_path: Path) -> None:
    memory: dict[int, bytes] = {}
    path = tmp_path / "node-0.bin"
    store = SpillingStateStore(memory, path, num_slots=8, budget_bytes=2500)
    for cid in range(5):
        store[cid] = _blob(cid, 1000)
    assert sorted(memory) == [0, 1] and store.memory_bytes == 2000
    assert sorted(store.disk) == [2, 3, 4]
    store[0] = _blob(9, 3000)  # no longer fits: moves to disk, making room
    store[3] = _blob(3, 1500)  # fits now: moves to memory
    assert sorted(memory) == [1, 3] and sorted(store.disk) == [0, 2, 4]
    assert store.memory_bytes == 2500
    # A later store (next message) finds both halves.
    later = SpillingStateStore(memory, path, num_slots=8, budget_bytes=2500)
    assert {c: later[c] for c in later} == {
        0: _blob(9, 3000),
        1: _blob(1, 1000),
        2: _blob(2, 1000),
        3: _blob(3, 1500),
        4: _blob(4, 1000),
    }
    del later[0], later[1]
    assert sorted(later) == [2, 3, 4] and later.memory_bytes == 1500


def test_spilling_store_within_budget_writes_no_file(tmp_path: Path) -> None:
    path = tmp_path / "node-0.bin"
    store = SpillingStateStore({}, path, num_slots=4, budget_bytes=10_000)
    store[1] = _blob(1, 1000)
    assert store.disk is None and not path.exists()
    nowhere = SpillingStateStore({}, None, num_slots=4, budget_bytes=0)
    nowhere[1] = _blob(1, 1000)  # no spill file: memory, whatever the budget
    assert nowhere.memory_bytes == 1000


def test_spilled_states_give_the_same_metrics_as_fewer_larger_nodes_in_memory(tmp_path: Path):
    """200 clients, 20 sampled per round: 4 nodes whose states spill past a 1 MiB budget (some
    clients in memory, the rest on disk), and 2 nodes all on disk, give the metrics of 2 nodes
    that keep every state in memory; the spill files are gone when the run ends."""
    from fedkd.apps.server_app import NODE_STATES
    from tests.test_engine import TIMINGS, run_inprocess

    many = ["clients.num_clients=200", "clients.fraction=0.1", "rounds=3", "data.partition=iid"]
    runs = {
        "memory": ["clients.clients_per_node=100"],
        "spilled": ["clients.clients_per_node=50", "resources.state_memory_mb=1"],
        "disk": ["clients.clients_per_node=100", "resources.state_memory_mb=0"],
    }
    rows, held = {}, {}
    for name, overrides in runs.items():
        _, _, rows[name], grid = run_inprocess(tmp_path, many + overrides, name=name)
        held[name] = [sum(k.startswith("client.") for k in c.state) for c in grid.contexts.values()]
        assert not (tmp_path / name / NODE_STATES).exists()
    comparable = {
        name: [{k: v for k, v in row.items() if k not in TIMINGS} for row in r]
        for name, r in rows.items()
    }
    assert comparable["spilled"] == comparable["memory"]
    assert comparable["disk"] == comparable["memory"]
    assert rows["memory"][-1]["clients_ok"] == 20
    # Where the states were: all in the nodes' memory, some, none.
    assert sum(held["memory"]) > 40, held
    assert all(n > 0 for n in held["spilled"]) and sum(held["spilled"]) < sum(held["memory"])
    assert held["disk"] == [0, 0]
