"""The ServerApp `flwr run .` loads (pyproject: ``[tool.flwr.app.components]``).

It is the apps' ServerApp with the end-of-run audit attached: the run layer composes the two,
since the apps do not import the audit.
"""

from fedkd.apps.server_app import make_flwr_server_app
from fedkd.audit.run_audit import audit_finished_run

app = make_flwr_server_app(after_run=audit_finished_run)
