"""The client-state byte format (`fedkd.learner.state_codec`): round trips and refusals."""

import datetime
import io
import pickle

import pytest
import torch

from fedkd.data import load_federated_data
from fedkd.learner.cohort import CohortConfig
from fedkd.learner.loop import ClientState, OptimConfig, StepConfig
from fedkd.learner.state_codec import (
    SavedClientState,
    decode_client_state,
    decode_teachers,
    encode_client_state,
    encode_teachers,
)
from fedkd.learner.vectorised import VectorisedCohortLearner

ADAM = OptimConfig(optimizer="adam", lr=1e-3)


def trained_state(steps: int = 3) -> ClientState:
    """An mlp client whose private Adam optimizer has taken `steps` steps (moments present)."""
    state = ClientState.create(5, "mlp", (1, 8, 8), 10, 0, ADAM, OptimConfig())
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(4, 1, 8, 8, generator=gen)
        y = torch.randint(0, 10, (4,), generator=gen)
        state.private_opt.zero_grad()
        torch.nn.functional.cross_entropy(state.model(x), y).backward()
        state.private_opt.step()
    state.rounds_trained, state.dp_steps = 2, 7
    return state


def test_a_state_with_adam_moments_round_trips():
    state = trained_state()
    saved = decode_client_state(state.to_bytes())
    assert (saved.client_id, saved.arch, saved.rounds_trained, saved.dp_steps) == (5, "mlp", 2, 7)
    for name, value in state.model.state_dict().items():
        assert torch.equal(saved.model[name], value)
    theirs = state.private_opt.state_dict()
    assert saved.private_opt["param_groups"] == theirs["param_groups"]
    assert set(saved.private_opt["state"]) == set(theirs["state"])
    for i, entry in theirs["state"].items():
        assert float(saved.private_opt["state"][i]["step"]) == 3.0
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(saved.private_opt["state"][i][key], entry[key])
    assert saved.distill_opt["state"] == {}  # never distilled

    # Loading the bytes into a fresh client restores the same student and optimizer.
    again = ClientState.create(5, "mlp", (1, 8, 8), 10, 1, ADAM, OptimConfig())
    again.load_bytes(state.to_bytes())
    assert again.to_bytes() == state.to_bytes()


def test_a_fresh_decode_owns_its_tensors_and_a_shared_one_is_cached():
    blob = trained_state().to_bytes()
    first = decode_client_state(blob)
    first.private_opt["state"][0]["exp_avg"].add_(1.0)  # what an optimizer step does in place
    second = decode_client_state(blob)
    assert not torch.equal(
        first.private_opt["state"][0]["exp_avg"], second.private_opt["state"][0]["exp_avg"]
    )
    shared = decode_client_state(blob, shared=True)
    assert decode_client_state(bytes(blob), shared=True) is shared  # equal bytes: one decode
    assert decode_client_state(blob) is not shared


def test_the_vectorised_learner_writes_the_same_format():
    """Both learners write through the codec: the vectorised learner's bytes decode to the
    same fields, with the state remembered for its own next (shared) read."""
    data = load_federated_data(source="digits", num_clients=2, proxy_size=50, seed=0)
    cfg = CohortConfig(
        seed=0, arch_of=lambda cid: "mlp", private=StepConfig(optim=ADAM), distill=StepConfig()
    )
    states: dict[int, bytes] = {}
    VectorisedCohortLearner(data, cfg, states).train_private(1, [1])
    saved = decode_client_state(states[1], shared=True)
    assert isinstance(saved, SavedClientState)
    assert (saved.client_id, saved.arch, saved.rounds_trained) == (1, "mlp", 1)
    assert all(float(e["step"]) > 0 for e in saved.private_opt["state"].values())
    assert decode_client_state(states[1], shared=True) is saved


def test_a_blob_holding_anything_else_is_refused():
    buf = io.BytesIO()
    torch.save({"model": {"w": torch.ones(2)}, "when": datetime.date(2020, 1, 1)}, buf)
    with pytest.raises(pickle.UnpicklingError, match="never holds 'datetime.date'"):
        decode_client_state(buf.getvalue())
    with pytest.raises(pickle.UnpicklingError, match="never holds 'datetime.date'"):
        decode_client_state(buf.getvalue(), shared=True)
    other = io.BytesIO()
    torch.save({"model": {"w": torch.ones(2)}}, other)
    with pytest.raises(ValueError, match="not a client state"):
        decode_client_state(other.getvalue())
    # A PATE client's teachers are their own format: neither is read as the other.
    teachers = encode_teachers([{"model": {"w": torch.ones(2)}, "opt": {"state": {}}}])
    assert torch.equal(decode_teachers(teachers)[0]["model"]["w"], torch.ones(2))
    with pytest.raises(ValueError, match="not a client state"):
        decode_client_state(teachers)
    with pytest.raises(ValueError, match="not a PATE client's teachers"):
        decode_teachers(encode_client_state(SavedClientState(0, "mlp", {}, {}, {})))
