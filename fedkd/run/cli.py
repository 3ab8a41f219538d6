"""The `fedkd` command: run a spec on Flower's simulation engine, compare runs."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from typer.core import TyperGroup

from fedkd.spec import Spec, SpecError, load_spec, refuse_seeded_noise


class OneLineErrors(TyperGroup):
    """fedkd's commands: a wrong command line is one ``error:`` line too (exit 2), not a box.

    Click and Typer show usage errors (an unknown option, a missing argument, a value of the
    wrong type) as a usage line, a hint and a framed message; fedkd's rule is one line that
    names the problem and the fix.
    """

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.NoArgsIsHelpError as err:  # `fedkd` alone: the help
            err.show()
            sys.exit(err.exit_code)
        except click.ClickException as err:
            where = err.ctx.command_path if getattr(err, "ctx", None) else "fedkd"
            message = " ".join(err.format_message().split())
            console.print(
                f"[bold red]error:[/] {escape(where)}: {escape(message)} "
                f"(see {escape(where)} --help)",
                highlight=False,
            )
            sys.exit(err.exit_code)
        except click.exceptions.Abort:
            console.print("interrupted", highlight=False)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=OneLineErrors,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="Federated and privacy-preserving knowledge distillation on Flower.",
)
console = Console(stderr=True, soft_wrap=True)

# `--set key=value`, the same in every command that reads a spec.
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a spec key, e.g. --set rounds=5 (repeatable)"),
]


def fail(message: str, code: int = 2) -> None:
    """One clear line on stderr, no traceback."""
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def _load(spec_path: str | None, overrides: list[str]) -> Spec:
    try:
        return load_spec(spec_path, overrides)
    except SpecError as err:
        fail(str(err))
    raise AssertionError  # unreachable: fail() exits


def _engine_environment() -> None:
    """Ray's and Flower's settings; call before anything imports Ray (it reads them then)."""
    # Ray's C++ core otherwise catches SIGTERM itself, prints a stack and aborts the process
    # before fedkd's handler (fedkd.run.stops) can stop the run.
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # Ray's workers renice themselves by RAY_worker_niceness (default 15) over the driver, and
    # they do all of a simulation's training: on a busy machine a run started at nice 5 trained
    # at nice 19 and barely got the CPU. 0 keeps the whole run at the priority it was started
    # with (what `nice -n N fedkd run` asks for). Scheduling only: no number changes.
    os.environ.setdefault("RAY_worker_niceness", "0")


# How a run starts Ray (`_start_ray`, or Flower's backend when joining a cluster): the progress
# bar says what matters, so no Ray logs, no worker output in the driver, no dashboard.
RAY_INIT_ARGS: dict[str, Any] = {
    "logging_level": logging.ERROR,
    "log_to_driver": False,
    "include_dashboard": False,
}

# What every Ray worker of a run imports before it accepts work (Ray's
# ``preload_python_modules``): torch, Flower's client side and the ClientApp. The workers Ray
# prestarts import them while the driver is still building the engine, instead of after the
# first actor lands on them, where the imports held up the first round.
WORKER_PRELOAD = ("fedkd.apps.client_app",)


def _start_ray(init_args: dict[str, Any]) -> None:
    """Start Ray for the simulation engine as Flower's Ray backend would, but with no job
    runtime environment; the backend then finds Ray running and uses it.

    Flower's backend calls ``ray.init(runtime_env={"env_vars": {"PYTHONPATH": ...}})``. With a
    job runtime environment the raylet starts every actor's worker through its runtime-env
    agent (``setup_worker.py``) and stops the workers it prestarted for the driver, which have
    none: each run started and stopped as many Ray workers as it has CPUs for nothing, and its
    actors' workers came up later. The workers still get the driver's module path: the
    raylet, and so every worker, inherits ``PYTHONPATH``, set here from ``sys.path`` as Flower
    sets it. The workers import `WORKER_PRELOAD` before they accept work. Scheduling only: no
    number changes.

    Joining a cluster (``RAY_ADDRESS``) is left to Flower's backend: workers on other machines
    do not inherit this process's environment, only the job runtime environment.
    """
    import ray

    if ray.is_initialized() or os.environ.get("RAY_ADDRESS"):
        return
    path = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        path = f"{path}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = path
    with _without_ray_monitors():
        ray.init(**init_args, _system_config={"preload_python_modules": list(WORKER_PRELOAD)})


@contextmanager
def _without_ray_monitors() -> Iterator[None]:
    """While it lasts, a Ray head started in this process has no log monitor and no autoscaler
    monitor.

    ``ray.init`` starts both and has no argument for either (``ray start`` has
    ``--no-monitor``); they are two of the five Python processes that import Ray at a run's
    start, and on a machine with few cores their start delays the driver's and the workers'.
    The log monitor only forwards workers' output to the driver, which fedkd turns off
    (``log_to_driver=False``); the autoscaler monitor scales clusters, which a run on one
    machine is not. Ray's node reads both from the ``RayParams`` that ``ray.init`` builds, so
    they are set on it here. Should a Ray release drop either field, Ray starts the monitor
    as before.
    """
    from ray._private import parameter

    build = parameter.RayParams.__init__

    def lean(params: Any, *args: Any, **kwargs: Any) -> None:
        build(params, *args, **kwargs)
        params.no_monitor = True
        params.include_log_monitor = False

    parameter.RayParams.__init__ = lean
    try:
        yield
    finally:
        parameter.RayParams.__init__ = build


def _quiet_engine_logs() -> None:
    """Flower and Ray log every message; the progress bar says what matters."""
    logging.getLogger("flwr").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def simulate(
    spec: Spec,
    out_dir: Path,
    show_progress: bool = True,
    recorder: Any = None,
    resume: Path | None = None,
) -> dict[str, Any]:
    """Run `spec` on Flower's simulation engine (Ray backend); return the summary.

    A spec that names no ``privacy.noise_rng`` runs with seeded noise (recorded in spec.toml).

    Ctrl-C or SIGTERM stops the run cleanly (see `fedkd.run.stops`): the finished rounds and a
    summary with ``"status": "interrupted"`` stay, Ray is shut down, and the process exits
    with 130 or 143. `recorder` is the run's `RunRecorder` if the caller already claimed the
    folder; `resume` a checkpoint of the run in it to continue from.
    """
    _engine_environment()
    from fedkd.audit.run_audit import audit_finished_run
    from fedkd.results import RunRecorder
    from fedkd.run.stops import StopSignals

    if recorder is None:
        recorder = RunRecorder(out_dir, spec)
    outcome: dict[str, Any] = {}
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("round {task.completed}/{task.total}"),
        TextColumn("{task.fields[acc]}"),
        TimeElapsedColumn(),
        console=console,
        disable=not show_progress,
    )
    task = progress.add_task(spec.name, total=spec.rounds, acc="")

    def on_round(rnd: int, row: dict[str, Any]) -> None:
        acc = row["server_test_acc"]
        label = "server acc" if acc is not None else "clients' mean acc"
        if acc is None:
            acc = row["client_test_acc_mean"]
        text = f"{label} {acc:.4f}" if acc is not None else ""
        progress.update(task, completed=rnd, acc=text)

    def say_stopping(name: str) -> None:
        console.print(
            f"{name}: stopping the run after the replies in flight (again to stop at once)",
            highlight=False,
        )

    signals = StopSignals(on_first=say_stopping)
    backend_config = {
        "client_resources": {
            "num_cpus": spec.resources.num_cpus,
            "num_gpus": spec.resources.num_gpus,
        },
        "init_args": dict(RAY_INIT_ARGS),  # a copy: the engine may add to it
    }
    kept = f"finished rounds are kept in {out_dir}"
    crash: BaseException | None = None
    try:
        with signals, progress:
            # Ray first: its workers start up while this process imports the engine.
            _start_ray(backend_config["init_args"])
            from flwr.simulation import run_simulation

            from fedkd.apps.client_app import make_client_app
            from fedkd.apps.server_app import make_server_app

            _quiet_engine_logs()  # after Flower's import, which sets its logger up
            server_app = make_server_app(
                spec, recorder, on_round, outcome, signals.stop, audit_finished_run, resume
            )
            run_simulation(
                server_app=server_app,
                client_app=make_client_app(spec),
                num_supernodes=spec.num_nodes,
                backend_name="ray",
                backend_config=backend_config,
            )
    except KeyboardInterrupt:  # a second signal: the engine unwound, the ServerApp may not have
        recorder.finish(status="interrupted", error=f"stopped at once by a second {signals.name}")
        _shut_ray_down()
        console.print(f"[bold red]interrupted:[/] {kept}", highlight=False)
        os._exit(signals.exit_code or 130)  # the ServerApp's thread may still wait for replies
    except Exception as err:  # the ServerApp's own error is in `outcome`, and re-raised here
        if "error" not in outcome:
            crash = err.__cause__ or err  # the engine itself crashed (e.g. Ray could not start)
    finally:
        recorder.release()
    if crash is not None:
        recorder.finish(status="failed", error=f"the simulation engine crashed: {crash}")
        fail(f"the simulation engine crashed: {crash} ({kept})", 1)
    if "stopped" in outcome or (signals.signum is not None and not outcome.get("ok")):
        recorder.finish(status="interrupted", error=f"stopped by {signals.name}")
        fail(f"interrupted by {signals.name}: {kept}", code=signals.exit_code)
    if "error" in outcome:
        fail(f"run failed: {outcome['error']} ({kept})", code=1)
    if not outcome.get("ok"):
        recorder.finish(status="failed", error="the simulation engine stopped before the run ended")
        fail(f"the simulation engine stopped before the run ended; see {out_dir}", code=1)
    from fedkd.results import read_run

    return read_run(out_dir)[0]


def _shut_ray_down() -> None:
    """End the run's Ray processes, whatever state the engine was left in."""
    try:
        import ray

        ray.shutdown()
    except Exception as err:  # exiting anyway: say what may be left
        console.print(f"[yellow]warning:[/] Ray did not shut down cleanly ({err})")


@app.command()
def run(
    spec: Annotated[
        str | None, typer.Argument(help="Spec TOML (default: the built-in quickstart)")
    ] = None,
    set_: SetOption = None,
    out: Annotated[
        str | None, typer.Option(help="Results folder (default runs/<name>-<time>)")
    ] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar")] = False,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            help="Continue the stopped run in this folder from its last checkpoint",
        ),
    ] = None,
) -> None:
    """Run one experiment spec on Flower's simulation engine and write its results folder."""
    from fedkd.results import RunDirError, RunRecorder, default_run_dir
    from fedkd.run.preflight import check_algorithm, check_data, check_machine, check_privacy
    from fedkd.run.resume import resume_point, run_status

    checkpoint = None
    if resume is not None:
        if out is not None:
            fail("--resume continues the run in its own folder: leave out --out")
        if run_status(resume) == "completed":
            console.print(f"{escape(str(resume))}: the run has completed; nothing to resume")
            raise typer.Exit(0)
        try:
            point = resume_point(resume, spec, list(set_ or []))
        except (SpecError, RunDirError) as err:
            fail(str(err))
        parsed, checkpoint, out_dir = point.spec, point.checkpoint, resume
    else:
        parsed = _load(spec, list(set_ or []))
        out_dir = Path(out or parsed.output.dir or default_run_dir(parsed))
    _engine_environment()  # before the checks below import Ray
    # Everything that can be checked before Ray starts is: a problem is one line, not a
    # traceback from inside the engine (or a hang, for resources Ray can never give).
    try:
        check_machine(parsed)
        check_privacy(parsed)
        check_data(parsed)
        check_algorithm(parsed)
        keep_rows = None if resume is None else point.rows
        recorder = RunRecorder(out_dir, parsed, keep_rows)
    except (SpecError, RunDirError) as err:
        fail(str(err))
    if recorder.learner is None:  # a resumed run keeps the learner it started with
        from fedkd.assembly import federated_data, learner_choice

        # Once per run, before the engine starts: every node gets this learner.
        recorder.record_learner(learner_choice(parsed, federated_data(parsed)))
    console.print(
        f"fedkd: [bold]{escape(parsed.name)}[/] - {parsed.algorithm.name}, "
        f"{parsed.clients.num_clients} clients on {parsed.num_nodes} nodes, "
        f"{parsed.rounds} rounds, data {parsed.data.source} -> {escape(str(out_dir))}",
        highlight=False,
    )
    if parsed.privacy.enabled(parsed.algorithm.name) and parsed.privacy.noise == "seeded":
        console.print(
            "privacy noise: seeded from the spec's seed (reproducible; its epsilons hold for "
            'this simulation only; privacy.noise_rng = "secure" draws secret noise)',
            highlight=False,
        )
    if checkpoint is not None:
        console.print(f"resuming from {escape(str(checkpoint))}", highlight=False)
    if parsed.resources.learner == "auto":
        console.print(
            escape(learner_line(recorder.learner, checkpoint is not None)), highlight=False
        )
    summary = simulate(parsed, out_dir, not quiet, recorder, checkpoint)
    final = summary["final"] or {}
    acc = final.get("server_test_acc")
    acc_text = "n/a" if acc is None else f"{acc:.4f}"
    best = summary["best_server_test_acc"]
    best_text = "n/a" if best is None else f"{best:.4f}"
    selected = "no validation metric to select a round by"
    if summary.get("selected_by"):
        from fedkd.run.report import fmt

        selected = (
            f"round {summary['best_round_by_val']} by {summary['selected_by']}: "
            f"{summary['test_acc_metric']} {fmt(summary['test_acc_at_best_val_round'])}"
        )
    console.print(
        f"done in {summary['wall_s']:.1f} s: final server_test_acc {acc_text}; selected "
        f"{selected} (test-selected best {best_text}: a diagnostic, not a result); results in "
        f"{escape(str(out_dir))}",
        highlight=False,
    )
    if summary.get("total_clients_failed"):
        console.print(
            f"[yellow]warning:[/] {summary['total_clients_failed']} client-rounds failed "
            "(clients_failed in metrics.jsonl): a node that crashed, sent a non-finite upload or "
            "did not reply within resources.round_timeout "
            f"({parsed.resources.round_timeout:g} s; raise it on a slow or shared machine)",
            highlight=False,
        )


def learner_line(choice: dict[str, Any] | None, resumed: bool = False) -> str:
    """One line on what ``resources.learner = "auto"`` chose, and from which timings."""
    choice = choice or {}
    timings = choice.get("calibration") or {}
    if not timings:
        why = "one client per node: nothing to vectorise"
    else:
        why = "; ".join(
            f"{arch}: loop {c['loop_s']:.3g} s, vectorised {c['vectorised_s']:.3g} s"
            + (" (cached)" if c.get("cached") else "")
            for arch, c in timings.items()
        )
    how = "as the run chose when it started" if resumed else why
    return f"learner: auto -> {choice.get('chosen')} ({how})"


REPORT_FORMATS = ("table", "md", "csv")


@app.command()
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run folders to compare")],
    plot: Annotated[Path | None, typer.Option(help="Comparison plot (PNG) path")] = None,
    format_: Annotated[
        str,
        typer.Option("--format", help="table (terminal), md (Markdown) or csv, on stdout"),
    ] = "table",
) -> None:
    """Group runs that differ only by seed; print each group's mean, sd and 95% CI per metric
    with its commits, and draw the mean accuracy curves with a band of one sd."""
    from fedkd.plots import plot_comparison
    from fedkd.results import RunDirError, make_folder
    from fedkd.run.report import csv_text, group_runs, load_run, markdown, rich_table

    if format_ not in REPORT_FORMATS:
        fail(f"--format: '{format_}' is not one of {', '.join(REPORT_FORMATS)}")
    runs = []
    for run_dir in run_dirs:
        try:
            runs.append(load_run(run_dir))
        except (FileNotFoundError, RunDirError) as err:
            fail(str(err))
    path = plot or Path(run_dirs[0]).parent / "report.png"
    if path.is_dir():
        fail(f"--plot {path}: is a folder; pass a file path such as {path / 'report.png'}")
    try:
        make_folder(path.parent, "--plot")
    except RunDirError as err:
        fail(str(err))
    groups = group_runs(runs)
    if format_ == "md":
        command = " ".join(["fedkd report --format md", *(str(d) for d in run_dirs)])
        sys.stdout.write(markdown(groups, command))
    elif format_ == "csv":
        sys.stdout.write(csv_text(groups))
    else:
        # In a terminal Rich fits the table to it; piped elsewhere, nothing is cut.
        Console(width=None if sys.stdout.isatty() else 220).print(rich_table(groups))
    try:
        plot_comparison({g.label: [r.rounds for r in g.runs] for g in groups}, path)
    except (OSError, ValueError) as err:  # not writable, or a file type matplotlib cannot write
        fail(f"--plot {path}: cannot write the plot ({err}); pass a writable .png path")
    console.print(f"plot: {path} (mean over seeds, band ± sample sd)", highlight=False)


@app.command()
def certs(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the files into")],
    nodes: Annotated[int, typer.Option(help="Number of SuperNode key pairs")] = 3,
    host: Annotated[
        list[str] | None,
        typer.Option(
            "--host",
            help="Host name or IP the SuperLink is dialled at (repeatable; 127.0.0.1 and "
            "localhost are always included)",
        ),
    ] = None,
    days: Annotated[int, typer.Option(help="Validity of the certificates in days")] = 365,
    force: Annotated[bool, typer.Option(help="Replace files already in the folder")] = False,
) -> None:
    """DEVELOPMENT ONLY: a CA, the SuperLink's TLS certificate and SuperNode key pairs."""
    from fedkd.deploy.certs import CertificateError, create_dev_certificates
    from fedkd.results import RunDirError

    try:
        made = create_dev_certificates(out_dir, nodes, host or (), days, force)
    except (CertificateError, RunDirError) as err:
        fail(str(err))
    console.print(
        f"wrote a development CA, the SuperLink certificate and {nodes} SuperNode key pairs to "
        f"{escape(str(made.dir))} (for development only: see {escape(made.readme.name)})",
        highlight=False,
    )


@app.command()
def submit(
    connection: Annotated[str, typer.Option(help="SuperLink connection in $FLWR_HOME/config.toml")],
    spec: Annotated[
        str | None,
        typer.Argument(help="Spec TOML inside the app folder (default: the built-in quickstart)"),
    ] = None,
    set_: SetOption = None,
    out: Annotated[
        str | None,
        typer.Option(help="Results folder: an absolute path on the machine running the ServerApp"),
    ] = None,
    federation_config: Annotated[
        str | None, typer.Option(help="flwr run --federation-config (simulation SuperLinks)")
    ] = None,
) -> None:
    """Run a spec on a SuperLink (deployment engine); exit 1 unless it finished completed."""
    from fedkd.deploy.submit import SubmitError
    from fedkd.deploy.submit import submit as submit_run

    overrides = list(set_ or [])
    parsed = _load(spec, overrides)  # the same one-line errors as `fedkd run`, before any upload
    try:
        refuse_seeded_noise(parsed, "fedkd submit")  # unset: secure (fedkd.apps.run_config)
    except SpecError as err:
        fail(str(err))
    if parsed.faults.active:  # a simulation device (docs/faults.md): real sites fail on their own
        fail("[faults]: faults and attacks are simulated by fedkd run; remove the table to submit")
    if out and not Path(out).is_absolute():
        fail(f"--out: '{out}' is relative; give an absolute path on the ServerApp's machine")
    try:
        done = submit_run(
            connection,
            spec_path=spec,
            overrides=overrides,
            out_dir=out or "",
            federation_config=federation_config,
        )
    except SubmitError as err:
        fail(str(err), code=err.code)
    traffic = done.details.get("network-traffic", {}).get("total-bytes")
    where = done.results_dir or out or f"{parsed.output.dir or 'runs/'} (ServerApp's working dir)"
    console.print(
        f"run {done.run_id} {done.status}: results in {escape(where)} on the SuperLink's machine"
        + (f"; Flower counted {traffic} bytes on the network" if traffic is not None else ""),
        highlight=False,
    )


@app.command()
def sweep(
    spec: Annotated[str, typer.Argument(help="Spec TOML with a sweep.grid table")],
    parallel: Annotated[int, typer.Option(help="Runs at a time (one process each)")] = 1,
    out: Annotated[
        str | None, typer.Option(help="Sweep folder (default runs/<name>-sweep; reruns resume)")
    ] = None,
    set_: SetOption = None,
) -> None:
    """Run every point of the spec's sweep grid; write sweep.csv and accuracy_vs_epsilon.png,
    and selection.csv: per privacy budget, the setting picked by validation accuracy."""
    from fedkd.results import RunDirError
    from fedkd.run.sweep import SweepError, run_sweep, selection_of, sweep_table

    try:
        rows = run_sweep(spec, out, overrides=list(set_ or []), parallel=parallel, echo=print)
    except (SpecError, SweepError, RunDirError) as err:
        fail(str(err))
    console = Console(width=None if sys.stdout.isatty() else 220)
    console.print(sweep_table(rows))
    selection = selection_of(load_spec(spec, list(set_ or [])), rows)
    console.print(sweep_table(selection, "selected by validation accuracy (test: the pick's)"))


@app.command()
def audit(
    run_dir: Annotated[Path, typer.Argument(help="A run folder made with audit.enabled")],
    client: Annotated[int | None, typer.Option(help="Client (default: audit.client)")] = None,
    shadows: Annotated[int | None, typer.Option(help="LiRA shadows (default: spec's)")] = None,
) -> None:
    """Membership inference and a one-run canary audit of a client's student; writes audit.json."""
    from fedkd.audit.run_audit import AuditError, audit_run, render_text

    try:
        result = audit_run(run_dir, client=client, shadows=shadows)
    except AuditError as err:
        fail(str(err))
    print(render_text(result))
    console.print(f"audit.json in {escape(str(run_dir))}", highlight=False)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted; finished rounds are kept in the results folder")
        sys.exit(130)


if __name__ == "__main__":
    main()
