"""Algorithms by name, import path and entry point; their parameters and capabilities.

The out-of-tree example (examples/custom_algorithm) runs in process here and, copied to another
folder, through `fedkd run` (slow: it starts the Ray simulation engine).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest
import tomli_w

from fedkd.apps.client_app import make_client_app
from fedkd.apps.server_app import run_rounds
from fedkd.results import RunRecorder
from fedkd.spec import LEGACY_ALGORITHM_DEFAULTS, SpecError, load_spec
from strategies import STRATEGIES, Strategy, registry
from strategies.fd import FDParams
from strategies.params import Capabilities
from strategies.registry import ENTRY_POINT_GROUP, algorithm_class
from tests.inprocess import InProcessGrid
from tests.plugin_algorithms import SharpDSFL

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "custom_algorithm"
SMALL = ["rounds=1", "clients.num_clients=3", "data.proxy_size=100", "train.epochs=1"]


@pytest.fixture
def clean_path(monkeypatch):
    """sys.path and PYTHONPATH as they were, after a test that imports a spec's module."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))


def _plugin(folder: Path, module: str, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{module}.py").write_text(body)
    spec = folder / "spec.toml"
    spec.write_text(f'[algorithm]\nname = "{module}:Algo"\n')
    return spec


def test_every_builtin_declares_its_parameters_and_capabilities():
    for name, cls in STRATEGIES.items():
        assert algorithm_class(name) is cls and cls.name == name
        assert isinstance(cls.capabilities, Capabilities)
        cls.Params().check()  # the defaults are valid


def test_old_spec_toml_with_the_flat_algorithm_table_loads(tmp_path):
    # Before each algorithm had its own parameters, every spec.toml held all these keys.
    table = {"name": "fd", **LEGACY_ALGORITHM_DEFAULTS, "fd_weight": 0.5}
    lines = [f"{k} = {json.dumps(v)}" for k, v in table.items()]
    path = tmp_path / "spec.toml"
    path.write_text("[algorithm]\n" + "\n".join(lines) + "\n")
    spec = load_spec(path)
    assert spec.algorithm.params == FDParams(fd_weight=0.5)
    # The spec as run now records the algorithm's own keys only.
    assert tomllib.loads(spec.to_toml())["algorithm"] == {
        "name": "fd",
        "logit_adjustment": 0.0,
        "fd_weight": 0.5,
        "fd_normalise": False,
    }


def test_another_algorithms_key_away_from_its_old_default_is_refused():
    with pytest.raises(SpecError, match=r"unknown key 'algorithm.era_temperature' .* for 'fd'"):
        load_spec(None, ["algorithm.name=fd", "algorithm.era_temperature=0.5"])


def test_import_path_from_the_spec_folder_with_its_own_parameter(tmp_path, clean_path):
    body = "from tests.plugin_algorithms import SharpDSFL as Algo\n"
    spec_path = _plugin(tmp_path / "p1", "plugin_sharp_a", body)
    spec = load_spec(spec_path, ["algorithm.sharpness=3"])
    assert spec.algorithm.cls is SharpDSFL and spec.algorithm.params.sharpness == 3
    assert str(tmp_path / "p1") in os.environ["PYTHONPATH"].split(os.pathsep)
    with pytest.raises(SpecError, match=r"^algorithm.sharpness: must be > 1, got 0.5$"):
        load_spec(spec_path, ["algorithm.sharpness=0.5"])


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("no_such_module_xyz:Algo", "does not import: No module named 'no_such_module_xyz'"),
        ("strategies.dsfl:Nope", "module 'strategies.dsfl' has no attribute 'Nope'"),
        ("fedkd.spec:Spec", "is not an algorithm: name a subclass of strategies.base.Strategy"),
        ("strategies.base:Strategy", "is not an algorithm"),
        ("strategies.dsfl:", "an import path reads 'package.module:ClassName'"),
        ("fedprox", "'fedprox' is not one of dsfl, fedmd"),
    ],
)
def test_a_bad_algorithm_name_is_one_line(name, message):
    with pytest.raises(SpecError) as err:
        load_spec(None, [f"algorithm.name={name}"])
    assert str(err.value).startswith("algorithm.name: ") and message in str(err.value)
    assert "\n" not in str(err.value)


def test_a_plugin_module_that_fails_to_import_is_one_line(tmp_path, clean_path):
    spec_path = _plugin(tmp_path / "p2", "plugin_broken_b", "import no_such_dependency_xyz\n")
    with pytest.raises(SpecError, match="No module named 'no_such_dependency_xyz'") as err:
        load_spec(spec_path)
    assert "\n" not in str(err.value)
    spec_path = _plugin(tmp_path / "p3", "plugin_syntax_c", "def broken(:\n")
    with pytest.raises(SpecError, match="does not import: SyntaxError"):
        load_spec(spec_path)


def test_an_entry_point_registers_an_algorithm(monkeypatch):
    ep = importlib.metadata.EntryPoint(
        name="sharp", value="tests.plugin_algorithms:SharpDSFL", group=ENTRY_POINT_GROUP
    )
    real = importlib.metadata.entry_points

    def entry_points(**kwargs):
        if kwargs.get("group") == ENTRY_POINT_GROUP:
            return importlib.metadata.EntryPoints([ep])
        return real(**kwargs)

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    monkeypatch.setattr(registry, "_ENTRY_POINTS", {})
    spec = load_spec(None, ["algorithm.name=sharp", "algorithm.sharpness=4"])
    assert spec.algorithm.cls is SharpDSFL and spec.algorithm.params.sharpness == 4
    with pytest.raises(SpecError, match="is not one of dsfl, .*, pate, sharp, nor an import"):
        load_spec(None, ["algorithm.name=blunt"])


def test_the_example_runs_in_process(tmp_path, clean_path):
    spec = load_spec(EXAMPLE / "spec.toml", SMALL)
    assert issubclass(spec.algorithm.cls, Strategy)
    assert [f.name for f in fields(spec.algorithm.params)] == [
        "confidence_temperature",
        "sharpen_temperature",
    ]
    grid = InProcessGrid(make_client_app(spec), spec.num_nodes)
    summary = run_rounds(grid, spec, RunRecorder(tmp_path / "run", spec))
    assert summary["status"] == "completed"
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 <= row["teacher_test_acc"] <= 1 and 0 <= row["server_test_acc"] <= 1


def test_the_example_refuses_the_gaussian_release(clean_path):
    with pytest.raises(SpecError, match="the Gaussian release needs a logit teacher"):
        load_spec(EXAMPLE / "spec.toml", ["privacy.release_noise=1"])


@pytest.mark.slow
def test_the_example_copied_elsewhere_runs_with_fedkd_run(tmp_path):
    folder = tmp_path / "mine"
    shutil.copytree(EXAMPLE, folder)
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # fedkd itself, as an installed package is
    fedkd = [sys.executable, "-c", "from fedkd.run.cli import main; main()"]
    done = subprocess.run(
        [*fedkd, "run", "spec.toml", "--set", "rounds=1", "--out", "out", "--quiet"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((folder / "out" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == 1
    assert summary["algorithm"] == "entropy_weighted:EntropyWeightedDSFL"


def test_a_sweep_point_run_before_the_change_still_counts_as_done(tmp_path):
    from fedkd.run.sweep import spec_mismatch

    now = load_spec(None, ["rounds=2"]).to_dict()
    before = {**now, "algorithm": {"name": "dsfl", **LEGACY_ALGORITHM_DEFAULTS}}
    saved = tmp_path / "spec.toml"
    saved.write_text(tomli_w.dumps(before))
    assert spec_mismatch(saved, now) == []
    before["algorithm"]["fd_weight"] = 0.5  # a value that did not come from the defaults
    saved.write_text(tomli_w.dumps(before))
    assert spec_mismatch(saved, now) == ["algorithm.fd_weight"]


def test_a_run_recorded_before_a_key_existed_matches_only_at_that_keys_default(tmp_path):
    from fedkd.run.sweep import spec_mismatch

    now = load_spec(None, ["rounds=2"]).to_dict()
    older = tomllib.loads(tomli_w.dumps(now))
    del older["algorithm"]["teacher_confidence"]  # an option added after the run was made
    del older["proxy"]  # a table added after the run was made
    saved = tmp_path / "spec.toml"
    saved.write_text(tomli_w.dumps(older))
    assert spec_mismatch(saved, now) == []
    changed = load_spec(None, ["rounds=2", "algorithm.teacher_confidence=max_prob"]).to_dict()
    assert spec_mismatch(saved, changed) == ["algorithm.teacher_confidence"]
