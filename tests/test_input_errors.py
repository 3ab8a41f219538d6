"""Every malformed input a user can give a fedkd command: one `error:` line, exit 2, no traceback.

Each case runs the real command line in process (typer's CliRunner); none may reach the
simulation engine, which the fixture replaces by a failure. Files the cases need (bad specs,
bad .npz data, run folders) are made once in `files`; ``{files}`` in an argument is replaced by
that folder.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedkd.run import cli
from tests.hf_folder import write_hf_split

# --set overrides of `fedkd run` that a spec check, a data check or a machine check refuses.
BAD_SETS = [
    "rounds=-1",
    "rounds=0",
    "rounds=1.5",
    "rounds='ten'",
    "seed=-1",
    "name=5",
    "bogus=1",
    "data=digits",
    "data.source=foo",
    "data.source=npz",
    "data.partition=random",
    "data.alpha=0",
    "data.alpha=-1",
    "data.alpha=nan",
    "data.alpha=inf",
    "data.classes_per_client=0",
    "data.proxy_size=-5",
    "data.proxy_size=100000",
    "data.local_test_fraction=1",
    "data.local_test_fraction=-0.1",
    "data.source=hf",
    "data.colour=red",
    "proxy=digits",
    "proxy.source=generator",
    "proxy.source=digits",
    "proxy.source=npz",
    "proxy.source=hf",
    "proxy.size=-1",
    "proxy.size=100",
    "proxy.synthetic=gan",
    "proxy.bogus=1",
    "clients.num_clients=0",
    "clients.num_clients=5000",
    "clients.clients_per_node=0",
    "clients.fraction=0",
    "clients.fraction=1.5",
    "clients.min_clients=0",
    "clients.min_clients=11",
    "clients.students=resnet999",
    "clients.students=[]",
    "clients.students={a='mlp'}",
    "clients.students={default='mlp', 99='mlp'}",
    "clients.students=5",
    "train=5",
    "train.epochs=-1",
    "train.batch_size=0",
    "train.lr=0",
    "train.lr=inf",
    "train.lr=nan",
    "train.lr=-0.1",
    "train.lr=true",
    "train.optimizer=rmsprop",
    "train.epochs_schedule=[0]",
    "train.epochs_schedule=[1.5]",
    "train.epochs_schedule=3",
    "train.lrr=0.1",
    "distill.temperature=0",
    "distill.loss=hinge",
    "distill.proxy_per_round=100000",
    "distill.proxy_per_round=-1",
    "server.student=giant",
    "server.distill_on=all",
    "server.lr_schedule=linear",
    "server.confident_fraction=2",
    "server.epochs=-2",
    "algorithm.name=fedprox",
    "algorithm.teacher=mode",
    "algorithm.trim_fraction=0.5",
    "algorithm.client_teacher=nobody",
    "algorithm.era_temperature=0",
    "algorithm.match_class_prior=true",
    "algorithm.teacher_confidence=surest",
    "algorithm.self_distill_weight=1",
    "algorithm.mutual_weight=-1",
    "algorithm.mutual_meme_weight=nan",
    "algorithm.teacher_prior_agreement=true",
    "algorithm.name=no_such_module_xyz:Algo",
    "algorithm.name=strategies.dsfl:Nope",
    "algorithm.name=fedkd.spec:Spec",
    "algorithm.name=strategies.dsfl:",
    "algorithm.sharpness=2",
    "privacy.dpsgd=true",
    "privacy.delta=0",
    "privacy.delta=1",
    "privacy.max_grad_norm=0",
    "privacy.release_noise=-1",
    "privacy.target_epsilon=-1",
    "privacy.histogram_noise=5",
    "privacy.budget_epsilon=-2",
    "eval.every=0",
    "eval.client_test_samples=-1",
    "resources.num_cpus=0",
    "resources.num_cpus=64",
    "resources.num_gpus=-1",
    "resources.device=tpu",
    "resources.round_timeout=0.001",
    "resources.round_timeout=0",
    "resources.round_timeout=inf",
    "resources.learner=magic",
    "resources.precision=bf16",
    "audit.client=99",
    "audit.canaries=1",
    "audit.shadows=1",
    "audit.confidence=1",
    "audit.canaries=4",
    "output.plots='maybe'",
    "sweep.grid=5",
    "sweep.grid={nope=[1]}",
    "sweep.grid={rounds=[]}",
    "sweep.grid={'train.lr'=['none']}",
    "noequals",
    "rounds.x=1",
]

# Cases that need several overrides together, or files.
OTHER_CASES = {
    "dpsgd-epsilon-1e-6": [
        "run",
        "--set",
        "privacy.dpsgd=true",
        "--set",
        "privacy.target_epsilon=1e-6",
    ],
    "dpsgd-epsilon-0.05": [
        "run",
        "--set",
        "privacy.dpsgd=true",
        "--set",
        "privacy.target_epsilon=0.05",
    ],
    "histogram-uses-the-whole-budget": [
        "run",
        "--set",
        "privacy.dpsgd=true",
        "--set",
        "privacy.target_epsilon=1",
        "--set",
        "algorithm.teacher=class_weighted",
        "--set",
        "privacy.histogram_noise=0.5",
    ],
    "release-noise-with-fd": [
        "run",
        "--set",
        "algorithm.name=fd",
        "--set",
        "privacy.release_noise=1",
    ],
    "another-algorithms-key": [
        "run",
        "--set",
        "algorithm.name=fd",
        "--set",
        "algorithm.era_temperature=0.5",
    ],
    "confidence-with-median": [
        "run",
        "--set",
        "algorithm.teacher=median",
        "--set",
        "algorithm.teacher_confidence=max_prob",
    ],
    "confidence-with-release": [
        "run",
        "--set",
        "algorithm.teacher_confidence=negative_entropy",
        "--set",
        "privacy.release_noise=1",
    ],
    "pate-without-server-student": [
        "run",
        "--set",
        "algorithm.name=pate",
        "--set",
        "server.student=''",
    ],
    "dpsgd-with-pate": [
        "run",
        "--set",
        "algorithm.name=pate",
        "--set",
        "privacy.dpsgd=true",
        "--set",
        "privacy.noise_multiplier=1",
    ],
    "shards-20-classes": [
        "run",
        "--set",
        "data.partition=shards",
        "--set",
        "data.classes_per_client=20",
    ],
    "fedavg-mixed-students": [
        "run",
        "--set",
        "algorithm.name=fedavg",
        "--set",
        "clients.students=['mlp', 'cnn_small']",
    ],
    "dsfl-without-proxy": ["run", "--set", "data.proxy_size=0"],
    "hf-offline": [
        "run",
        "--set",
        "data.source=hf",
        "--set",
        "data.hf_name={files}/no-such-hf-dataset",
    ],
    "proxy-labels-for-validation": [
        "run",
        "--set",
        "proxy.source=synthetic",
        "--set",
        "data.proxy_validation_size=50",
    ],
    "proxy-noise-std-0": ["run", "--set", "proxy.source=synthetic", "--set", "proxy.noise_std=0"],
    **{
        f"proxy-generator-{name}": [
            "run",
            *("--set", "proxy.source=synthetic", "--set", "proxy.synthetic=generator"),
            *(arg for setting in settings for arg in ("--set", setting)),
        ]
        for name, settings in {
            "fd": ["algorithm.name=fd"],
            "pate": ["algorithm.name=pate"],
            "no-server-student": ["server.student=''"],
            "seen": ["server.distill_on=seen"],
            "confident": ["server.confident_fraction=0.3"],
            "audit": ["audit.enabled=true"],
            "latent-0": ["proxy.latent_dim=0"],
            "lr-0": ["proxy.generator_lr=0"],
            "balance-negative": ["proxy.generator_balance=-1"],
            "validation": ["data.proxy_validation_size=50"],
        }.items()
    },
    "proxy-mixup-one-seed": [
        "run",
        "--set",
        "proxy.source=synthetic",
        "--set",
        "proxy.synthetic=mixup",
        "--set",
        "proxy.seed_size=1",
    ],
    "proxy-npz-without-x": [
        "run",
        "--set",
        "proxy.source=npz",
        "--set",
        "proxy.path={files}/nokeys.npz",
    ],
    "proxy-npz-signals-for-images": [
        "run",
        "--set",
        "proxy.source=npz",
        "--set",
        "proxy.path={files}/signals.npz",
    ],
    **{
        f"proxy-hf-{name}": [
            "run",
            *("--set", "proxy.source=hf"),
            *(arg for setting in settings for arg in ("--set", setting)),
        ]
        for name, settings in {
            "missing-folder": ["proxy.hf_name={files}/no-such-hf-dataset"],
            "missing-split": ["proxy.hf_name={files}/hf_images", "proxy.hf_split=extra"],
            "empty-split": ["proxy.hf_name={files}/hf_images", "proxy.hf_split=''"],
            "missing-column": ["proxy.hf_name={files}/hf_images", "proxy.image_key=pixels"],
            "text-column": ["proxy.hf_name={files}/hf_signals", "proxy.image_key=name"],
            "signals-for-images": ["proxy.hf_name={files}/hf_signals", "proxy.size=10"],
            "too-few-examples": ["proxy.hf_name={files}/hf_images"],
            "private-split": [
                "proxy.hf_name={files}/hf_images",
                "data.source=hf",
                "data.hf_name={files}/hf_images",
            ],
        }.items()
    },
    "proxy-hf-mixup-seeds-without-name": [
        "run",
        *("--set", "proxy.source=synthetic", "--set", "proxy.synthetic=mixup"),
        *("--set", "proxy.seed_source=hf"),
    ],
    # Spec files.
    "spec-missing": ["run", "{files}/nothing.toml"],
    "spec-is-a-folder": ["run", "{files}"],
    "spec-not-utf8": ["run", "{files}/latin1.toml"],
    "spec-not-toml": ["run", "{files}/broken.toml"],
    "spec-data-string": ["run", "{files}/data_string.toml"],
    "spec-unknown-section": ["run", "{files}/unknown_section.toml"],
    "spec-extends-loop": ["run", "{files}/loop_a.toml"],
    "spec-extends-number": ["run", "{files}/extends_number.toml"],
    "spec-extends-missing": ["run", "{files}/extends_missing.toml"],
    "spec-binary": ["run", "{files}/binary.toml"],
    # Data files (checked before Ray starts).
    "npz-missing-file": [
        "run",
        "--set",
        "data.source=npz",
        "--set",
        "data.path=/nonexistent/x.npz",
    ],
    "npz-empty-file": ["run", "--set", "data.source=npz", "--set", "data.path={files}/empty.npz"],
    "npz-text-file": ["run", "--set", "data.source=npz", "--set", "data.path={files}/text.npz"],
    "npz-missing-keys": [
        "run",
        "--set",
        "data.source=npz",
        "--set",
        "data.path={files}/nokeys.npz",
    ],
    "npz-nan-inputs": ["run", "--set", "data.source=npz", "--set", "data.path={files}/nan.npz"],
    "npz-negative-labels": [
        "run",
        "--set",
        "data.source=npz",
        "--set",
        "data.path={files}/neglabels.npz",
    ],
    "npz-float-labels": [
        "run",
        "--set",
        "data.source=npz",
        "--set",
        "data.path={files}/floatlabels.npz",
    ],
    "npz-length-mismatch": [
        "run",
        "--set",
        "data.source=npz",
        "--set",
        "data.path={files}/mismatch.npz",
    ],
    "npz-string-inputs": [
        "run",
        "--set",
        "data.source=npz",
        "--set",
        "data.path={files}/strings.npz",
    ],
    "npz-shape-mismatch": [
        "run",
        "--set",
        "data.source=npz",
        "--set",
        "data.path={files}/shapes.npz",
    ],
    "npz-too-few-examples": [
        "run",
        "--set",
        "data.source=npz",
        "--set",
        "data.path={files}/tiny.npz",
    ],
    "mutual-dpsgd": [
        "run",
        "--set",
        "algorithm.mutual_weight=1",
        "--set",
        "privacy.dpsgd=true",
        "--set",
        "privacy.noise_multiplier=1",
    ],
    "private-anchor-dpsgd": [
        "run",
        "--set",
        "distill.private_weight=1",
        "--set",
        "privacy.dpsgd=true",
        "--set",
        "privacy.noise_multiplier=1",
    ],
    "private-anchor-without-digest": [
        "run",
        "--set",
        "algorithm.name=local_only",
        "--set",
        "distill.private_weight=1",
    ],
    "private-anchor-negative": ["run", "--set", "distill.private_weight=-0.5"],
    "npz-folder-as-path": ["run", "--set", "data.source=npz", "--set", "data.path={files}"],
    # Results folders.
    "out-is-a-file": ["run", "--out", "{files}/a_file"],
    "out-under-a-file": ["run", "--out", "{files}/a_file/run"],
    "out-holds-a-run": ["run", "--out", "{files}/a_run"],
    "out-not-empty": ["run", "--out", "{files}/not_empty"],
    "out-locked": ["run", "--out", "{files}/locked"],
    "out-in-proc": ["run", "--out", "/proc/fedkd-run"],
    # Command lines.
    "run-unknown-option": ["run", "--bogus"],
    "run-set-without-value": ["run", "--set"],
    "run-two-specs": ["run", "a.toml", "b.toml"],
    "unknown-command": ["runn"],
    "report-no-run": ["report"],
    "report-missing-folder": ["report", "{files}/nothing"],
    "report-not-a-run": ["report", "{files}/not_empty"],
    "report-damaged-row": ["report", "{files}/damaged_run"],
    "report-damaged-summary": ["report", "{files}/damaged_summary"],
    "report-row-not-object": ["report", "{files}/list_row"],
    "report-bad-plot-option": ["report", "{files}/a_run", "--plot"],
    "sweep-no-spec": ["sweep"],
    "sweep-missing-spec": ["sweep", "{files}/nothing.toml"],
    "sweep-no-grid": ["sweep", "{files}/plain.toml"],
    "sweep-parallel-zero": ["sweep", "{files}/grid.toml", "--parallel", "0"],
    "sweep-parallel-text": ["sweep", "{files}/grid.toml", "--parallel", "two"],
    "sweep-bad-point": ["sweep", "{files}/grid.toml", "--set", "rounds=-1"],
    "sweep-grid-bad-key": ["sweep", "{files}/grid_bad_key.toml"],
    "sweep-out-is-a-file": ["sweep", "{files}/grid.toml", "--out", "{files}/a_file"],
    "sweep-out-under-a-file": ["sweep", "{files}/grid.toml", "--out", "{files}/a_file/s"],
    "audit-no-folder": ["audit", "{files}/nothing"],
    "audit-run-without-audit": ["audit", "{files}/a_run"],
    "audit-client-text": ["audit", "{files}/a_run", "--client", "x"],
    "audit-shadows-text": ["audit", "{files}/a_run", "--shadows", "many"],
    "certs-zero-nodes": ["certs", "{files}/certs_a", "--nodes", "0"],
    "certs-zero-days": ["certs", "{files}/certs_b", "--days", "0"],
    "certs-nodes-text": ["certs", "{files}/certs_c", "--nodes", "x"],
    "certs-into-a-file": ["certs", "{files}/a_file"],
    "submit-no-connection": ["submit"],
    "submit-relative-out": ["submit", "--connection", "local", "--out", "rel/dir"],
    "submit-bad-spec": ["submit", "--connection", "local", "--set", "rounds=-1"],
    "submit-unknown-connection": ["submit", "--connection", "nowhere"],
}

CASES = {f"set:{item}": ["run", "--set", item] for item in BAD_SETS} | OTHER_CASES


def _npz(path: Path, **arrays) -> None:
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bad-inputs")
    rng = np.random.default_rng(0)
    x, y = rng.random((40, 8, 8), dtype=np.float32), np.arange(40) % 4
    good = {"x_train": x, "y_train": y, "x_test": x[:10], "y_test": y[:10]}
    (d / "empty.npz").write_bytes(b"")
    (d / "text.npz").write_text("not an archive")
    _npz(d / "nokeys.npz", x_train=x, y_train=y)
    _npz(d / "signals.npz", x=rng.random((600, 30)))  # 1-D inputs, more than proxy_size
    _npz(d / "nan.npz", **{**good, "x_train": np.where(x > 0.5, np.nan, x)})
    _npz(d / "neglabels.npz", **{**good, "y_train": y - 1})
    _npz(d / "floatlabels.npz", **{**good, "y_train": y + 0.5})
    _npz(d / "mismatch.npz", **{**good, "y_train": y[:30]})
    _npz(d / "strings.npz", **{**good, "x_train": np.array(["a"] * 40)})
    _npz(d / "shapes.npz", **{**good, "x_test": rng.random((10, 6, 6))})
    _npz(d / "tiny.npz", x_train=x[:3], y_train=y[:3], x_test=x[:2], y_test=y[:2])
    _hf_folders(d)
    (d / "latin1.toml").write_bytes('name = "caf\xe9"\n'.encode("latin-1"))
    (d / "broken.toml").write_text("rounds = = 3\n")
    (d / "data_string.toml").write_text('data = "digits"\n')
    (d / "unknown_section.toml").write_text("[training]\nlr = 0.1\n")
    (d / "loop_a.toml").write_text('extends = "loop_b.toml"\n')
    (d / "loop_b.toml").write_text('extends = "loop_a.toml"\n')
    (d / "extends_number.toml").write_text("extends = 3\n")
    (d / "extends_missing.toml").write_text('extends = "nowhere.toml"\n')
    (d / "binary.toml").write_bytes(bytes(range(256)))
    (d / "plain.toml").write_text("rounds = 2\n")
    (d / "grid.toml").write_text("rounds = 2\n[sweep]\ngrid = { seed = [0, 1] }\n")
    (d / "grid_bad_key.toml").write_text("[sweep]\ngrid = { 'train.lrr' = [0.1] }\n")
    (d / "a_file").write_text("a file, not a folder")
    for name in ("a_run", "damaged_run", "damaged_summary", "list_row"):
        (d / name).mkdir()
        (d / name / "spec.toml").write_text("rounds = 1\n")
        (d / name / "summary.json").write_text(json.dumps({"spec_name": name}))
    row = json.dumps({"round": 1, "bytes_up_per_client": 0, "clients_ok": 0})
    (d / "a_run" / "metrics.jsonl").write_text(row + "\n")
    (d / "damaged_run" / "metrics.jsonl").write_text('{"round": 1, "bytes\n' + row + "\n")
    (d / "damaged_summary" / "metrics.jsonl").write_text(row + "\n")
    (d / "damaged_summary" / "summary.json").write_text('{"spec_name": ')
    (d / "list_row" / "metrics.jsonl").write_text("[1, 2]\n")
    (d / "not_empty").mkdir()
    (d / "not_empty" / "notes.txt").write_text("my notes")
    (d / "locked").mkdir()
    (d / "locked" / ".fedkd.lock").write_text(f"{os.getpid()}\n")  # a live process holds it
    return d


def _hf_folders(d: Path) -> None:
    """Local Hugging Face data sets: 40 grey 8x8 images, and 1-D signals with a text column."""
    import datasets

    (d / "hf_images").mkdir()
    write_hf_split(d / "hf_images", "train", 40, seed=0)
    (d / "hf_signals").mkdir()
    signals = {"x": list(np.zeros((20, 30), np.float32)), "name": ["a"] * 20}
    datasets.Dataset.from_dict(signals).to_parquet(str(d / "hf_signals" / "train.parquet"))


@pytest.fixture
def no_engine(monkeypatch, tmp_path):
    """No case may start a simulation; submit's Flower config is a throwaway one."""

    def refuse(*args, **kwargs):
        raise AssertionError("the input reached the simulation engine")

    monkeypatch.setattr(cli, "simulate", refuse)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    monkeypatch.chdir(tmp_path)  # default run folders (runs/...) land in the test's folder


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_exit_2(case, files, no_engine, request):
    if "hf" in case:
        request.getfixturevalue("hf_offline")  # no network, and a throwaway datasets cache
    args = [a.replace("{files}", str(files)) for a in CASES[case]]
    result = CliRunner().invoke(cli.app, args)
    stderr = result.stderr
    assert result.exit_code == 2, (result.exit_code, stderr, result.stdout, result.exception)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    assert "Traceback" not in stderr + result.stdout
    assert not result.stdout.strip(), result.stdout


def test_the_battery_is_at_least_a_hundred_inputs():
    assert len(CASES) >= 100


def test_report_reads_a_run_whose_last_row_a_kill_cut_off(tmp_path, files, no_engine):
    run = tmp_path / "cut"
    run.mkdir()
    rows = [json.dumps({"round": r, "bytes_up_per_client": 1, "clients_ok": 1}) for r in (1, 2)]
    (run / "metrics.jsonl").write_text(rows[0] + "\n" + rows[1][:15])  # no newline: cut
    result = CliRunner().invoke(cli.app, ["report", str(run), "--plot", str(tmp_path / "p.png")])
    assert result.exit_code == 0, result.stderr
    assert "Traceback" not in result.stderr


def test_a_refused_run_leaves_no_folder_behind(tmp_path, no_engine):
    out = tmp_path / "r"
    for args in (["--set", "seed=-1"], ["--set", "resources.num_cpus=64"]):
        result = CliRunner().invoke(cli.app, ["run", *args, "--out", str(out)])
        assert result.exit_code == 2 and not out.exists(), result.stderr
