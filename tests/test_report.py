"""`fedkd report`: runs grouped by seed, mean/sd/CI per metric, provenance, three formats."""

import csv
import io
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from fedkd import provenance
from fedkd.provenance import PACKAGES, first_processor, machine_label
from fedkd.run.cli import app
from fedkd.run.report import describe
from fedkd.spec import load_spec
from tests.test_engine import run_inprocess

# Student's t, 95% two-sided, from printed tables: 2 and 1 degrees of freedom.
T_975_DOF2 = 4.303
T_975_DOF1 = 12.706


def fake_run(
    root,
    name,
    *,
    seed=0,
    lr=0.05,
    accs=(0.5,),
    eps=None,
    wall=10.0,
    commit="a" * 40,
    items=(),
    extra=None,
):
    """A run folder with chosen numbers (spec.toml as `fedkd run` writes it); `items` are more
    spec overrides, `extra` more summary fields."""
    run = root / name
    run.mkdir()
    spec = load_spec(None, [f"seed={seed}", f"train.lr={lr}", f'name="{name}"', *items])
    (run / "spec.toml").write_text(spec.to_toml())
    rows = [
        {
            "round": r + 1,
            "server_test_acc": acc,
            "client_test_acc_mean": acc / 2,
            "client_local_acc_mean": None,
            "epsilon_max": eps,
            "bytes_up_per_client": 1000.0 * (seed + 1),
            "clients_ok": 4,
        }
        for r, acc in enumerate(accs)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {
        "spec_name": name,
        "algorithm": "dsfl",
        "wall_s": wall,
        "fedkd_version": "0.1.0",
        "provenance": {
            "git_commit": commit,
            "git_dirty": False,
            "device": {"cpu": "Test CPU", "cpu_count": 2, "gpus": []},
        },
        **(extra or {}),
    }
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def report(*args):
    result = CliRunner().invoke(app, ["report", *map(str, args)], terminal_width=250)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture
def seeds_and_other(tmp_path):
    """Three seeds of one setting (a sweep's point names), one run of another learning rate."""
    runs = [
        fake_run(tmp_path, f"sw-lr=0.05,seed={s}", seed=s, accs=(0.3, acc), eps=e, wall=w)
        for s, acc, e, w in ((0, 0.8, 1.0, 10.0), (1, 0.9, 2.0, 20.0), (2, 1.0, 3.0, 30.0))
    ]
    runs.append(fake_run(tmp_path, "sw-lr=0.1,seed=0", lr=0.1, accs=(0.2, 0.7), commit="b" * 40))
    return runs


def test_statistics_match_hand_computed_values():
    stats = describe([0.8, 0.9, 1.0])
    assert stats.n == 3 and stats.mean == pytest.approx(0.9) and stats.sd == pytest.approx(0.1)
    half = T_975_DOF2 * 0.1 / math.sqrt(3)  # 0.2484
    assert stats.ci_low == pytest.approx(0.9 - half, abs=1e-4)
    assert stats.ci_high == pytest.approx(0.9 + half, abs=1e-4)
    two = describe([1.0, 3.0])  # sd sqrt(2), half-width 12.706 * sqrt(2) / sqrt(2)
    assert two.ci_high - two.mean == pytest.approx(T_975_DOF1, abs=1e-3)
    one = describe([0.7])
    assert (one.n, one.mean, one.sd, one.ci_low, one.ci_high) == (1, 0.7, None, None, None)
    assert describe([]).mean is None


def test_csv_groups_seeds_and_gives_mean_sd_and_ci(tmp_path, seeds_and_other):
    plot = tmp_path / "cmp.png"
    result = report(*seeds_and_other, "--format", "csv", "--plot", plot)
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    by = {(r["group"], r["metric"]): r for r in rows}
    assert {r["group"] for r in rows} == {"sw-lr=0.05", "sw-lr=0.1"}
    acc = by["sw-lr=0.05", "server_test_acc"]  # final round: 0.8, 0.9, 1.0
    assert acc["n"] == "3" and acc["seeds"] == "0 1 2"
    assert float(acc["mean"]) == pytest.approx(0.9) and float(acc["sd"]) == pytest.approx(0.1)
    assert float(acc["ci_high"]) == pytest.approx(0.9 + T_975_DOF2 * 0.1 / math.sqrt(3), abs=1e-4)
    eps = by["sw-lr=0.05", "epsilon_max"]
    assert (float(eps["mean"]), float(eps["sd"])) == pytest.approx((2.0, 1.0))
    up = by["sw-lr=0.05", "bytes_up_per_client_round"]  # 1000, 2000, 3000 per seed
    assert float(up["mean"]) == pytest.approx(2000.0)
    assert float(by["sw-lr=0.05", "wall_s"]["mean"]) == pytest.approx(20.0)
    assert by["sw-lr=0.05", "client_local_acc_mean"]["n"] == "0"  # never measured: no mean
    assert by["sw-lr=0.05", "client_local_acc_mean"]["mean"] == ""
    single = by["sw-lr=0.1", "server_test_acc"]
    assert single["n"] == "1" and float(single["mean"]) == pytest.approx(0.7)
    assert single["sd"] == single["ci_low"] == single["ci_high"] == ""
    assert single["commits"] == "bbbbbbbbbb" and acc["commits"] == "aaaaaaaaaa"
    assert acc["fedkd_versions"] == "0.1.0"
    assert plot.stat().st_size > 0


def test_table_shows_one_section_per_group_and_n_a_for_one_seed(seeds_and_other):
    out = report(*seeds_and_other).stdout
    three = next(line for line in out.splitlines() if "sw-lr=0.05" in line)
    assert "server_test_acc" in three and " 3 " in three and "0.9000" in three
    assert "0.1000" in three and "[0.6516, 1.1484]" in three and "aaaaaaaaaa" in three
    one = next(line for line in out.splitlines() if "sw-lr=0.1 " in line)
    assert "0.7000" in one and one.count("n/a") == 2
    assert "nan" not in out.lower()


def test_markdown_names_the_command_commits_and_machine(seeds_and_other):
    out = report(*seeds_and_other, "--format", "md").stdout
    assert out.startswith("# fedkd report")
    assert f"`fedkd report --format md {seeds_and_other[0]}" in out
    assert "aaaaaaaaaa" in out and "bbbbbbbbbb" in out and "Test CPU (2 CPUs)" in out
    table = [line for line in out.splitlines() if line.startswith("| sw-lr=0.1 ")]
    assert table and "| 1 | 0.7000 | n/a | n/a |" in table[0]


def test_groups_with_one_name_are_told_apart_by_their_settings(tmp_path):
    a = fake_run(tmp_path, "a", lr=0.05)
    b = fake_run(tmp_path, "b", lr=0.1)
    for run in (a, b):  # the same spec name, as two plain runs of one spec file
        summary = json.loads((run / "summary.json").read_text())
        (run / "summary.json").write_text(json.dumps({**summary, "spec_name": "same"}))
    rows = list(csv.DictReader(io.StringIO(report(a, b, "--format", "csv").stdout)))
    assert {r["group"] for r in rows} == {"same (train.lr=0.05)", "same (train.lr=0.1)"}


def test_a_groups_label_shows_only_the_proxy_keys_its_proxy_uses(tmp_path):
    """An in-domain proxy is not labelled with the noise distribution of its synthetic twins."""
    noise = ["proxy.source='synthetic'"]
    runs = [
        fake_run(tmp_path, "in", extra={"proxy": {"source": "in_domain", "size": 40}}),
        fake_run(
            tmp_path,
            "gauss",
            items=noise,
            extra={"proxy": {"source": "synthetic", "synthetic": "noise", "noise": "gaussian"}},
        ),
        fake_run(
            tmp_path,
            "unif",
            items=[*noise, "proxy.noise='uniform'"],
            extra={"proxy": {"source": "synthetic", "synthetic": "noise", "noise": "uniform"}},
        ),
    ]
    for run in runs:
        summary = json.loads((run / "summary.json").read_text())
        (run / "summary.json").write_text(json.dumps({**summary, "spec_name": "same"}))
    rows = list(csv.DictReader(io.StringIO(report(*runs, "--format", "csv").stdout)))
    assert {r["group"] for r in rows} == {
        "same (proxy.source=in_domain)",
        "same (proxy.noise=gaussian, proxy.source=synthetic)",
        "same (proxy.noise=uniform, proxy.source=synthetic)",
    }


def test_a_groups_label_leaves_out_another_algorithms_options(tmp_path):
    """FD's `fd_normalise` labels the FD group only, never a FedDF group with a folder path."""
    fd = fake_run(tmp_path, "fd", items=["algorithm.name='fd'", "algorithm.fd_normalise=true"])
    feddf = fake_run(tmp_path, "feddf", items=["algorithm.name='feddf'"])
    for run in (fd, feddf):
        summary = json.loads((run / "summary.json").read_text())
        (run / "summary.json").write_text(json.dumps({**summary, "spec_name": "same"}))
    rows = list(csv.DictReader(io.StringIO(report(fd, feddf, "--format", "csv").stdout)))
    labels = {r["group"] for r in rows}
    assert labels == {
        "same (algorithm.fd_normalise=True, algorithm.name=fd)",
        "same (algorithm.name=feddf)",
    }


def test_a_groups_label_names_an_empty_value_as_the_default(tmp_path):
    """``algorithm.teacher = ""`` (the algorithm's own teacher) is labelled, not left blank."""
    own = fake_run(tmp_path, "own", items=["algorithm.name='fedmd'"])
    probs = fake_run(
        tmp_path, "probs", items=["algorithm.name='fedmd'", "algorithm.teacher='mean_probs'"]
    )
    for run in (own, probs):
        summary = json.loads((run / "summary.json").read_text())
        (run / "summary.json").write_text(json.dumps({**summary, "spec_name": "same"}))
    rows = list(csv.DictReader(io.StringIO(report(own, probs, "--format", "csv").stdout)))
    assert {r["group"] for r in rows} == {
        "same (algorithm.teacher=(default))",
        "same (algorithm.teacher=mean_probs)",
    }


def test_seeds_recorded_before_and_after_a_key_existed_form_one_group(tmp_path):
    import tomllib

    import tomli_w

    old = fake_run(tmp_path, "x-seed=0", seed=0, accs=(0.8,))
    new = fake_run(tmp_path, "x-seed=1", seed=1, accs=(0.9,))
    spec = tomllib.loads((old / "spec.toml").read_text())
    del spec["algorithm"]["teacher_confidence"]  # the older run predates the option
    del spec["proxy"]
    (old / "spec.toml").write_text(tomli_w.dumps(spec))
    other = fake_run(tmp_path, "y", accs=(0.7,))
    (other / "spec.toml").write_text(
        load_spec(None, ['name="y"', "algorithm.teacher_confidence=max_prob"]).to_toml()
    )
    rows = list(csv.DictReader(io.StringIO(report(old, new, other, "--format", "csv").stdout)))
    groups = {r["group"]: r for r in rows if r["metric"] == "server_test_acc"}
    assert groups["x"]["n"] == "2"
    assert groups["y"]["n"] == "1"


def test_report_on_real_runs_and_their_provenance(tmp_path):
    run_inprocess(tmp_path, [], name="dsfl")
    run_inprocess(tmp_path, ["algorithm.name=local_only"], name="local")
    summary = json.loads((tmp_path / "dsfl" / "summary.json").read_text())
    prov = summary["provenance"]
    assert len(prov["git_commit"]) == 40 and isinstance(prov["git_dirty"], bool)
    assert prov["fedkd_version"] == summary["fedkd_version"]
    assert set(prov["packages"]) == set(PACKAGES) and prov["packages"]["torch"]
    assert prov["python"] and prov["device"]["cpu"] and prov["device"]["cpu_count"] >= 1
    assert prov["device"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    out = report(tmp_path / "dsfl", tmp_path / "local").stdout
    lines = out.splitlines()
    dsfl = next(line for line in lines if "bytes_up_per_client_round" in line and "8.0 kB" in line)
    assert dsfl  # 200 proxy x 10 classes x 4 bytes per client per round
    assert any("(algorithm.name=local_only)" in line for line in lines)


def test_report_on_a_folder_without_a_run_fails_clearly(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert "no metrics.jsonl" in result.output


def test_report_refuses_an_unknown_format(tmp_path, seeds_and_other):
    result = CliRunner().invoke(app, ["report", str(seeds_and_other[0]), "--format", "xls"])
    assert result.exit_code == 2 and "--format" in result.output


def test_the_machine_label_names_torchs_cpu_capability_where_a_run_recorded_it():
    # Two VMs may both call their CPU "AMD EPYC"; torch's kernels for AVX2 and AVX512 round
    # differently, so the report tells them apart (runs from before the field: no capability).
    device = {"cpu": "AMD EPYC", "cpu_count": 2, "gpus": []}
    assert machine_label({"device": device}) == "AMD EPYC (2 CPUs)"
    with_capability = {"device": {**device, "cpu_capability": "AVX2"}}
    assert machine_label(with_capability) == "AMD EPYC (2 CPUs, AVX2)"
    assert machine_label({"device": {**device, "gpus": ["NVIDIA H100"]}}) == "NVIDIA H100"


def test_the_cpu_identity_is_the_first_processors(monkeypatch):
    cpuinfo = (
        "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\n"
        "model name\t: AMD EPYC\nstepping\t: 1\n\n"
        "processor\t: 1\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
    )
    fields = first_processor(cpuinfo)
    assert fields["model"] == "1" and fields["model name"] == "AMD EPYC"
    assert fields["cpu family"] == "25" and fields["stepping"] == "1"
    monkeypatch.setattr(provenance, "_cpuinfo", lambda: fields)
    assert provenance.cpu_id() == "AuthenticAMD family 25 model 1 stepping 1"
    monkeypatch.setattr(provenance, "_cpuinfo", dict)  # no /proc/cpuinfo: nothing to tell
    assert provenance.cpu_id() is None
