"""Deep mutual learning between each client's local model and its meme model (FML-style).

Federated Mutual Learning (Wu et al., 2020) gives each client two models that learn from each
other on its private data (deep mutual learning, Zhang et al., 2018): a private *local* model
and a *meme* model through which it takes part in the federation. In fedkd the federation
exchanges knowledge, not weights, so the meme model is the one whose logits on the round's
proxy inputs a client uploads and the one that distills the federation's teacher in the
digest; the local model never leaves the client and learns the federation's knowledge only
through the meme. With ``mutual_weight`` = alpha > 0 and ``mutual_meme_weight`` = beta, a
client's private training (`fedkd.learner.protocol.Learner.train_mutual`) trains both on each
minibatch: the local model with cross-entropy plus alpha times the KL divergence towards the
meme's detached softmax, the meme with cross-entropy plus beta times the KL divergence towards
the local model's.

The local model is the client's student (its architecture from ``clients.students``): it is
what the client's evaluation scores (``client_test_acc``, ``client_local_acc``), as FML reports
the local model, and what the privacy audit exports. The meme model is the learner's partner
model (`fedkd.learner.protocol.Learner.partner`), of the same architecture with its own initial
weights, kept in the client's own state and checkpointed with it. Without DP-SGD only: both
models train on the private data (the spec refuses ``privacy.dpsgd`` with it).
"""

from __future__ import annotations

from fedkd.learner.cohort import ClientResult
from fedkd.learner.protocol import Learner
from strategies.params import AlgorithmParams, TeacherParams


def learns_mutually(params: AlgorithmParams) -> bool:
    """Whether the clients keep a meme model beside their local one (``mutual_weight`` > 0)."""
    return isinstance(params, TeacherParams) and params.mutual_weight > 0


def knowledge_model(params: AlgorithmParams, learner: Learner) -> Learner:
    """The learner on the model a client uploads from and digests into: the meme model
    (`Learner.partner`) under mutual learning, else the client's student."""
    return learner.partner() if learns_mutually(params) else learner


def train_on_private_data(
    params: AlgorithmParams, learner: Learner, round_num: int, client_ids: list[int]
) -> dict[int, ClientResult]:
    """The clients' training on their private data: the local and the meme model together
    under mutual learning (`Learner.train_mutual`), else the student alone."""
    if not learns_mutually(params):
        return learner.train_private(round_num, client_ids)
    assert isinstance(params, TeacherParams)
    return learner.train_mutual(
        round_num, client_ids, params.mutual_weight, params.mutual_meme_weight
    )
