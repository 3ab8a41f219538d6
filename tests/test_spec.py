"""Spec loading, defaults, overrides and the one-line validation errors."""

import subprocess
import sys
from pathlib import Path

import pytest

from fedkd.spec import ALGORITHMS, Spec, SpecError, load_spec
from strategies import STRATEGIES

REPO = Path(__file__).resolve().parents[1]


def test_default_spec_is_quickstart():
    spec = load_spec()
    assert spec.name == "quickstart"
    assert spec == load_spec(REPO / "simulations" / "quickstart.toml")
    assert spec.data.source == "digits" and spec.algorithm.name == "dsfl"
    assert spec.clients.num_clients == 10 and spec.data.partition == "dirichlet"
    assert len({spec.student_for(i) for i in range(10)}) == 2


def test_registry_matches_spec_algorithms():
    assert set(STRATEGIES) == set(ALGORITHMS)


def test_every_shipped_spec_loads(mnist_path):
    for path in sorted((REPO / "simulations").rglob("*.toml")):
        spec = load_spec(path)
        assert spec.rounds > 0, path


def test_mnist_specs_share_data_partition_and_seed(mnist_path):
    base = load_spec(REPO / "simulations" / "mnist_dirichlet.toml")
    for path in sorted((REPO / "simulations" / "mnist").glob("*.toml")):
        spec = load_spec(path)
        assert spec.data == base.data and spec.seed == base.seed, path
        assert spec.clients.num_clients == 20
        assert spec.rounds == base.rounds or spec.algorithm.name == "centralized"
        assert spec.algorithm.name == path.stem


def test_overrides_are_typed():
    spec = load_spec(None, ["rounds=3", "clients.fraction=0.5", 'algorithm.name="fedmd"'])
    assert spec.rounds == 3 and spec.clients.fraction == 0.5 and spec.algorithm.name == "fedmd"
    assert load_spec(None, ["algorithm.name=fd"]).algorithm.name == "fd"  # bare strings work


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lrr=0.1", "unknown key 'train.lrr' in spec; allowed in [train]: epochs"),
        ("bogus=1", "unknown key 'bogus' in spec; allowed in the top level: name, seed"),
        ("rounds=-1", "rounds: must be > 0, got -1"),
        ("rounds=2.5", "rounds: expected int, got 2.5"),
        ("data.source=cifar", "data.source: 'cifar' is not one of digits, mnist1d, npz, hf"),
        ("clients.fraction=1.5", "clients.fraction: must be in (0, 1], got 1.5"),
        ("clients.students=vit", "clients.students: 'vit' is not one of mlp, cnn_small"),
        ("algorithm.name=fedavg", "fedavg averages weights and needs one architecture"),
        ("clients.min_clients=11", "clients.min_clients: 11 exceeds clients.num_clients (10)"),
        ("distill.proxy_per_round=600", "distill.proxy_per_round: 600 exceeds data.proxy_size"),
    ],
)
def test_bad_values_name_the_key(override, message):
    _raises_naming(override, message)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["algorithm.teacher=class_weighted", "privacy.dpsgd=true", "privacy.target_epsilon=2"],
            "the clients' exact label counts are private; set privacy.histogram_noise",
        ),
        (
            ["privacy.histogram_noise=50"],
            "only the class_weighted and pooled_likelihood teachers release label histograms",
        ),
        (
            ["algorithm.name=fd", "algorithm.teacher=class_weighted"],
            "unknown key 'algorithm.teacher' in spec; allowed in [algorithm] for 'fd': name, "
            "logit_adjustment, fd_weight, fd_normalise",
        ),
        (
            ["algorithm.teacher=pooled_likelihood", "privacy.release_noise=5"],
            "'pooled_likelihood' cannot be combined with privacy.release_noise",
        ),
        (["algorithm.held_class_count=-1"], "algorithm.held_class_count: must be >= 0"),
        (
            ["algorithm.match_class_prior=true"],
            "algorithm.match_class_prior: the prior comes from the clients' label histograms",
        ),
        (["train.epochs_schedule=[10, 0]"], "train.epochs_schedule: every entry must be an int"),
        (["train.epochs_schedule=[10, 2.5]"], "train.epochs_schedule: expected int, got 2.5"),
        (["algorithm.self_training_iterations=0"], "must be > 0, got 0"),
        (["server.confident_fraction=1.5"], "must be in [0, 1], got 1.5"),
        (
            ["algorithm.name=fd", "server.confident_fraction=0.5"],
            "a logit teacher (dsfl, fedmd, feddf, relation), not 'fd'",
        ),
    ],
)
def test_class_weighted_teacher_and_pate_settings_are_checked(overrides, message):
    _raises_naming(overrides, message)


def _raises_naming(override: str | list[str], message: str) -> None:
    with pytest.raises(SpecError) as err:
        load_spec(None, override if isinstance(override, list) else [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_data_file_is_named(tmp_path):
    with pytest.raises(SpecError, match=r"data.path: file '.*nope.npz' not found"):
        load_spec(None, ["data.source=npz", f"data.path={tmp_path / 'nope.npz'}"])


def test_extends_merges_and_paths_resolve_from_base(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "data.npz").write_bytes(b"")
    (tmp_path / "base" / "base.toml").write_text(
        'rounds = 7\n[data]\nsource = "npz"\npath = "data.npz"\n'
    )
    (tmp_path / "child.toml").write_text(
        'extends = "base/base.toml"\n[algorithm]\nname = "fedmd"\n'
    )
    spec = load_spec(tmp_path / "child.toml")
    assert spec.rounds == 7 and spec.algorithm.name == "fedmd" and spec.name == "child"
    assert Path(spec.data.path) == (tmp_path / "base" / "data.npz").resolve()


def test_spec_toml_round_trips(tmp_path):
    spec = load_spec(None, ["rounds=4"])
    path = tmp_path / "spec.toml"
    path.write_text(spec.to_toml())
    again = load_spec(path)
    assert again.to_dict() == spec.to_dict()
    assert Spec().to_dict().keys() == spec.to_dict().keys()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--set", "rounds=-1"], "rounds: must be > 0"),
        (["--set", "train.lrr=0.1"], "unknown key 'train.lrr' in spec; allowed in [train]: epochs"),
        (["--set", "data.source=npz", "--set", "data.path=/nonexistent/x.npz"], "data.path"),
        (["/nonexistent/spec.toml"], "spec file '/nonexistent/spec.toml' not found"),
    ],
)
def test_cli_bad_spec_one_line_exit_2(args, needle, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fedkd.run.cli", "run", *args, "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:") and needle in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()
