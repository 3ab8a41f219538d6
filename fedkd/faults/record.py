"""The metrics fields of a faulty run (see docs/faults.md)."""

from __future__ import annotations

from typing import Any

# A round's counts in its metrics row, and the names of their client lists in the row's
# ``faults_clients``.
FAULT_COUNTS = {
    "faults_crashed": "crashed",
    "faults_straggled": "straggled",
    "faults_late": "late",
    "faults_nan": "nan",
    "byzantine_uploads": "byzantine",
    "defence_rejected": "defence_rejected",
    "defence_downweighted": "defence_downweighted",
}


def fault_totals(rows: list[dict[str, Any]]) -> dict[str, int]:
    """The run's totals of the rows' fault counts, as ``total_<count>`` ({} without faults).

    Parameters
    ----------
    rows : list of dict
        The run's metrics rows.

    Returns
    -------
    dict of str to int
        One total per count that the rows hold.
    """
    return {
        f"total_{name}": sum(r[name] for r in rows if name in r)
        for name in FAULT_COUNTS
        if any(name in r for r in rows)
    }
