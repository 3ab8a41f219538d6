"""Validation splits and selection without the test set (docs/validation.md)."""

import json

import numpy as np
import pytest

from fedkd.apps.client_app import make_client_app
from fedkd.apps.server_app import run_rounds
from fedkd.assembly import cohort_config, federated_data
from fedkd.data import ArrayDataset, DataError, build_federated_data, load_source
from fedkd.data.site import load_site_data
from fedkd.learner.cohort import CohortLearner
from fedkd.learner.loop import accuracy, predict_logits
from fedkd.learner.vectorised import VectorisedCohortLearner
from fedkd.results import RunRecorder, select_round_by_validation
from fedkd.spec import SpecError, load_spec
from tests.inprocess import InProcessGrid


@pytest.fixture(scope="module")
def digits() -> ArrayDataset:
    return load_source("digits", seed=0)


def _split(ds: ArrayDataset, **overrides: object):
    kwargs: dict = {"num_clients": 5, "proxy_size": 300, "seed": 3}
    kwargs.update(overrides)
    return build_federated_data(ds, **kwargs)


# -- the splits ------------------------------------------------------------------------------------
def test_validation_slices_are_disjoint_from_everything_and_reproducible(digits):
    fd = _split(digits, validation_fraction=0.2, proxy_validation_size=60)
    parts = [fd.proxy_indices, fd.proxy_val_indices]
    for c in fd.clients:
        n = c.num_examples + len(c.y_val) + len(c.y_local_test)
        assert abs(len(c.y_val) - 0.2 * n) <= 1 and len(c.y_val) >= 1
        np.testing.assert_array_equal(c.x_val, digits.x_train[c.val_indices])
        np.testing.assert_array_equal(c.y_val, digits.y_train[c.val_indices])
        parts += [c.train_indices, c.val_indices, c.local_test_indices]
    everything = np.concatenate(parts)
    # Pairwise disjoint, and together the whole training split of the source.
    assert len(np.unique(everything)) == len(everything) == len(digits.y_train)
    assert len(fd.proxy_x) == 240 and len(fd.proxy_val_y) == 60
    np.testing.assert_array_equal(fd.proxy_val_x, digits.x_train[fd.proxy_val_indices])

    again = _split(digits, validation_fraction=0.2, proxy_validation_size=60)
    np.testing.assert_array_equal(again.proxy_val_indices, fd.proxy_val_indices)
    for a, b in zip(again.clients, fd.clients, strict=True):
        np.testing.assert_array_equal(a.val_indices, b.val_indices)
        np.testing.assert_array_equal(a.train_indices, b.train_indices)
    other_seed = _split(digits, seed=4, validation_fraction=0.2, proxy_validation_size=60)
    assert not np.array_equal(other_seed.proxy_val_indices, fd.proxy_val_indices)


def test_validation_comes_out_of_training_and_proxy_inputs_only(digits):
    """The local test slices, the partition and the rest of the proxy set stay as they were."""
    without = _split(digits)
    fd = _split(digits, validation_fraction=0.2, proxy_validation_size=60)
    assert len(without.proxy_val_y) == 0 and all(len(c.y_val) == 0 for c in without.clients)
    assert without.clients[0].x_val.shape == (0, 1, 8, 8)
    np.testing.assert_array_equal(
        np.union1d(fd.proxy_indices, fd.proxy_val_indices), without.proxy_indices
    )
    for a, b in zip(fd.clients, without.clients, strict=True):
        np.testing.assert_array_equal(a.local_test_indices, b.local_test_indices)
        np.testing.assert_array_equal(
            np.sort(np.concatenate([a.train_indices, a.val_indices])), np.sort(b.train_indices)
        )


def test_split_and_spec_errors(digits):
    with pytest.raises(DataError, match=r"data\.validation_fraction"):
        _split(digits, validation_fraction=0.95)  # with the local test slice: 1.05
    with pytest.raises(DataError, match=r"data\.proxy_validation_size"):
        _split(digits, proxy_validation_size=300)
    with pytest.raises(SpecError, match=r"data\.validation_fraction"):
        load_spec(None, ["data.validation_fraction=0.9"])
    with pytest.raises(SpecError, match=r"data\.proxy_validation_size.*500"):
        load_spec(None, ["data.proxy_validation_size=500"])
    with pytest.raises(SpecError, match=r"data\.proxy_validation_size"):
        load_spec(None, ["data.proxy_validation_size=-1"])
    with pytest.raises(SpecError, match=r"sweep\.select_within.*train\.lr"):
        load_spec(
            None,
            ['sweep.grid={ "train.lr" = [0.1, 0.2] }', 'sweep.select_within=["privacy.delta"]'],
        )


@pytest.mark.parametrize("with_test", [True, False])
def test_a_site_holds_out_a_validation_slice_of_its_training_data(tmp_path, with_test):
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.random((60, 8, 8)), "y_train": rng.integers(0, 10, 60)}
    if with_test:
        arrays |= {"x_test": rng.random((9, 8, 8)), "y_test": rng.integers(0, 10, 9)}
    np.savez(tmp_path / "site.npz", **arrays)

    def load(fraction):
        return load_site_data(
            tmp_path / "site.npz",
            client_id=2,
            input_shape=(1, 8, 8),
            num_classes=10,
            input_mean=0.0,
            input_std=1.0,
            local_test_fraction=0.1,
            seed=0,
            validation_fraction=fraction,
        )

    site, plain = load(0.2), load(0.0)
    assert len(site.y_val) == 12 and len(site.y_local_test) == (9 if with_test else 6)
    assert site.num_examples == 60 - 12 - (0 if with_test else 6)
    rows = [r.tobytes() for x in (site.x_train, site.x_val, site.x_local_test) for r in x]
    assert len(set(rows)) == len(rows)  # disjoint (random rows are all distinct)
    np.testing.assert_array_equal(plain.x_local_test, site.x_local_test)
    np.testing.assert_array_equal(load(0.2).x_val, site.x_val)  # reproducible
    if with_test:  # nothing held out of the training data: its order is the file's
        np.testing.assert_allclose(plain.x_train[:, 0], arrays["x_train"], rtol=1e-6)


def test_both_learners_score_each_client_on_its_own_validation_slice():
    spec = load_spec(None, ["clients.num_clients=4", "data.validation_fraction=0.3"])
    data, config = federated_data(spec), cohort_config(spec)
    ids, test_idx = [0, 1, 2, 3], np.arange(40)
    states: dict[int, bytes] = {}
    loop = CohortLearner(data, config, states)
    loop.train_private(1, ids)  # trained: accuracies differ
    by_loop = loop.evaluate(ids, test_idx)
    by_vectorised = VectorisedCohortLearner(data, config, states).evaluate(ids, test_idx)
    for cid in ids:
        client = data.clients[cid]
        expected = accuracy(predict_logits(loop._load(cid).model, client.x_val), client.y_val)
        assert by_loop[cid].metrics["val_acc"] == pytest.approx(expected)
        assert by_vectorised[cid].metrics["val_acc"] == pytest.approx(expected)


# -- the round selected on validation --------------------------------------------------------------
def _rows(**columns):
    n = len(next(iter(columns.values())))
    return [{"round": i + 1, **{k: v[i] for k, v in columns.items()}} for i in range(n)]


def test_the_summary_selects_the_round_by_validation_never_by_test():
    rows = _rows(
        server_val_acc=[0.5, 0.8, None, 0.7],
        client_val_acc_mean=[0.9, 0.1, None, 0.2],
        server_test_acc=[0.6, 0.7, None, 0.9],  # test would pick round 4
        client_test_acc_mean=[0.3, 0.3, None, 0.3],
    )
    assert select_round_by_validation(rows) == {
        "best_round_by_val": 2,
        "selected_by": "server_val_acc",
        "best_val_acc": 0.8,
        "test_acc_at_best_val_round": 0.7,
        "test_acc_metric": "server_test_acc",
    }
    # Without a server validation slice: the clients' mean; without a server model, the
    # clients' test accuracy is the result. Equal scores: the earliest round.
    rows = _rows(
        server_val_acc=[None, None, None],
        client_val_acc_mean=[0.4, 0.6, 0.6],
        server_test_acc=[None, None, None],
        client_test_acc_mean=[0.9, 0.5, 0.7],
    )
    picked = select_round_by_validation(rows)
    assert picked["best_round_by_val"] == 2 and picked["selected_by"] == "client_val_acc_mean"
    assert picked["test_acc_metric"] == "client_test_acc_mean"
    assert picked["test_acc_at_best_val_round"] == 0.5
    # No validation metric at all: nothing is selected (never a fall back on test accuracy).
    none = _rows(server_val_acc=[None], client_val_acc_mean=[None], server_test_acc=[0.9])
    assert select_round_by_validation(none)["best_round_by_val"] is None
    assert select_round_by_validation(none)["test_acc_at_best_val_round"] is None


SMALL = [
    "clients.num_clients=4",
    "clients.min_clients=2",
    "rounds=2",
    "data.proxy_size=200",
    "train.epochs=1",
    "distill.epochs=1",
    "server.epochs=1",
]


@pytest.mark.parametrize(
    ("overrides", "selected_by", "test_metric"),
    [
        (["algorithm.name=feddf", "data.proxy_validation_size=50"], "server_val_acc", "server"),
        (
            ["algorithm.name=fedavg", "clients.students=cnn_small"],
            "client_val_acc_mean",
            "server",
        ),
        (["algorithm.name=local_only"], "client_val_acc_mean", "client"),
        (["algorithm.name=pate", "data.proxy_validation_size=50"], "server_val_acc", "server"),
    ],
)
def test_runs_report_validation_metrics_and_the_round_they_select(
    tmp_path, overrides, selected_by, test_metric
):
    spec = load_spec(None, SMALL + overrides)
    grid = InProcessGrid(make_client_app(spec), spec.num_nodes)
    summary = run_rounds(grid, spec, RunRecorder(tmp_path / "run", spec))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    for row in rows:
        has_server_val = spec.data.proxy_validation_size > 0
        assert (row["server_val_acc"] is not None) == has_server_val
        assert (row["client_val_acc_mean"] is not None) == (spec.algorithm.name != "pate")
        for key in ("server_val_acc", "client_val_acc_mean"):
            assert row[key] is None or 0.0 <= row[key] <= 1.0
    assert summary["selected_by"] == selected_by
    assert summary["test_acc_metric"] == f"{test_metric}_test_acc" + (
        "" if test_metric == "server" else "_mean"
    )
    best = rows[summary["best_round_by_val"] - 1]
    assert summary["best_val_acc"] == max(r[selected_by] for r in rows) == best[selected_by]
    assert summary["test_acc_at_best_val_round"] == best[summary["test_acc_metric"]]
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["best_round_by_val"] == summary["best_round_by_val"]
