"""``resources.learner = "auto"`` (docs/scale.md): the faster cohort learner, chosen once per run.

The calibration's timings are never asserted on: tests that need a choice force it through
`fedkd.learner.auto._time_learners`, and check that a run with the forced choice gives the same
metrics as a run that names that learner, that the choice is recorded, cached and reused.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fedkd.apps.client_app import make_client_app
from fedkd.apps.server_app import run_rounds
from fedkd.assembly import federated_data, learner_choice
from fedkd.learner import auto
from fedkd.learner.auto import CalibrationTask, calibrate, choose_learner
from fedkd.learner.loop import StepConfig
from fedkd.results import LEARNER_FILE, RunDirError, RunRecorder
from fedkd.run import cli
from fedkd.run.resume import resume_point
from fedkd.spec import LEARNERS, SpecError, load_spec
from tests.inprocess import InProcessGrid
from tests.test_algorithm_fingerprints import TINY
from tests.test_resume import engine, resume, rows_of, stop_after_row  # noqa: F401

# The fingerprints' tiny quickstart (mixed cnn_small/mlp students) on cohort nodes of 2.
COHORTS = [*TINY, "clients.clients_per_node=2"]

# A task small enough to calibrate for real in a test.
TINY_TASK = CalibrationTask(
    arch="mlp",
    input_shape=(1, 4, 4),
    num_classes=3,
    step=StepConfig(batch_size=4),
    dp=None,
    clients=3,
    device="cpu",
    threads=1,
)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """A fresh calibration cache per test, never the user's."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("FEDKD_CACHE_DIR", str(folder))
    monkeypatch.delenv(auto.CALIBRATION_ENV, raising=False)
    return folder


def force(monkeypatch, seconds: dict[str, float]) -> list[str]:
    """Make every calibration time `seconds` per learner; returns the learners it timed."""
    timed: list[str] = []

    def time_learners(task, timer):
        timed.extend(auto.LEARNER_CHOICES)
        return dict(seconds)

    monkeypatch.setattr(auto, "_time_learners", time_learners)
    return timed


# -- the spec ----------------------------------------------------------------------------------
def test_spec_accepts_auto_and_refuses_other_values_in_one_line():
    assert load_spec(None, ["resources.learner=auto"]).resources.learner == "auto"
    with pytest.raises(SpecError) as err:
        load_spec(None, ["resources.learner=fastest"])
    message = str(err.value)
    assert "\n" not in message and "resources.learner" in message and "auto" in message
    with pytest.raises(SpecError, match="'auto' may choose it"):
        load_spec(None, ["resources.learner=auto", "resources.precision=bf16"])


def test_the_specs_learners_are_the_choices_and_auto():
    assert LEARNERS == (*auto.LEARNER_CHOICES, "auto")


# -- the calibration ---------------------------------------------------------------------------
def test_a_real_calibration_times_both_learners_and_caches_its_figures(cache, monkeypatch):
    first = calibrate(TINY_TASK)
    assert first["loop_s"] > 0 and first["vectorised_s"] > 0 and not first["cached"]
    assert first["clients"] == 3 and first["batch_size"] == 4 and first["device"] == "cpu"
    assert len(list(cache.glob("learner-calibration-*.json"))) == 1
    timed = force(monkeypatch, {"loop": 9.0, "vectorised": 9.0})
    second = calibrate(TINY_TASK)
    assert timed == []  # no timing taken: the cache answered
    assert second == {**first, "cached": True}
    chosen, calibrations = choose_learner([TINY_TASK])
    assert chosen in auto.LEARNER_CHOICES and timed == []
    faster = first["vectorised_s"] < auto.VECTORISED_MARGIN * first["loop_s"]
    assert chosen == ("vectorised" if faster else "loop")
    assert calibrations == {"mlp": second}


def test_the_calibration_sets_torch_up_as_the_nodes_do_and_restores_the_threads(monkeypatch):
    """Timed as a node trains (its threads, subnormals flushed: `set_up_torch`), and the
    driver's own thread count back afterwards."""
    calls: list[tuple[str, int]] = []

    def time_learners(task, timer):
        calls.append(("timed", torch.get_num_threads()))
        return {"loop": 1.0, "vectorised": 1.0}

    monkeypatch.setattr(auto, "set_up_torch", lambda threads: calls.append(("set up", threads)))
    monkeypatch.setattr(auto, "_time_learners", time_learners)
    before = torch.get_num_threads()
    calibrate(replace(TINY_TASK, threads=2), use_cache=False)
    assert calls[0] == ("set up", 2) and calls[1][0] == "timed"
    assert torch.get_num_threads() == before


def test_each_learner_counts_its_fastest_of_alternating_timed_rounds(monkeypatch):
    """A burst of load that slows one round does not decide: the loop's one slow round (5 s)
    would have made the vectorised learner look faster in a single timed round."""
    rounds: list[tuple[str, int]] = []
    for name, learner in (
        ("loop", auto.CohortLearner),
        ("vectorised", auto.VectorisedCohortLearner),
    ):
        monkeypatch.setattr(
            learner,
            "train_private",
            lambda self, round_, cids, name=name: rounds.append((name, round_)),
        )
    monkeypatch.setattr(auto, "CALIBRATION_REPEATS", 3)
    # Each timed round takes one pair of clock readings; the warm-ups read no clock.
    durations = iter([5.0, 2.0, 2.5, 1.0, 1.5, 3.0])  # loop, vect, vect, loop, loop, vect
    clock = [0.0]
    readings: list[float] = []

    def scripted_timer() -> float:
        # Even reading: a round starts; odd: it ends, `durations`' next value later.
        if len(readings) % 2 == 0:
            readings.append(clock[0])
        else:
            clock[0] += next(durations)
            readings.append(clock[0])
        return readings[-1]

    seconds = auto._time_learners(TINY_TASK, scripted_timer)
    assert rounds == [
        ("loop", 1),
        ("vectorised", 1),  # warm-ups, untimed
        ("loop", 2),
        ("vectorised", 2),
        ("vectorised", 3),  # the order alternates
        ("loop", 3),
        ("loop", 4),
        ("vectorised", 4),
    ]
    assert seconds == {"loop": 1.0, "vectorised": 2.0}
    monkeypatch.setattr(auto, "_time_learners", lambda task, timer: dict(seconds))
    assert choose_learner([TINY_TASK], use_cache=False)[0] == "loop"
    assert calibrate(TINY_TASK, use_cache=False)["repeats"] == 3


def test_the_cache_is_keyed_by_what_the_timing_depends_on(monkeypatch):
    timed = force(monkeypatch, {"loop": 1.0, "vectorised": 2.0})
    calibrate(TINY_TASK)
    calibrate(TINY_TASK)
    assert len(timed) == 2
    for other in (
        {"arch": "cnn_small"},
        {"step": StepConfig(batch_size=8)},
        {"clients": 2},
        {"threads": 2},
    ):
        timed.clear()
        calibrate(auto.replace(TINY_TASK, **other))
        assert timed == ["loop", "vectorised"], other
    # Another CPU generation behind the same model name (a virtual machine's "AMD EPYC").
    timed.clear()
    monkeypatch.setattr(auto, "cpu_id", lambda: "AuthenticAMD family 25 model 17 stepping 1")
    calibrate(TINY_TASK)
    assert timed == ["loop", "vectorised"]


def test_the_cache_can_be_bypassed(cache, monkeypatch):
    timed = force(monkeypatch, {"loop": 1.0, "vectorised": 2.0})
    calibrate(TINY_TASK)
    timed.clear()
    assert not calibrate(TINY_TASK, use_cache=False)["cached"]
    assert timed == ["loop", "vectorised"]
    timed.clear()
    monkeypatch.setenv(auto.CALIBRATION_ENV, "fresh")
    assert not calibrate(TINY_TASK)["cached"]
    assert timed == ["loop", "vectorised"]


def test_the_faster_learner_is_chosen_over_all_architectures(monkeypatch):
    force(monkeypatch, {"loop": 2.0, "vectorised": 1.0})
    assert choose_learner([TINY_TASK])[0] == "vectorised"
    force(monkeypatch, {"loop": 1.0, "vectorised": 1.0})  # a tie: the reference
    assert choose_learner([TINY_TASK], use_cache=False)[0] == "loop"
    # Faster, but not by the margin a real round's extra vectorised costs need: the loop.
    force(monkeypatch, {"loop": 1.0, "vectorised": 0.9})
    assert choose_learner([TINY_TASK], use_cache=False)[0] == "loop"
    force(monkeypatch, {"loop": 1.0, "vectorised": 0.7})
    assert choose_learner([TINY_TASK], use_cache=False)[0] == "vectorised"


def test_one_client_per_node_means_the_loop_without_calibrating(monkeypatch):
    timed = force(monkeypatch, {"loop": 2.0, "vectorised": 1.0})
    assert choose_learner([auto.replace(TINY_TASK, clients=1)]) == ("loop", {})
    spec = load_spec(None, [*TINY, "resources.learner=auto"])
    choice = learner_choice(spec, federated_data(spec))
    assert choice == {"requested": "auto", "chosen": "loop", "calibration": None}
    assert timed == []


# -- a run -------------------------------------------------------------------------------------
def run(spec_items: list[str], run_dir: Path) -> tuple[list[dict], dict]:
    spec = load_spec(None, spec_items)
    run_rounds(
        InProcessGrid(make_client_app(spec), spec.num_nodes), spec, RunRecorder(run_dir, spec)
    )
    return rows_of(run_dir), json.loads((run_dir / "summary.json").read_text())


@pytest.mark.parametrize(
    ("learner", "seconds"),
    [("vectorised", {"loop": 2.0, "vectorised": 1.0}), ("loop", {"loop": 1.0, "vectorised": 2.0})],
)
def test_an_auto_run_gives_the_chosen_learners_metrics_and_records_the_choice(
    tmp_path, monkeypatch, learner, seconds
):
    named, named_summary = run([*COHORTS, f"resources.learner={learner}"], tmp_path / "named")
    assert named_summary["learner"] == {
        "requested": learner,
        "chosen": learner,
        "calibration": None,
    }
    timed = force(monkeypatch, seconds)
    rows, summary = run([*COHORTS, "resources.learner=auto"], tmp_path / "auto")
    assert rows == named
    assert timed == ["loop", "vectorised"] * 2  # once per architecture, once per run
    assert summary["learner"]["requested"] == "auto"
    assert summary["learner"]["chosen"] == learner
    calibration = summary["learner"]["calibration"]
    assert sorted(calibration) == ["cnn_small", "mlp"]
    assert calibration["mlp"]["loop_s"] == seconds["loop"]
    assert calibration["mlp"]["clients"] == 2  # a node's clients, at least two
    assert json.loads((tmp_path / "auto" / LEARNER_FILE).read_text()) == summary["learner"]


def test_resume_reuses_the_recorded_choice(tmp_path, monkeypatch):
    straight, _ = run([*COHORTS, "rounds=3", "resources.learner=vectorised"], tmp_path / "v")
    force(monkeypatch, {"loop": 2.0, "vectorised": 1.0})
    spec = load_spec(None, [*COHORTS, "rounds=3", "resources.learner=auto"])
    stop_after_row(spec, tmp_path / "auto", 1)
    timed = force(monkeypatch, {"loop": 1.0, "vectorised": 2.0})  # would now choose the loop
    assert resume(spec, tmp_path / "auto") == straight
    assert timed == []
    summary = json.loads((tmp_path / "auto" / "summary.json").read_text())
    assert summary["learner"]["chosen"] == "vectorised"


def test_resume_without_the_recorded_choice_is_refused(tmp_path, monkeypatch):
    force(monkeypatch, {"loop": 2.0, "vectorised": 1.0})
    spec = load_spec(None, [*COHORTS, "rounds=3", "resources.learner=auto"])
    stop_after_row(spec, tmp_path / "auto", 1)
    assert resume_point(tmp_path / "auto", None, []).spec.resources.learner == "auto"
    (tmp_path / "auto" / LEARNER_FILE).unlink()
    with pytest.raises(RunDirError, match=f"{LEARNER_FILE} is missing"):
        resume_point(tmp_path / "auto", None, [])


def test_fedkd_run_chooses_before_the_engine_starts_and_says_so(tmp_path, monkeypatch, engine):  # noqa: F811
    force(monkeypatch, {"loop": 2.0, "vectorised": 1.0})
    args = ["run", "--quiet", "--out", str(tmp_path / "run")]
    args += [f"--set={item}" for item in [*COHORTS, "resources.learner=auto"]]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.stderr
    [(_, _, recorder, _)] = engine
    assert recorder.learner["chosen"] == "vectorised"
    lines = [line for line in result.stderr.splitlines() if line.startswith("learner:")]
    assert lines == [
        "learner: auto -> vectorised (cnn_small: loop 2 s, vectorised 1 s; mlp: loop 2 s, "
        "vectorised 1 s)"
    ]
    assert json.loads((tmp_path / "run" / LEARNER_FILE).read_text())["chosen"] == "vectorised"
