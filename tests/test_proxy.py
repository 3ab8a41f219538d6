"""Proxy sets that are not in-domain (`[proxy]`, fedkd.data.proxy): each source's inputs, the
refusals of what would need proxy labels, and the provenance a run records."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from fedkd.data import ArrayDataset, DataError, ProxySource, build_federated_data, load_source
from fedkd.data.proxy import fit_to, proxy_inputs
from fedkd.spec import SpecError, load_spec
from tests.hf_folder import write_hf_split

NOISE = ProxySource(source="synthetic", synthetic="noise")
UNIFORM = dataclasses.replace(NOISE, noise="uniform", noise_std=0.5)


def _standardised(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / x.std()


@pytest.fixture(scope="module")
def digits() -> ArrayDataset:
    return load_source("digits", seed=0)


@pytest.fixture
def proxy_npz(tmp_path: Path) -> Path:
    """60 uint8 'images' of 28x28, as an MNIST file holds them, under the key x."""
    path = tmp_path / "proxy.npz"
    x = np.random.default_rng(1).integers(0, 256, (60, 28, 28), dtype=np.uint8)
    np.savez(path, x=x)
    return path


def _mixup(path: Path | str = "", seed_source: str = "digits") -> ProxySource:
    return ProxySource(
        source="synthetic", synthetic="mixup", seed_source=seed_source, seed_size=8, path=str(path)
    )


def test_digits_become_28x28_standardised_with_their_own_statistics() -> None:
    x = proxy_inputs(ProxySource(source="digits"), (1, 28, 28), 50, seed=0)
    assert x.shape == (50, 1, 28, 28) and x.dtype == np.float32
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-4
    # Digits have a blank background (raw 0): the smallest value, the same in every image.
    assert np.allclose(x.min(axis=(1, 2, 3)), x.min())


def test_fit_to_resizes_keeping_a_constant_and_the_mean() -> None:
    img = np.random.default_rng(0).random((3, 1, 28, 28))
    img[0] = 0.75  # a constant image stays constant
    small = fit_to(img, (1, 8, 8), "k")
    assert np.allclose(small[0], small[0, 0, 0, 0])
    # Shrinking is antialiased: each image's mean intensity survives it, up to the affine
    # map of the standardisation that follows.
    before, after = img.mean(axis=(1, 2, 3)), small.mean(axis=(1, 2, 3))
    ratio = (after - after[1]) / (after[0] - after[1])
    assert np.allclose(ratio, (before - before[1]) / (before[0] - before[1]), atol=0.02)


def test_fit_to_matches_channels_and_refuses_other_dimensions() -> None:
    gray = np.random.default_rng(0).random((2, 1, 8, 8))
    rgb = fit_to(gray, (3, 8, 8), "k")
    assert rgb.shape == (2, 3, 8, 8) and np.allclose(rgb[:, 0], rgb[:, 2])
    assert np.allclose(fit_to(rgb, (1, 8, 8), "k"), _standardised(gray))
    with pytest.raises(DataError, match="proxy.source 'digits'.*1-D inputs"):
        proxy_inputs(ProxySource(source="digits"), (1, 40), 5, seed=0)
    with pytest.raises(DataError, match="4 channels cannot become"):
        fit_to(np.zeros((1, 4, 8, 8)), (3, 8, 8), "k")


def test_noise_has_the_asked_spread_and_follows_the_seed() -> None:
    g = proxy_inputs(NOISE, (1, 8, 8), 400, seed=0)
    assert g.shape == (400, 1, 8, 8) and abs(g.std() - 1.0) < 0.05 and abs(g.mean()) < 0.05
    u = proxy_inputs(UNIFORM, (1, 8, 8), 400, seed=0)
    assert abs(u.std() - 0.5) < 0.03 and np.abs(u).max() <= np.sqrt(3) * 0.5
    assert np.array_equal(g, proxy_inputs(NOISE, (1, 8, 8), 400, seed=0))
    assert not np.array_equal(g, proxy_inputs(NOISE, (1, 8, 8), 400, seed=1))


def test_mixup_mixes_pairs_of_distinct_seed_examples() -> None:
    proxy = _mixup()
    x = proxy_inputs(proxy, (1, 8, 8), 300, seed=0).reshape(300, -1).astype(np.float64)
    assert len(np.unique(x, axis=0)) == 300  # lam ~ Beta: no input is repeated
    # With two seeds a and b every input is b + lam (a - b): all on one line, never a seed.
    two = proxy_inputs(dataclasses.replace(proxy, seed_size=2), (1, 8, 8), 50, seed=0)
    two = two.reshape(50, -1).astype(np.float64)
    singular = np.linalg.svd(two[1:] - two[0], compute_uv=False)
    assert singular[1] < 1e-4 * singular[0]
    with pytest.raises(DataError, match="fewer than the 5000 asked"):
        proxy_inputs(dataclasses.replace(proxy, seed_size=5000), (1, 8, 8), 10, seed=0)


def test_npz_proxy_reads_x_and_names_what_is_wrong(tmp_path: Path, proxy_npz: Path) -> None:
    x = proxy_inputs(ProxySource(source="npz", path=str(proxy_npz)), (1, 8, 8), 20, seed=0)
    assert x.shape == (20, 1, 8, 8) and abs(float(x.mean())) < 1e-4
    np.savez(tmp_path / "nox.npz", x_train=np.zeros((3, 8, 8)))
    np.savez(tmp_path / "text.npz", x=np.array(["a", "b"]))
    (tmp_path / "empty.npz").write_bytes(b"")
    for name, match in [
        ("nox.npz", "has no array 'x' \\(it holds x_train\\)"),
        ("text.npz", "must hold numbers"),
        ("empty.npz", "cannot read"),
        ("missing.npz", "not found"),
    ]:
        proxy = ProxySource(source="npz", path=str(tmp_path / name))
        with pytest.raises(DataError, match=f"proxy.path: .*{match}"):
            proxy_inputs(proxy, (1, 8, 8), 2, seed=0)


def _hf(folder: Path, **keys) -> ProxySource:
    return ProxySource(source="hf", hf_name=str(folder), **keys)


def test_hf_proxy_is_the_folders_inputs_resized(hf_offline: Path) -> None:
    from PIL import Image

    images = write_hf_split(hf_offline, "train", 30, seed=0, shape=(28, 28))
    x = proxy_inputs(_hf(hf_offline), (3, 14, 14), 20, seed=5)
    # Directly: the run's draw of 20 of the 30 rows in stored order, each image in [0, 1]
    # resized by PIL's bilinear filter, repeated to 3 channels and standardised as a whole.
    rows = np.sort(np.random.default_rng((5, 4)).choice(30, size=20, replace=False))
    small = np.stack(
        [
            np.asarray(
                Image.fromarray(img / np.float32(255), mode="F").resize((14, 14), Image.BILINEAR)
            )
            for img in images[rows].astype(np.float32)
        ]
    )
    expected = np.repeat(_standardised(small.astype(np.float64))[:, None], 3, axis=1)
    assert x.shape == (20, 3, 14, 14) and x.dtype == np.float32
    np.testing.assert_allclose(x, expected, atol=1e-5)
    # Every party builds the same proxy set from the run's seed; another seed draws others.
    assert np.array_equal(x, proxy_inputs(_hf(hf_offline), (3, 14, 14), 20, seed=5))
    assert not np.array_equal(x, proxy_inputs(_hf(hf_offline), (3, 14, 14), 20, seed=6))


def test_hf_proxy_reads_the_split_and_column_asked_for(hf_offline: Path) -> None:
    write_hf_split(hf_offline, "train", 12, seed=0)
    other = write_hf_split(hf_offline, "validation", 12, seed=1)
    x = proxy_inputs(_hf(hf_offline, hf_split="validation", image_key="img"), (1, 8, 8), 12, 0)
    np.testing.assert_allclose(x[:, 0], _standardised(other / 255.0), atol=1e-5)
    # A mixup seed set can come from it too.
    mixup = dataclasses.replace(_mixup(seed_source="hf"), hf_name=str(hf_offline))
    assert proxy_inputs(mixup, (1, 8, 8), 40, seed=0).shape == (40, 1, 8, 8)


def test_hf_proxy_names_what_is_wrong(hf_offline: Path) -> None:
    import datasets

    write_hf_split(hf_offline, "train", 12, seed=0)
    signals = hf_offline.parent / "signals"
    signals.mkdir()
    datasets.Dataset.from_dict(
        {"x": list(np.zeros((5, 30), np.float32)), "name": ["a"] * 5}
    ).to_parquet(str(signals / "train.parquet"))
    for proxy, match in [
        (ProxySource(source="hf"), "proxy.hf_name: required"),
        (_hf(hf_offline.parent / "nowhere"), "proxy.hf_name: cannot load"),
        (_hf(hf_offline, hf_split="extra"), "proxy.hf_split: .* no usable 'extra'"),
        (_hf(hf_offline, image_key="pixels"), "proxy.image_key: column 'pixels' not found"),
        (_hf(signals, image_key="name"), "proxy.image_key: column 'name' .* must hold numbers"),
        (_hf(signals), "proxy.source 'hf': its inputs of shape \\(1, 30\\) cannot become"),
        (_hf(hf_offline, size=13), "proxy.source 'hf': holds 12 examples, fewer than the 13"),
    ]:
        with pytest.raises(DataError, match=match):
            proxy_inputs(proxy, (1, 8, 8), proxy.size or 2, seed=0)


@pytest.mark.parametrize("proxy", [NOISE, _mixup()], ids=["noise", "mixup"])
def test_external_proxy_leaves_the_clients_data_alone(digits: ArrayDataset, proxy) -> None:
    """The private pool still sets data.proxy_size aside: only the proxy inputs change."""
    private = dataclasses.replace(digits, name="other")  # mixup of digits seeds: not private
    kwargs = {"num_clients": 4, "proxy_size": 200, "seed": 0}
    in_domain = build_federated_data(private, **kwargs)
    other = build_federated_data(private, proxy=dataclasses.replace(proxy, size=120), **kwargs)
    assert other.proxy_x.shape == (120, *digits.input_shape)
    assert other.proxy_y is None and len(other.proxy_indices) == 0
    assert in_domain.proxy_y is not None
    for a, b in zip(in_domain.clients, other.clients, strict=True):
        assert np.array_equal(a.train_indices, b.train_indices)
    with pytest.raises(DataError, match="proxy_validation_size.*no labels"):
        build_federated_data(private, proxy=proxy, proxy_validation_size=10, **kwargs)


def _refusal(overrides: list[str]) -> str:
    with pytest.raises(SpecError) as err:
        load_spec(None, overrides)
    return str(err.value)


def test_spec_refuses_what_needs_proxy_labels_or_makes_private_data_public(
    proxy_npz: Path,
) -> None:
    noise = ["proxy.source=synthetic"]
    assert "no labels" in _refusal([*noise, "data.proxy_validation_size=50"])
    # The quickstart's private data are the digits: neither a digits proxy nor digits seeds.
    assert _refusal(["proxy.source=digits"]).startswith("proxy.source: 'digits' is the private")
    mixup = ["proxy.source=synthetic", "proxy.synthetic=mixup"]
    assert _refusal(mixup).startswith("proxy.seed_source: 'digits' is the private")
    private_npz = ["data.source=npz", f"data.path={proxy_npz}", "proxy.source=npz"]
    assert "is the private data file" in _refusal([*private_npz, f"proxy.path={proxy_npz}"])
    assert _refusal(["proxy.source=npz"]).startswith("proxy.path: required")
    assert _refusal(["proxy.size=100"]).startswith("proxy.size: the in_domain proxy")
    assert _refusal([*noise, "proxy.size=50", "distill.proxy_per_round=60"]).startswith(
        "distill.proxy_per_round: 60 exceeds the proxy set's 50"
    )
    assert _refusal([*noise, "data.proxy_size=0"]).startswith("proxy.size: algorithm 'dsfl'")
    assert _refusal([*mixup, "proxy.seed_size=1"]).startswith("proxy.seed_size")
    assert _refusal(["proxy.source=generator"]).startswith("proxy.source: 'generator'")


def test_spec_resolves_proxy_path_from_the_spec_file(tmp_path: Path, proxy_npz: Path) -> None:
    spec_file = tmp_path / "s.toml"
    spec_file.write_text('[proxy]\nsource = "npz"\npath = "proxy.npz"\n')
    spec = load_spec(spec_file)
    assert Path(spec.proxy.path) == proxy_npz
    assert spec.proxy_inputs == spec.data.proxy_size  # proxy.size 0: data.proxy_size
    assert spec.proxy.record(spec.proxy_inputs) == {
        "source": "npz",
        "path": str(proxy_npz),
        "size": 500,
    }


def test_spec_of_an_hf_proxy_records_it_and_refuses_the_private_data_set(tmp_path: Path) -> None:
    hf = ["proxy.source=hf", f"proxy.hf_name={tmp_path}"]
    spec = load_spec(None, [*hf, "proxy.size=40"])
    assert spec.proxy.record(spec.proxy_inputs) == {
        "source": "hf",
        "hf_name": str(tmp_path),
        "hf_split": "train",
        "image_key": "",
        "size": 40,
    }
    mixup = ["proxy.source=synthetic", "proxy.synthetic=mixup", "proxy.seed_source=hf"]
    record = load_spec(None, [*mixup, f"proxy.hf_name={tmp_path}"]).proxy.record(500)
    assert record["seed_source"] == "hf" and record["hf_name"] == str(tmp_path)
    assert _refusal(["proxy.source=hf"]).startswith("proxy.hf_name: required for proxy.source")
    assert _refusal(mixup).startswith("proxy.hf_name: required for proxy.seed_source")
    assert _refusal([*hf, "proxy.hf_split=''"]).startswith("proxy.hf_split: required")
    private = ["data.source=hf", f"data.hf_name={tmp_path}/."]
    for split in ("train", "test"):
        message = _refusal([*private, *hf, f"proxy.hf_split={split}"])
        assert message.startswith(f"proxy.hf_split: '{split}' of '{tmp_path}' is a split of")
    assert load_spec(None, [*private, *hf, "proxy.hf_split=unlabelled"]).proxy.hf_split


# Each metric that scores something against the proxy's labels, and a run that computes it.
LABEL_DIAGNOSTICS = {
    "teacher_proxy_acc": ["algorithm.name=dsfl"],
    "server_label_acc": [
        "algorithm.name=dsfl",
        "server.confident_fraction=0.3",
        "algorithm.self_training_confidence=0.5",
    ],
    "pate_label_acc": [
        "algorithm.name=pate",
        "algorithm.pate_threshold=1",
        "algorithm.pate_sigma_threshold=1",
        "algorithm.pate_sigma=1",
    ],
}


@pytest.mark.parametrize("metric", list(LABEL_DIAGNOSTICS))
def test_a_run_with_a_noise_proxy_records_it_and_scores_nothing_on_proxy_labels(
    tmp_path, metric
) -> None:
    from fedkd.apps.client_app import make_client_app
    from fedkd.apps.server_app import run_rounds
    from fedkd.results import RunRecorder
    from tests.inprocess import InProcessGrid

    tiny = ["rounds=1", "clients.num_clients=3", "data.proxy_size=100", "train.epochs=1"]
    noise = ["proxy.source=synthetic", "proxy.noise=uniform", "proxy.size=60"]
    spec = load_spec(None, [*tiny, *noise, "distill.epochs=1", *LABEL_DIAGNOSTICS[metric]])
    grid = InProcessGrid(make_client_app(spec), spec.num_nodes)
    run_rounds(grid, spec, RunRecorder(tmp_path / "run", spec))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["proxy"] == {
        "source": "synthetic",
        "synthetic": "noise",
        "noise": "uniform",
        "noise_std": 1.0,
        "size": 60,
    }
    row = summary["final"]
    assert metric in row and row[metric] is None and row["server_test_acc"] is not None
    # Inputs that did get a label, so that the metric had something to score.
    assert row.get("pate_answered", 1) > 0 and row.get("server_labels", 1) > 0


def test_a_run_with_an_hf_proxy_distils_on_the_folders_inputs(tmp_path, hf_offline) -> None:
    from fedkd.apps.client_app import make_client_app
    from fedkd.apps.server_app import run_rounds
    from fedkd.assembly import federated_data
    from fedkd.results import RunRecorder
    from tests.inprocess import InProcessGrid

    write_hf_split(hf_offline, "train", 80, seed=0, shape=(28, 28))
    tiny = ["rounds=2", "clients.num_clients=3", "data.proxy_size=100", "train.epochs=1"]
    hf = ["proxy.source=hf", f"proxy.hf_name={hf_offline}", "proxy.size=60"]
    spec = load_spec(None, [*tiny, *hf, "distill.epochs=1"])
    assert np.array_equal(
        federated_data(spec).proxy_x, proxy_inputs(spec.proxy, (1, 8, 8), 60, spec.seed)
    )
    grid = InProcessGrid(make_client_app(spec), spec.num_nodes)
    run_rounds(grid, spec, RunRecorder(tmp_path / "run", spec))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["proxy"] == {
        "source": "hf",
        "hf_name": str(hf_offline),
        "hf_split": "train",
        "image_key": "",
        "size": 60,
    }
    assert summary["final"]["server_test_acc"] is not None
    assert summary["final"]["teacher_proxy_acc"] is None  # the proxy has no labels
