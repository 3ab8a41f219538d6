"""What a Byzantine client sends instead of its honest logits, or the labels it trains on.

Every logit attack is computed from the client's own honest upload (and, for ``random``, a
seeded draw): a Byzantine client in a simulation knows no other client's data, and what it
sends stays post-processing of its own student's outputs, so the privacy accounting is
unchanged. The attacks, on an upload of shape ``(N, C)`` (N inputs, C classes):

- ``random``: Gaussian logits with the mean and standard deviation of the honest upload.
- ``invert``: the negated logits (the least likely class becomes the most likely).
- ``loss_max``: every input is labelled with the class the client's own student finds least
  likely, at the upload's own scale (in the spirit of the Loss Maximization attack of Roux et
  al., ICLR 2025, whose attackers know the honest clients' mean prediction).
- ``class_prior``: every input is labelled with the class least similar to its predicted
  class, by a class similarity estimated from the client's own predictions (in the spirit of
  their Class Prior attack, which takes the similarity and the prediction from the honest
  clients' mean: a client here knows only its own).
- ``top_k``: within each input's k most likely classes the logit values rotate by one place,
  so the k-th class wins and the ranking below k is unchanged (in the spirit of FedTGD's top-k
  attack, ICDCS 2024).
- ``label_flip``: the client trains honestly on flipped private labels, ``y -> (y + 1) % C``
  (`with_flipped_labels`); its upload is not edited.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fedkd.data.splits import FederatedData
from fedkd.faults.draws import PHASE_FAULTS, STREAM_ATTACK
from fedkd.learner.loop import derive_seed

# Attacks that edit the upload, and the one that poisons the private labels instead.
LOGIT_ATTACKS: tuple[str, ...] = ("random", "invert", "loss_max", "class_prior", "top_k")
ATTACKS: tuple[str, ...] = (*LOGIT_ATTACKS, "label_flip")


def _labelled_at_scale(logits: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Each row's own largest logit on its `target` class and its smallest everywhere else: a
    confident label at the scale the client's uploads have."""
    out = np.repeat(logits.min(axis=1, keepdims=True), logits.shape[1], axis=1)
    out[np.arange(len(logits)), target] = logits.max(axis=1)
    return out


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def _least_similar(logits: np.ndarray) -> np.ndarray:
    """Per row, the class least similar to the predicted one: the similarity of classes c and j
    is the mean probability of j over the rows predicted as c (all rows where none is)."""
    probs = _softmax(logits.astype(np.float64))
    pred = probs.argmax(axis=1)
    num_classes = logits.shape[1]
    similarity = np.repeat(probs.mean(axis=0, keepdims=True), num_classes, axis=0)
    for cls in np.unique(pred):
        similarity[cls] = probs[pred == cls].mean(axis=0)
    np.fill_diagonal(similarity, np.inf)
    return similarity.argmin(axis=1)[pred]


def _rotate_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    k = min(k, logits.shape[1])
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    rows = np.arange(len(logits))[:, None]
    values = logits[rows, order]
    out = logits.copy()
    out[rows, np.roll(order, 1, axis=1)] = values  # the k-th class takes the top value
    return out


# The uploads a logit attack can edit, in the order it looks for them.
ATTACKABLE_UPLOADS = ("logits", "class_logits")


def attacked_upload(uploads: tuple[str, ...]) -> str | None:
    """The name of the array a logit attack edits among an algorithm's `uploads` (its
    `Capabilities.uploads`), or None if it sends none of `ATTACKABLE_UPLOADS`."""
    return next((name for name in ATTACKABLE_UPLOADS if name in uploads), None)


def attack_upload(
    attack: str, logits: np.ndarray, seed: int, round_num: int, client_id: int, top_k: int = 2
) -> np.ndarray:
    """The upload a Byzantine client sends in place of its honest `logits`.

    Parameters
    ----------
    attack : str
        One of `LOGIT_ATTACKS` (see the module's docstring).
    logits : np.ndarray
        The honest upload, shape ``(N, C)``: logits on proxy inputs, or per-class logits.
    seed, round_num, client_id : int
        Seed the ``random`` attack's draw (the same run gives the same attack).
    top_k : int, default 2
        The ``top_k`` attack's k (>= 2).

    Returns
    -------
    np.ndarray
        The attacked upload, same shape and dtype.
    """
    x = np.asarray(logits)
    if attack == "random":
        rng = np.random.default_rng(
            derive_seed(seed, round_num, PHASE_FAULTS, STREAM_ATTACK, client_id)
        )
        out = rng.normal(float(x.mean()), float(x.std()), x.shape)
    elif attack == "invert":
        out = -x
    elif attack == "loss_max":
        out = _labelled_at_scale(x, x.argmin(axis=1))
    elif attack == "class_prior":
        out = _labelled_at_scale(x, _least_similar(x))
    elif attack == "top_k":
        out = _rotate_top_k(x, top_k)
    else:
        raise ValueError(f"unknown logit attack {attack!r}; choose one of {LOGIT_ATTACKS}")
    return np.asarray(out, dtype=x.dtype)


def flip_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``label_flip``'s labels: every class replaced by the next, ``y -> (y + 1) % C``."""
    return ((labels.astype(np.int64) + 1) % num_classes).astype(labels.dtype)


_FLIPPED: dict[tuple[int, tuple[int, ...]], tuple[FederatedData, FederatedData]] = {}


def with_flipped_labels(data: FederatedData, client_ids: list[int]) -> FederatedData:
    """The run's data with `client_ids`' private training labels flipped (`flip_labels`).

    Only the training labels: the clients' held-out and validation slices keep their true
    labels, so their local accuracy says what the poisoning did. Cached per process (the
    learner asks for the run's data every round).

    Parameters
    ----------
    data : FederatedData
        The run's data (treated as read-only).
    client_ids : list of int
        The Byzantine clients.

    Returns
    -------
    FederatedData
        A copy sharing every array except those clients' training labels.
    """
    key = (id(data), tuple(client_ids))
    hit = _FLIPPED.get(key)
    if hit is not None and hit[0] is data:
        return hit[1]
    clients = list(data.clients)
    for cid in client_ids:
        clients[cid] = clients[cid].replaced(
            y_train=flip_labels(clients[cid].y_train, data.num_classes)
        )
    flipped = dataclasses.replace(data, clients=clients)
    _FLIPPED[key] = (data, flipped)
    return flipped
