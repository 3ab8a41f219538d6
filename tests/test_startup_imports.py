"""What a Ray worker imports before its first client trains (start-up time, issue 27).

Every simulation worker is a fresh process that imports the ClientApp before answering the
server's discovery: a heavy library that only some runs use belongs inside the function that
needs it. Checked in a fresh interpreter, since this test process may have imported it already.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def modules_after_import(module: str) -> set[str]:
    """The top-level packages a fresh interpreter holds after importing `module`."""
    code = (
        f"import sys, {module}; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return set(out.stdout.split())


def test_the_client_app_imports_no_scipy():
    # scipy.special served PATE's accounting only, which runs in the server.
    loaded = modules_after_import("fedkd.apps.client_app")
    assert "torch" in loaded  # the check sees what the import pulled in
    assert "scipy" not in loaded


def test_pate_accounting_still_works_without_scipy_imported_up_front():
    import numpy as np

    from fedkd.privacy.pate import log_q_gnmax

    logq = log_q_gnmax(np.array([[10.0, 0.0, 0.0], [4.0, 3.0, 3.0]]), sigma=1.0)
    assert logq.shape == (2,) and logq[0] < logq[1] <= 0.0


def test_the_driver_imports_no_accounting_or_audit_libraries_before_the_engine():
    # `fedkd run` imports these before Ray starts; dp-accounting (through the ledger),
    # scikit-learn and scipy (through the end-of-run audit hook) are used only by a private
    # run's accounting or by an audit, and cost seconds before the first round otherwise.
    loaded = modules_after_import("fedkd.run.cli, fedkd.apps.server_app, fedkd.audit.run_audit")
    assert "torch" in loaded and "flwr" in loaded
    assert not loaded & {"dp_accounting", "sklearn", "scipy"}
