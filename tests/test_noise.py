"""Where the privacy mechanisms' noise comes from: seeded (reproducible) or secure (secret).

The statistical checks draw a fixed number of values and allow 6 standard errors: a correct
source fails one of them with probability about 1e-9, a wrong one (a missing scale, a uniform
where a Gaussian belongs, a biased sampler) fails them every time.
"""

from __future__ import annotations

import json
import math
import sys
import tomllib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from torch import nn
from typer.testing import CliRunner

from fedkd import spec as spec_module
from fedkd.apps.client_app import spec_for_node
from fedkd.apps.run_config import spec_from_run_config
from fedkd.assembly import build_strategy, cohort_config, federated_data, ledger_book
from fedkd.data import load_federated_data
from fedkd.learner.cohort import ClientResult, CohortConfig, CohortLearner
from fedkd.learner.loop import OptimConfig, StepConfig, seeded_generator
from fedkd.learner.vectorised import VectorisedCohortLearner
from fedkd.privacy import noise as noise_module
from fedkd.privacy.dpsgd import DpSgdSettings, train_dpsgd
from fedkd.privacy.gaussian_release import private_sum_of_probabilities
from fedkd.privacy.label_histogram import released_label_histogram
from fedkd.privacy.noise import SecureNoise, SeededNoise
from fedkd.privacy.pate import confident_gnmax
from fedkd.privacy.vectorised_dpsgd import add_noise, poisson_plan
from fedkd.results import RunRecorder
from fedkd.run.cli import app as fedkd_cli
from fedkd.spec import SpecError, load_spec, with_noise_rng
from tests.test_engine import run_inprocess

SIGMAS = 6.0


def within(value: float, expected: float, std_error: float) -> bool:
    return abs(value - expected) <= SIGMAS * std_error


def test_the_spec_and_the_noise_module_name_the_same_sources():
    assert spec_module.NOISE_RNGS == noise_module.NOISE_RNGS


# -- the secure source's distributions ------------------------------------------------------------
def test_secure_normals_have_the_moments_of_a_standard_normal():
    n = 1_000_001  # odd: the last Box-Muller pair is cut
    z = SecureNoise().normal(n, dtype=torch.float64)
    assert z.shape == (n,) and z.dtype == torch.float64
    assert within(z.mean().item(), 0.0, 1 / math.sqrt(n))
    assert within(z.var().item(), 1.0, math.sqrt(2 / n))
    assert within((z**4).mean().item(), 3.0, math.sqrt(96 / n))  # E z^8 - (E z^4)^2 = 105 - 9
    assert within((z.abs() < 1).double().mean().item(), 0.6826895, math.sqrt(0.25 / n))
    assert SecureNoise().normal((3, 4)).dtype == torch.float32  # the default dtype


@pytest.mark.parametrize("rate", [0.03, 0.5])
def test_secure_poisson_sampling_keeps_each_example_at_the_sample_rate(rate):
    n = 1_000_000
    mask = SecureNoise().poisson_mask(n, rate)
    assert mask.dtype == torch.bool and mask.shape == (n,)
    assert within(mask.double().mean().item(), rate, math.sqrt(rate * (1 - rate) / n))


# -- every mechanism: secure noise differs run to run, seeded noise repeats ----------------------
MECHANISMS = {
    "label_histogram": lambda src: torch.from_numpy(
        released_label_histogram(np.arange(100) % 10, 10, 5.0, src)
    ),
    "gaussian_release": lambda src: private_sum_of_probabilities(
        torch.full((3, 20, 10), 0.1), 1.0, 1.0, src
    ),
    # Equal votes: every label is GNMax's noise alone.
    "confident_gnmax": lambda src: confident_gnmax(torch.zeros(200, 10), -5.0, 1.0, 1.0, src)[0],
    "dp_sgd_noise": lambda src: add_noise({"w": torch.zeros(2, 50)}, [1.0, 2.0], [src, src])["w"],
    # The rows each step sampled (its mask is all True for one client: two secure draws were
    # equal whenever their batch sizes summed alike, a few percent of runs).
    "poisson_sampling": lambda src: torch.cat(
        poisson_plan([500], [0], [0.1], [3], [src]).index, dim=1
    ),
}


@pytest.mark.parametrize("mechanism", sorted(MECHANISMS))
def test_secure_noise_differs_between_runs_of_one_seed_and_seeded_noise_repeats(mechanism):
    draw = MECHANISMS[mechanism]
    assert torch.equal(draw(seeded_generator(7)), draw(seeded_generator(7)))
    assert torch.equal(draw(SeededNoise(seeded_generator(7))), draw(seeded_generator(7)))
    assert not torch.equal(draw(SecureNoise()), draw(SecureNoise()))


def _linear_client(n: int, width: int = 200) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, width, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    return nn.Linear(width, 10), x, y


def test_opacus_path_adds_secure_noise_of_the_calibrated_scale():
    # One full-batch step (sample rate 1) from zero weights, with a clip so small that the
    # update is Opacus's noise alone: -lr * N(0, (sigma * C)^2) / expected batch size.
    model, x, y = _linear_client(200)
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    sigma, clip, lr = 1e4, 1e-6, 1.0
    settings = DpSgdSettings(max_grad_norm=clip, delta=1e-5, noise_multiplier=sigma)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    train_dpsgd(
        model, opt, x, y, epochs=1, batch_size=200, settings=settings, generator=SecureNoise()
    )
    z = -torch.cat([p.detach().flatten() for p in model.parameters()]).double()
    z = z * 200 / (lr * sigma * clip)
    n = len(z)  # 2010 coordinates
    assert within(z.mean().item(), 0.0, 1 / math.sqrt(n))
    assert within(z.var().item(), 1.0, math.sqrt(2 / n))


def _opacus_epoch(generator) -> tuple[list[int], torch.Tensor]:
    """One epoch of Opacus DP-SGD (n = 2000, rate 0.05, 20 steps): its Poisson batch sizes
    and the trained weights. torch's global generator is reset first: a draw that came from
    it (Opacus's default) would repeat."""
    torch.manual_seed(0)
    model, x, y = _linear_client(2000, width=5)
    sizes: list[int] = []
    model.register_forward_hook(lambda _m, inputs, _out: sizes.append(len(inputs[0])))
    settings = DpSgdSettings(max_grad_norm=1.0, delta=1e-5, noise_multiplier=1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train_dpsgd(model, opt, x, y, epochs=1, batch_size=100, settings=settings, generator=generator)
    return sizes, model.weight.detach().clone()


def test_opacus_path_samples_and_noises_from_the_secure_source():
    sizes, weights = _opacus_epoch(SecureNoise())
    assert len(sizes) == 20
    assert within(sum(sizes), 2000, math.sqrt(20 * 2000 * 0.05 * 0.95))
    sizes_again, weights_again = _opacus_epoch(SecureNoise())
    assert sizes != sizes_again
    assert not torch.equal(weights, weights_again)
    seeded, seeded_again = _opacus_epoch(seeded_generator(3)), _opacus_epoch(seeded_generator(3))
    assert seeded[0] == seeded_again[0] and torch.equal(seeded[1], seeded_again[1])


def _cohort_config(**kwargs) -> CohortConfig:
    return CohortConfig(
        seed=0,
        arch_of=lambda cid: "mlp",
        private=StepConfig(optim=OptimConfig()),
        distill=StepConfig(optim=OptimConfig()),
        **kwargs,
    )


@pytest.mark.parametrize("learner", [CohortLearner, VectorisedCohortLearner])
def test_both_learners_train_with_the_noise_their_config_names(learner):
    data = load_federated_data(source="digits", num_clients=3, proxy_size=50, seed=0)
    dp = DpSgdSettings(max_grad_norm=1.0, delta=1e-5, noise_multiplier=1.0)

    def logits(noise_rng: str) -> np.ndarray:
        cohort = learner(data, _cohort_config(dp=dp, noise_rng=noise_rng), {})
        cohort.train_private(1, [0, 1, 2])
        out = cohort.logits([0, 1, 2], data.proxy_x)
        return np.stack([out[c] for c in (0, 1, 2)])

    np.testing.assert_array_equal(logits("seeded"), logits("seeded"))
    assert not np.array_equal(logits("secure"), logits("secure"))


def test_a_client_draws_its_secure_histogram_once_and_resends_it():
    data = load_federated_data(source="digits", num_clients=3, proxy_size=50, seed=0)
    config = _cohort_config(label_histogram_noise=10.0, noise_rng="secure")
    released: dict[int, bytes] = {}
    first = CohortLearner(data, config, {}, released).label_histogram(1)["label_histogram"]
    # A new learner on the same node state (the next round's message) resends the release.
    again = CohortLearner(data, config, {}, released).label_histogram(1)["label_histogram"]
    np.testing.assert_array_equal(first, again)
    other_run = CohortLearner(data, config, {}).label_histogram(1)["label_histogram"]
    assert not np.array_equal(first, other_run)


def test_the_server_charges_a_redrawn_histogram_as_a_new_release():
    spec = load_spec(None, ['algorithm.teacher="class_weighted"', "privacy.histogram_noise=10"])
    strategy = build_strategy(spec, federated_data(spec))

    def charged(rnd: int, histograms: dict[int, list[float]]) -> dict[int, int]:
        updates = {
            c: ClientResult(
                arrays={"label_histogram": np.array(h, dtype=np.float32)},
                metrics={"num_examples": 10.0},
            )
            for c, h in histograms.items()
        }
        strategy._class_weights(rnd, updates)
        return {c: len(e) for c, e in strategy.one_time_events(rnd).items()}

    assert charged(1, {0: [1, 2], 1: [3, 4]}) == {0: 1, 1: 1}
    assert charged(2, {0: [1, 2], 1: [3, 4]}) == {}  # resent: post-processing, free
    # Client 1 lost its node state and drew fresh secure noise: a second release.
    assert charged(3, {0: [1, 2], 1: [5, 4]}) == {1: 1}


# -- where each default applies, and who refuses seeded noise -------------------------------------
def test_simulations_default_to_seeded_and_runs_from_the_run_config_to_secure(tmp_path):
    assert load_spec(None).privacy.noise_rng == ""
    assert load_spec(None).privacy.noise == "seeded"
    assert with_noise_rng(load_spec(None)).privacy.noise_rng == "seeded"
    RunRecorder(tmp_path / "run", load_spec(None))  # the spec as run: the choice is visible
    saved = tomllib.loads((tmp_path / "run" / "spec.toml").read_text())
    assert saved["privacy"]["noise_rng"] == "seeded"
    assert spec_from_run_config({"spec": "", "overrides": ""}).privacy.noise_rng == "secure"
    chosen = spec_from_run_config({"spec": "", "overrides": 'privacy.noise_rng="seeded"'})
    assert chosen.privacy.noise_rng == "seeded"


def test_a_bad_noise_rng_is_one_line_exit_2():
    with pytest.raises(SpecError, match="privacy.noise_rng: 'random' is not one of seeded, secure"):
        load_spec(None, ['privacy.noise_rng="random"'])
    res = CliRunner().invoke(fedkd_cli, ["run", "--set", 'privacy.noise_rng="random"'])
    assert res.exit_code == 2, res.output
    assert "privacy.noise_rng: 'random' is not one of seeded, secure" in res.output


def test_submit_refuses_seeded_noise_before_contacting_anything():
    args = ["submit", "--connection", "nowhere", "--set", 'privacy.noise_rng="seeded"']
    res = CliRunner().invoke(fedkd_cli, args)
    assert res.exit_code == 2, res.output
    assert "fedkd submit refuses 'seeded' noise" in res.output
    assert "Traceback" not in res.output


def _node_context(overrides: str) -> Context:
    return Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, "num-partitions": 1},
        state=RecordDict(),
        run_config={"spec": "", "overrides": overrides, "out-dir": ""},
    )


def test_a_deployed_node_refuses_seeded_noise_and_defaults_to_secure(monkeypatch):
    monkeypatch.delitem(sys.modules, "ray", raising=False)  # a SuperNode's process: no Ray
    seeded = _node_context('privacy.noise_rng="seeded"')
    with pytest.raises(SpecError, match="a deployed SuperNode refuses 'seeded' noise"):
        spec_for_node(seeded)
    assert spec_for_node(_node_context("")).privacy.noise_rng == "secure"
    # A node of Flower's Ray simulation engine (`flwr run` on a simulation SuperLink) may
    # simulate with seeded noise.
    monkeypatch.setitem(sys.modules, "ray", SimpleNamespace(is_initialized=lambda: True))
    assert spec_for_node(seeded).privacy.noise_rng == "seeded"


@pytest.mark.parametrize("noise_rng", ["seeded", "secure"])
def test_the_spec_choice_reaches_clients_server_and_ledgers(noise_rng):
    spec = load_spec(None, ["privacy.release_noise=1.0", f'privacy.noise_rng="{noise_rng}"'])
    strategy = build_strategy(spec, federated_data(spec))
    source = {"seeded": SeededNoise, "secure": SecureNoise}[noise_rng]
    assert isinstance(strategy._noise(1, 2), source)
    assert cohort_config(spec).noise_rng == noise_rng
    assert ledger_book(spec).to_dict()["noise_rng"] == noise_rng


# -- end to end: a DP quickstart, recorded and reported -------------------------------------------
DP_RUN = [
    "privacy.dpsgd=true",
    "privacy.noise_multiplier=1.0",
    "train.epochs=1",
    'algorithm.teacher="class_weighted"',
    "privacy.histogram_noise=20",
]


def _run(tmp_path, name: str, noise_rng: str):
    _, summary, rows, grid = run_inprocess(
        tmp_path, [*DP_RUN, f'privacy.noise_rng="{noise_rng}"'], name=name
    )
    histograms = {
        key: bytes(ctx.state[key]["blob"])
        for ctx in grid.contexts.values()
        for key in ctx.state
        if key.startswith("released.")
    }
    return summary, [r["train_loss_mean"] for r in rows], histograms


def test_dp_quickstart_with_secure_noise_runs_and_records_its_noise(tmp_path):
    secure = [_run(tmp_path, f"secure-{i}", "secure") for i in range(2)]
    seeded = [_run(tmp_path, f"seeded-{i}", "seeded") for i in range(2)]
    for summary, losses, histograms in secure + seeded:
        assert summary["status"] == "completed" and len(losses) == 2
        assert len(histograms) == 4  # each client keeps the one histogram it released
    assert seeded[0][1:] == seeded[1][1:]  # same losses, same histograms
    assert secure[0][1] != secure[1][1] and secure[0][2] != secure[1][2]
    assert secure[0][2] != seeded[0][2]

    for name, rng in (("secure-0", "secure"), ("seeded-0", "seeded")):
        run_dir = tmp_path / name
        assert json.loads((run_dir / "summary.json").read_text())["noise_rng"] == rng
        assert tomllib.loads((run_dir / "spec.toml").read_text())["privacy"]["noise_rng"] == rng
        ledgers = json.loads((run_dir / "ledgers.json").read_text())
        assert ledgers["noise_rng"] == rng and len(ledgers["ledgers"]) == 4
        res = CliRunner().invoke(
            fedkd_cli, ["report", str(run_dir), "--plot", str(tmp_path / f"{name}.png")]
        )
        assert res.exit_code == 0, res.output
        assert ("sim-only" in res.output) == (rng == "seeded"), res.output
