"""Start a run on a SuperLink of Flower's deployment engine and report how it ended.

``fedkd submit`` wraps ``flwr run APP CONNECTION --run-config FILE --stream``. Flower 1.41's
``flwr run --stream`` exits 0 even when the run fails, so after the log stream ends the run's
final status is read with ``flwr ls CONNECTION --run-id ID --format json``, and anything but
``finished:completed`` is a failure (exit status 1).

The run config carries the spec the way the Flower apps read it (see
:mod:`fedkd.apps.run_config`): ``spec`` (a path inside the app, which travels to the SuperLink
as part of the Flower App Bundle), ``overrides`` (``"key=value;key=value"``) and ``out-dir``
(a folder on the machine that runs the ServerApp, i.e. the SuperLink's).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from fedkd.apps.run_config import APP_DIR

COMPLETED = "finished:completed"
_RUN_ID = re.compile(r"Successfully started run (\d+)")
# The ServerApp's last log line (fedkd.apps.server_app.make_flwr_server_app) names the results
# folder.
_RESULTS = re.compile(r"fedkd run finished: results in (.+) \((\w+)\)\s*$")


class SubmitError(RuntimeError):
    """A run that could not be submitted (``code`` 2) or did not complete (``code`` 1)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class SubmittedRun:
    """A run that finished completed.

    Attributes
    ----------
    run_id : str
        Flower's run id.
    status : str
        Its final status (``finished:completed``).
    details : dict
        The run's entry in ``flwr ls --format json`` (elapsed time, network traffic, ...).
    results_dir : str or None
        The results folder on the ServerApp's machine, as its log named it.
    """

    run_id: str
    status: str
    details: dict[str, Any]
    results_dir: str | None = None


def flwr_executable() -> str:
    """The ``flwr`` CLI of this Python environment, else the first on PATH."""
    beside = Path(sys.executable).with_name("flwr")
    if beside.is_file():
        return str(beside)
    found = shutil.which("flwr")
    if found is None:
        raise SubmitError("cannot find the flwr command (install flwr, or put it on PATH)", 2)
    return found


def spec_in_app(spec_path: str | Path | None, app_dir: Path) -> str:
    """The spec's path relative to the app folder ("" for the built-in default).

    The ServerApp reads the spec from its copy of the app, so the spec must be inside it.
    """
    if not spec_path:
        return ""
    path = Path(spec_path).expanduser().resolve()
    try:
        return path.relative_to(app_dir.resolve()).as_posix()
    except ValueError:
        raise SubmitError(
            f"spec '{spec_path}' is outside the Flower app folder {app_dir}; the ServerApp reads "
            "specs from its copy of that folder, so put the spec under it (e.g. simulations/)",
            2,
        ) from None


def run_config(spec_rel: str, overrides: Sequence[str], out_dir: str) -> dict[str, str]:
    """The run config the fedkd apps read (see :func:`fedkd.apps.run_config`)."""
    for item in overrides:
        if ";" in item:
            raise SubmitError(
                f"--set {item!r}: ';' separates overrides in the run config; give one "
                "key=value per --set",
                2,
            )
    return {"spec": spec_rel, "overrides": ";".join(overrides), "out-dir": out_dir}


def run_status(
    flwr: str, connection: str, run_id: str, cwd: Path, timeout: float = 60.0
) -> dict[str, Any]:
    """The run's entry in ``flwr ls --run-id ID --format json``."""
    res = subprocess.run(
        [flwr, "ls", connection, "--run-id", run_id, "--format", "json"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    text = res.stdout
    try:
        payload = json.loads(text[text.index("{") :])
    except ValueError:
        raise SubmitError(
            f"flwr ls gave no JSON for run {run_id} (exit {res.returncode}): "
            f"{(text + res.stderr).strip()[-500:]}"
        ) from None
    if not payload.get("success") or not payload.get("runs"):
        raise SubmitError(
            f"flwr ls cannot report run {run_id}: {payload.get('error-message', payload)}"
        )
    return payload["runs"][0]


def final_status(
    flwr: str, connection: str, run_id: str, cwd: Path, wait_s: float = 60.0
) -> dict[str, Any]:
    """Poll ``flwr ls`` until the run is ``finished:*`` (the log stream may end a bit earlier)."""
    deadline = time.monotonic() + wait_s
    entry = run_status(flwr, connection, run_id, cwd)
    while not str(entry.get("status", "")).startswith("finished") and time.monotonic() < deadline:
        time.sleep(1.0)
        entry = run_status(flwr, connection, run_id, cwd)
    return entry


def submit(
    connection: str,
    *,
    spec_path: str | Path | None = None,
    overrides: Sequence[str] = (),
    out_dir: str = "",
    federation_config: str | None = None,
    app_dir: Path = APP_DIR,
    echo: Callable[[str], None] = lambda line: print(line, end="", file=sys.stderr),
    status_wait_s: float = 60.0,
) -> SubmittedRun:
    """Run the spec on the SuperLink behind `connection`; raise unless it finished completed.

    Parameters
    ----------
    connection : str
        A SuperLink connection of the Flower config (``$FLWR_HOME/config.toml``).
    spec_path : str or Path, optional
        The spec, inside `app_dir`; None for the built-in default.
    overrides : sequence of str
        ``key=value`` spec overrides.
    out_dir : str, optional
        Results folder on the machine running the ServerApp ("" for the spec's default,
        relative to the SuperLink's working directory).
    federation_config : str, optional
        ``flwr run --federation-config`` (for a SuperLink in simulation mode).
    app_dir : Path, optional
        The Flower app folder (holding pyproject.toml); default: this fedkd checkout.
    echo : callable, optional
        Receives each line ``flwr run --stream`` prints (the ServerApp's log).
    status_wait_s : float, optional
        How long to wait after the stream ends for the run to be reported finished.

    Returns
    -------
    SubmittedRun
        The run id, status and ``flwr ls`` details.

    Raises
    ------
    SubmitError
        ``code`` 2 for bad arguments, 1 if the run did not start or did not finish completed.
    """
    if not (app_dir / "pyproject.toml").is_file():
        raise SubmitError(f"{app_dir} is not a Flower app folder (no pyproject.toml)", 2)
    config = run_config(spec_in_app(spec_path, app_dir), overrides, out_dir)
    check_connection(connection)
    flwr = flwr_executable()
    with tempfile.TemporaryDirectory(prefix="fedkd-submit-") as tmp:
        # flwr treats a connection name that is also a folder in its cwd as a legacy app path:
        # an empty cwd avoids that. A TOML run config spares the quoting of values.
        cwd = Path(tmp)
        config_file = cwd / "run-config.toml"
        config_file.write_text(tomli_w.dumps(config))
        cmd = [flwr, "run", str(app_dir), connection, "--run-config", str(config_file), "--stream"]
        if federation_config:
            cmd += ["--federation-config", federation_config]
        lines: list[str] = []
        proc = subprocess.Popen(
            cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                echo(line)
            code = proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait(timeout=10)
            run_id = _find_run_id(lines)
            hint = f"; stop it with: flwr stop {run_id} {connection}" if run_id else ""
            raise SubmitError(
                f"interrupted: the run goes on on the SuperLink{hint}", code=130
            ) from None
        run_id = _find_run_id(lines)
        if run_id is None:
            tail = "".join(lines[-15:]).strip()
            raise SubmitError(f"flwr run did not start a run (exit {code}):\n{tail}")
        entry = final_status(flwr, connection, run_id, cwd, status_wait_s)
    status = str(entry.get("status"))
    if not status.startswith("finished"):
        raise SubmitError(
            f"run {run_id} is still {status} {status_wait_s:.0f} s after its log stream ended; "
            f"follow it with `flwr log {run_id} {connection} --stream` and `flwr ls {connection}`"
        )
    if status != COMPLETED:
        details = entry.get("status-details")
        why = f" ({details})" if details and details != "N/A" else ""
        where = out_dir or "its default runs/ folder on the SuperLink machine"
        raise SubmitError(
            f"run {run_id} ended with status {status}{why}, not {COMPLETED}; see "
            f"`flwr log {run_id} {connection}`; finished rounds are kept in {where}"
        )
    found = [m.group(1) for line in lines if (m := _RESULTS.search(line))]
    return SubmittedRun(
        run_id=run_id, status=status, details=entry, results_dir=found[-1] if found else None
    )


def check_connection(connection: str) -> None:
    """Refuse a connection the Flower config does not define, before ``flwr run`` starts.

    Raises
    ------
    SubmitError
        ``code`` 2, in one line, if ``$FLWR_HOME/config.toml`` lacks `connection`.
    """
    import click
    from flwr.cli.flower_config import read_superlink_connection

    try:
        # Flower says on stdout when it writes a default config: not fedkd's output.
        with contextlib.redirect_stdout(io.StringIO()):
            read_superlink_connection(connection)
    except click.ClickException as err:
        message = " ".join(err.format_message().split())
        raise SubmitError(
            f"--connection {connection}: {message} Add a [superlink.{connection}] table "
            "there, or name one that exists",
            code=2,
        ) from None


def _find_run_id(lines: Sequence[str]) -> str | None:
    for line in lines:
        if match := _RUN_ID.search(line):
            return match.group(1)
    return None
