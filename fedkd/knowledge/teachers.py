"""Teacher builders: combine the clients' logits on the proxy set into one ensemble teacher.

Conventions
-----------
- Client outputs come stacked as ``logits`` of shape ``(K, N, C)``: K clients, N proxy examples,
  C classes. Optional ``weights`` of shape ``(K,)`` (e.g. example counts) or, per example,
  ``(K, N)`` (confidence weights, `client_confidence`) are non-negative and normalised inside
  (over the clients, per example).
- Every builder returns **teacher logits** of shape ``(N, C)``. Builders that work in probability
  space return the log of the probabilities, which are valid logits:
  ``softmax(log p) == p``.
- Non-finite client logits are rejected with a ``ValueError`` naming the clients, so that a NaN
  from one client never silently poisons the teacher.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

TEACHER_KINDS: tuple[str, ...] = (
    "mean_logits",
    "mean_probs",
    "weighted",
    "era",
    "median",
    "trimmed_mean",
    "class_weighted",
    "pooled_likelihood",
)
# Teachers that weigh clients per class by their label histograms (weights of shape (K, C)).
HISTOGRAM_TEACHERS: tuple[str, ...] = ("class_weighted", "pooled_likelihood")
# How sure each client is of each input (`client_confidence`), multiplied into its weight on
# that input by `build_teacher`'s ``confidence``; "none" leaves the teacher as it was.
CONFIDENCE_KINDS: tuple[str, ...] = ("none", "negative_entropy", "max_prob")
# Teachers that take those per-example weights (the robust and pooled ones weigh no examples).
CONFIDENCE_TEACHERS: tuple[str, ...] = (
    "mean_logits",
    "mean_probs",
    "weighted",
    "era",
    "class_weighted",
)


def _check_logits(logits: Tensor) -> None:
    if logits.dim() != 3:
        raise ValueError(
            f"client logits must be stacked as (K clients, N examples, C classes), "
            f"got shape {tuple(logits.shape)}"
        )
    if logits.shape[0] < 1:
        raise ValueError("client logits must hold at least one client (K >= 1)")
    finite = torch.isfinite(logits).flatten(1).all(dim=1)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).flatten().tolist()
        raise ValueError(f"client logits contain NaN or inf for client index(es) {bad}")


def _normalised_weights(weights: Tensor | None, logits: Tensor) -> Tensor | None:
    """``weights`` normalised over the clients, on ``logits``' device and dtype: a probability
    vector of shape ``(K,)``, or of shape ``(K, N)`` with every column summing to 1."""
    if weights is None:
        return None
    k, n = logits.shape[:2]
    w = torch.as_tensor(weights).to(device=logits.device, dtype=logits.dtype)
    if w.shape not in ((k,), (k, n)):
        raise ValueError(
            f"weights must have shape ({k},) for {k} clients, or ({k}, {n}) per example, "
            f"got {tuple(w.shape)}"
        )
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError(f"weights must be finite and non-negative, got {w.tolist()}")
    total = w.sum(dim=0)
    if not bool((total > 0).all()):
        raise ValueError("weights must not all be zero")
    return w / total


def client_confidence(logits: Tensor, kind: str) -> Tensor:
    """How sure each client is of each input, from its own softmax: a weight in ``[1/C, 1]``.

    A client that never saw an input's class has nothing to recognise it by, and tends to
    spread its probability (where it does not, the weight cannot tell; the histogram teachers
    can). Either score depends on the client's logits alone, which the server already holds.

    Parameters
    ----------
    logits : Tensor
        Shape ``(K, N, C)``.
    kind : {"negative_entropy", "max_prob"}
        ``"negative_entropy"``: ``exp(-H(p))``, the exponential of the negative entropy of the
        client's probabilities (1 for a one-hot prediction, ``1/C`` for a uniform one);
        ``"max_prob"``: its largest probability.

    Returns
    -------
    Tensor
        Shape ``(K, N)``, positive.
    """
    _check_logits(logits)
    log_p = torch.log_softmax(logits, dim=-1)
    if kind == "negative_entropy":
        return torch.exp((log_p.exp() * log_p).sum(dim=-1))
    if kind == "max_prob":
        return log_p.max(dim=-1).values.exp()
    raise ValueError(
        f"unknown confidence kind {kind!r}; choose one of {', '.join(CONFIDENCE_KINDS[1:])}"
    )


def mean_logits(logits: Tensor, weights: Tensor | None = None) -> Tensor:
    """(Weighted) mean of the clients' logits.

    Parameters
    ----------
    logits : Tensor
        Shape ``(K, N, C)``.
    weights : Tensor, optional
        Shape ``(K,)`` or, per example, ``(K, N)``; non-negative; uniform when omitted.

    Returns
    -------
    Tensor
        Teacher logits, shape ``(N, C)``.
    """
    _check_logits(logits)
    w = _normalised_weights(weights, logits)
    if w is None:
        return logits.mean(dim=0)
    if w.dim() == 2:
        return torch.einsum("kn,knc->nc", w, logits)
    return torch.einsum("k,knc->nc", w, logits)


def mean_probs(logits: Tensor, weights: Tensor | None = None) -> Tensor:
    """Log of the (weighted) mean of the clients' softmax probabilities.

    Parameters
    ----------
    logits : Tensor
        Shape ``(K, N, C)``.
    weights : Tensor, optional
        Shape ``(K,)`` or, per example, ``(K, N)``; non-negative; uniform when omitted.

    Returns
    -------
    Tensor
        Teacher logits ``log(sum_k w_k softmax(logits_k))``, shape ``(N, C)``.
    """
    _check_logits(logits)
    k = logits.shape[0]
    w = _normalised_weights(weights, logits)
    if w is None:
        w = torch.full((k,), 1.0 / k, device=logits.device, dtype=logits.dtype)
    # Mixing in log space keeps tiny probabilities representable; zero weights give log 0 =
    # -inf terms that logsumexp drops exactly.
    log_w = torch.log(w)[:, None, None] if w.dim() == 1 else torch.log(w)[:, :, None]
    log_p = torch.log_softmax(logits, dim=-1) + log_w
    return torch.logsumexp(log_p, dim=0)


def era(logits: Tensor, temperature: float = 0.1, weights: Tensor | None = None) -> Tensor:
    """DS-FL Entropy Reduction Aggregation: ``softmax(p_mean / temperature)``, as logits.

    ``p_mean`` is the (weighted) mean of the clients' probabilities. The temperature divides
    probabilities, not logits, so ``temperature < 1`` sharpens an averaged, hence flattened,
    ensemble; the argmax never changes.

    Parameters
    ----------
    logits : Tensor
        Shape ``(K, N, C)``.
    temperature : float, default 0.1
        Positive; DS-FL uses 0.1.
    weights : Tensor, optional
        Shape ``(K,)`` or, per example, ``(K, N)``; non-negative; uniform when omitted. The
        sharpening applies to the weighted mean.

    Returns
    -------
    Tensor
        Teacher logits ``log_softmax(p_mean / temperature)``, shape ``(N, C)``.

    Notes
    -----
    ERA sharpens on average, not row by row: ``softmax(p / T)`` floors every class at
    ``exp(0)``, so near-zero tail classes are lifted. A confident, agreeing ensemble comes out
    much sharper, but a row whose mass sits on a few tied classes over an empty tail comes out
    softer, and the largest probability ERA can give is ``e^(1/T) / (e^(1/T) + C - 1)`` (about
    0.9996 for ``T = 0.1`` and ten classes). On random logits from disagreeing clients a large
    share of rows does not get sharper at all.
    """
    t = float(temperature)
    if not t > 0.0:
        raise ValueError(f"era temperature must be positive, got {temperature}")
    p_mean = torch.exp(mean_probs(logits, weights))
    return torch.log_softmax(p_mean / t, dim=-1)


def class_weighted_probs(
    logits: Tensor, class_weights: Tensor, example_weights: Tensor | None = None
) -> Tensor:
    """Each class's probability from the clients that hold that class (for label skew).

    Under label skew a client confidently predicts its own classes on inputs of classes it has
    never seen; a plain average over clients lets those votes drown the few clients that know
    the class. Here class c's score is the mean of the clients' ``softmax(logits_k)[:, c]``
    weighted by their counts of class c (e.g. released label histograms); the scores are then
    renormalised per example. A class no client holds takes the unweighted mean.

    Parameters
    ----------
    logits : Tensor
        Shape ``(K, N, C)``.
    class_weights : Tensor
        Shape ``(K, C)``, finite; negative entries (noisy counts) count as 0.
    example_weights : Tensor, optional
        Shape ``(K, N)``, positive (`client_confidence`): client k's weight on class c of input
        n is ``class_weights[k, c] * example_weights[k, n]``, renormalised over the clients; a
        class no client holds is weighted by ``example_weights`` alone.

    Returns
    -------
    Tensor
        Teacher logits (log-probabilities), shape ``(N, C)``.
    """
    _check_logits(logits)
    k, _, c = logits.shape
    w = torch.as_tensor(class_weights).to(device=logits.device, dtype=logits.dtype)
    if w.shape != (k, c):
        raise ValueError(f"class_weights must have shape ({k}, {c}), got {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("class_weights must be finite")
    w = w.clamp(min=0)
    if example_weights is not None:
        e = _normalised_weights(example_weights, logits)
        if e is None or e.dim() != 2:
            raise ValueError(f"example_weights must have shape ({k}, {logits.shape[1]})")
        w = w[:, None, :] * e[:, :, None]  # (K, N, C)
        total = w.sum(dim=0)
        w = torch.where(total > 0, w / total.clamp(min=1e-12), e[:, :, None].expand_as(w))
        scores = (w * torch.softmax(logits, dim=-1)).sum(dim=0)
        return torch.log(scores / scores.sum(dim=1, keepdim=True))
    total = w.sum(dim=0)
    w = torch.where(total > 0, w / total.clamp(min=1e-12), torch.full_like(w, 1.0 / k))
    scores = torch.einsum("kc,knc->nc", w, torch.softmax(logits, dim=-1))
    return torch.log(scores / scores.sum(dim=1, keepdim=True))


def pooled_likelihood(logits: Tensor, class_counts: Tensor, held_count: float = 100.0) -> Tensor:
    """Pool the clients' evidence per class as likelihoods, corrected for their label priors.

    Under label skew the clients share the class-conditionals p(x | c) and differ in their
    label priors pi_k(c). A client's softmax on a class it holds is then
    ``log p_k(c | x) = log p(x | c) + log pi_k(c) - log Z_k(x)``: up to a per-client,
    per-input offset, ``log p_k(c | x) - log pi_k(c)`` measures the class's likelihood. For every
    input the server fits the class log-likelihoods ``l_c(x)`` and client offsets ``b_k(x)`` to
    these values by least squares over the (client, held class) pairs, each weighted by the
    square root of the client's count of that class, and returns ``softmax(l(x) + log pi(c))``
    with the pooled prior pi. Square root, not the count itself: a client's error on its own
    classes is mostly its model's bias (DP noise, few classes), which more data of one class does
    not shrink, so count weights let one large client outvote the rest. Unlike
    `class_weighted_probs`, a client's confident vote for one of its own classes on an input of
    a class it never saw is not averaged in as is: it only says that class is likelier than the
    client's other classes, and the clients holding the input's class outweigh it. The
    weighting is fixed by the counts, so one pseudo-inverse serves every input
    (minimum-norm: exact for connected supports, deterministic otherwise).

    Parameters
    ----------
    logits : Tensor
        Shape ``(K, N, C)``.
    class_counts : Tensor
        Shape ``(K, C)``, finite; the clients' (possibly noisy) label counts. Negative entries
        count as 0.
    held_count : float, default 100.0
        A client holds class c when its count of c is above this; only held classes enter the
        fit (a client's log-probability on a class it barely saw is noise). With noisy counts,
        about twice the noise std.

    Returns
    -------
    Tensor
        Teacher logits (log-probabilities), shape ``(N, C)``; a class no client holds gets
        probability 0, and if no client holds any class the plain probability mean is returned.
    """
    _check_logits(logits)
    k, n, c = logits.shape
    counts = torch.as_tensor(class_counts).to(dtype=torch.float64, device=logits.device)
    if counts.shape != (k, c):
        raise ValueError(f"class_counts must have shape ({k}, {c}), got {tuple(counts.shape)}")
    if not bool(torch.isfinite(counts).all()):
        raise ValueError("class_counts must be finite")
    counts = counts.clamp(min=0)
    held = counts > held_count
    if not held.any():
        return mean_probs(logits)
    client_k, class_c = held.nonzero(as_tuple=True)  # one row of the fit per held pair
    prior_k = counts / counts.sum(dim=1, keepdim=True).clamp(min=1e-12)
    log_p = torch.log_softmax(logits.to(torch.float64), dim=-1)
    target = log_p[client_k, :, class_c] - torch.log(prior_k[client_k, class_c])[:, None]
    # target[row] = l_{class_c[row]} - b_{client_k[row]}: design matrix over (l, b).
    rows = torch.arange(len(client_k), device=logits.device)
    design = torch.zeros(len(client_k), c + k, dtype=torch.float64, device=logits.device)
    design[rows, class_c] = 1.0
    design[rows, c + client_k] = -1.0
    row_weight = counts[client_k, class_c].sqrt()
    sqrt_w = row_weight.sqrt()[:, None]  # weighted least squares scales rows by sqrt(weight)
    solution = torch.linalg.pinv(design * sqrt_w) @ (target * sqrt_w)  # (C + K, N)
    log_lik = solution[:c].T
    pooled_prior = counts.sum(dim=0) / counts.sum()
    scores = log_lik + torch.log(pooled_prior)
    scores = scores.masked_fill(~held.any(dim=0), float("-inf"))
    return torch.log_softmax(scores, dim=1).to(logits.dtype)


def match_class_prior(
    teacher_logits: Tensor, prior: Tensor, iterations: int = 200, tolerance: float = 1e-6
) -> Tensor:
    """Rescale a teacher's class probabilities so that their totals over the inputs follow a
    known class prior (Sinkhorn-Knopp: alternately scale each class, then renormalise each input).

    A teacher from label-skewed clients can be biased towards one class on the inputs of two
    classes that no client holds together (it calls most inputs of both the one class). When
    the proxy set is drawn like the private data, its class totals should follow the pooled
    label prior; scaling each class by one factor keeps the ranking of inputs within the class
    and moves the inputs the teacher hesitated on to their next likeliest class.
    Post-processing of the teacher and of the prior's source (released label histograms): no
    privacy cost.

    Parameters
    ----------
    teacher_logits : Tensor
        Shape ``(N, C)``; log-probabilities or logits (a softmax is taken).
    prior : Tensor
        Shape ``(C,)``, non-negative with a positive sum; normalised here. Classes the teacher
        gives probability 0 on every input (e.g. held by no client) are left out and the rest of
        the prior renormalised (each kept class at least 1e-9 of it).
    iterations : int, default 200
        Most scaling sweeps.
    tolerance : float, default 1e-6
        Stop when every class total is within this fraction of ``N`` of its target.

    Returns
    -------
    Tensor
        Teacher logits (log-probabilities), shape ``(N, C)``, of the input's dtype.
    """
    if teacher_logits.dim() != 2:
        raise ValueError(
            f"teacher_logits must have shape (N, C), got {tuple(teacher_logits.shape)}"
        )
    n, c = teacher_logits.shape
    prior = torch.as_tensor(prior).to(dtype=torch.float64, device=teacher_logits.device)
    if prior.shape != (c,):
        raise ValueError(f"prior must have shape ({c},), got {tuple(prior.shape)}")
    if not bool(torch.isfinite(prior).all()) or bool((prior < 0).any()) or prior.sum() <= 0:
        raise ValueError("prior must be finite and non-negative with a positive sum")
    probs = torch.softmax(teacher_logits.to(torch.float64), dim=1)
    # A class the teacher can predict keeps a floor of target mass, so no input loses all of it.
    reachable = probs.sum(dim=0) > 0
    target = torch.where(reachable, prior.clamp(min=1e-9 * float(prior.sum())), 0.0)
    target = n * target / target.sum()
    for _ in range(iterations):
        totals = probs.sum(dim=0)
        if bool(((totals - target).abs() <= tolerance * n).all()):
            break
        probs = probs * torch.where(reachable, target / totals.clamp(min=1e-300), 0.0)
        probs = probs / probs.sum(dim=1, keepdim=True)
    return torch.log(probs).to(teacher_logits.dtype)


def median_logits(logits: Tensor) -> Tensor:
    """Coordinate-wise median of the clients' logits.

    For an even number of clients the two middle values are averaged (``torch.median`` would
    return the lower one, biasing the teacher downwards).

    Parameters
    ----------
    logits : Tensor
        Shape ``(K, N, C)``.

    Returns
    -------
    Tensor
        Teacher logits, shape ``(N, C)``.
    """
    _check_logits(logits)
    k = logits.shape[0]
    ordered = logits.sort(dim=0).values
    if k % 2 == 1:
        return ordered[k // 2]
    return 0.5 * (ordered[k // 2 - 1] + ordered[k // 2])


def trimmed_mean_logits(logits: Tensor, trim_fraction: float = 0.2) -> Tensor:
    """Coordinate-wise trimmed mean of the clients' logits.

    Per coordinate, the ``floor(trim_fraction * K)`` largest and as many smallest values are
    dropped and the rest averaged. With too few clients to trim anything this is the plain mean.

    Parameters
    ----------
    logits : Tensor
        Shape ``(K, N, C)``.
    trim_fraction : float, default 0.2
        Fraction trimmed at *each* end, in ``[0, 0.5)``.

    Returns
    -------
    Tensor
        Teacher logits, shape ``(N, C)``.
    """
    f = float(trim_fraction)
    if not 0.0 <= f < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    _check_logits(logits)
    k = logits.shape[0]
    # The epsilon stops float error (0.29 * 100 = 28.999...) from trimming one client too few.
    n_trim = math.floor(f * k + 1e-9)
    if n_trim == 0:
        return logits.mean(dim=0)
    ordered = logits.sort(dim=0).values
    return ordered[n_trim : k - n_trim].mean(dim=0)


def build_teacher(
    kind: str,
    logits: Tensor,
    weights: Tensor | None = None,
    *,
    era_temperature: float = 0.1,
    trim_fraction: float = 0.2,
    held_count: float = 100.0,
    confidence: str = "none",
    prior_agreement: bool = False,
) -> Tensor:
    """Build a teacher of the given kind from stacked client logits.

    Parameters
    ----------
    kind : str
        One of :data:`TEACHER_KINDS`: ``"mean_logits"``, ``"mean_probs"``, ``"weighted"``
        (``mean_probs`` with ``weights``, which are then required), ``"era"``, ``"median"``,
        ``"trimmed_mean"``, ``"class_weighted"`` (:func:`class_weighted_probs`) and
        ``"pooled_likelihood"`` (:func:`pooled_likelihood`), both with ``weights`` of shape
        ``(K, C)``. The robust kinds (``"median"``, ``"trimmed_mean"``) are unweighted and
        ignore ``weights``.
    logits : Tensor
        Shape ``(K, N, C)``.
    weights : Tensor, optional
        Shape ``(K,)``, e.g. the clients' example counts; ``(K, C)`` (label counts) for
        :data:`HISTOGRAM_TEACHERS`.
    era_temperature : float, default 0.1
        Temperature of ``"era"``.
    trim_fraction : float, default 0.2
        Fraction trimmed at each end by ``"trimmed_mean"``.
    held_count : float, default 100.0
        ``"pooled_likelihood"``: counts above this mean a client holds the class.
    confidence : str, default "none"
        One of :data:`CONFIDENCE_KINDS`: other than ``"none"``, each client's weight on each
        input is multiplied by its confidence there (:func:`client_confidence`), then
        normalised over the clients per input; for the :data:`CONFIDENCE_TEACHERS` only.
        ``"era"`` sharpens the weighted mean.
    prior_agreement : bool, default False
        ``"class_weighted"`` only: multiply each client's weight on each input by the
        agreement of the ensemble's prediction there with its label histogram
        (:func:`histogram_agreement`), after the confidence.

    Returns
    -------
    Tensor
        Teacher logits, shape ``(N, C)``.

    Raises
    ------
    ValueError
        Unknown ``kind``, ``"weighted"`` without weights, a confidence the teacher does not
        take, or invalid inputs.
    """
    if confidence != "none" or prior_agreement:
        return _per_example_weighted(
            kind, logits, weights, confidence, prior_agreement, era_temperature
        )
    if kind == "mean_logits":
        return mean_logits(logits, weights)
    if kind == "mean_probs":
        return mean_probs(logits, weights)
    if kind == "weighted":
        if weights is None:
            raise ValueError("teacher 'weighted' needs per-client weights (e.g. example counts)")
        return mean_probs(logits, weights)
    if kind == "era":
        return era(logits, era_temperature, weights)
    if kind == "median":
        return median_logits(logits)
    if kind == "trimmed_mean":
        return trimmed_mean_logits(logits, trim_fraction)
    if kind in HISTOGRAM_TEACHERS:
        _check_logits(logits)
        if weights is None or weights.dim() != 2:
            raise ValueError(f"teacher '{kind}' needs per-client class counts, shape (K, C)")
        if kind == "class_weighted":
            return class_weighted_probs(logits, weights)
        return pooled_likelihood(logits, weights, held_count)
    raise ValueError(f"unknown teacher kind {kind!r}; choose one of {', '.join(TEACHER_KINDS)}")


def confidence_weights(logits: Tensor, confidence: str, weights: Tensor | None = None) -> Tensor:
    """Per-example client weights: each client's base weight times its confidence on the input
    (:func:`client_confidence`), normalised over the clients.

    Parameters
    ----------
    logits : Tensor
        Shape ``(K, N, C)``.
    confidence : {"negative_entropy", "max_prob"}
        The confidence score.
    weights : Tensor, optional
        Shape ``(K,)`` (e.g. example counts) or ``(K, N)``, non-negative; uniform when omitted.

    Returns
    -------
    Tensor
        Shape ``(K, N)``, non-negative, every column summing to 1.
    """
    conf = client_confidence(logits, confidence)
    base = _normalised_weights(weights, logits)
    if base is not None:
        conf = conf * (base if base.dim() == 2 else base[:, None])
    return _normalised_weights(conf, logits)


def histogram_agreement(logits: Tensor, class_counts: Tensor, example_weights: Tensor) -> Tensor:
    """How much each input's likely class is one its client holds: per-example client weights
    from the agreement of the ensemble's prediction with each client's label histogram.

    A client's vote on an input of a class it never held is a guess, however sure it is. With
    ``q`` the class-weighted teacher of the clients (:func:`class_weighted_probs` with
    `example_weights`) and ``s_k(c)`` client k's count of class c over its largest count, client
    k's agreement on input n is ``sum_c q(c | x_n) s_k(c)``: near 1 where the ensemble thinks the
    input is of one of the client's main classes, near 0 where it thinks it is of a class the
    client never held. Post-processing of the logits and the released histograms.

    Parameters
    ----------
    logits : Tensor
        Shape ``(K, N, C)``.
    class_counts : Tensor
        Shape ``(K, C)``, finite; the clients' (possibly noisy) label counts, negative entries
        count as 0.
    example_weights : Tensor
        Shape ``(K, N)``, positive: the clients' weights in ``q``.

    Returns
    -------
    Tensor
        Shape ``(K, N)``, in ``[0, 1]``; a client with no positive count gets 0 everywhere.
    """
    q = torch.exp(class_weighted_probs(logits, class_counts, example_weights))
    counts = torch.as_tensor(class_counts).to(device=logits.device, dtype=logits.dtype)
    counts = counts.clamp(min=0)
    share = counts / counts.max(dim=1, keepdim=True).values.clamp(min=1e-12)
    return torch.einsum("nc,kc->kn", q, share)


def _per_example_weighted(
    kind: str,
    logits: Tensor,
    weights: Tensor | None,
    confidence: str,
    agreement: bool,
    era_temperature: float,
) -> Tensor:
    """`build_teacher` with per-example weights: the base weights times the confidence, times
    the agreement with the label histograms (``class_weighted`` only)."""
    if kind not in CONFIDENCE_TEACHERS:
        raise ValueError(
            f"teacher '{kind}' takes no per-example weights; confidence and prior agreement "
            f"need one of {', '.join(CONFIDENCE_TEACHERS)}"
        )
    if kind == "weighted" and weights is None:
        raise ValueError("teacher 'weighted' needs per-client weights (e.g. example counts)")
    if kind == "class_weighted":
        if weights is None or weights.dim() != 2:
            raise ValueError(f"teacher '{kind}' needs per-client class counts, shape (K, C)")
        if confidence == "none":
            example = torch.ones(logits.shape[:2], dtype=logits.dtype, device=logits.device)
        else:
            example = confidence_weights(logits, confidence)
        if agreement:
            # Clients that hold no likely class of an input keep a sliver of weight there, so
            # that an input no client agrees on falls back to the confidence weights.
            example = example * histogram_agreement(logits, weights, example).clamp(min=1e-6)
        return class_weighted_probs(logits, weights, example)
    if agreement:
        raise ValueError(
            f"prior agreement needs the clients' label histograms: teacher 'class_weighted', "
            f"not '{kind}'"
        )
    per_example = confidence_weights(logits, confidence, weights)
    return build_teacher(kind, logits, per_example, era_temperature=era_temperature)


def per_class_mean_logits(
    logits: Tensor, labels: Tensor, num_classes: int
) -> tuple[Tensor, Tensor]:
    """Federated Distillation (FD) client step: average logit vector per true class.

    Parameters
    ----------
    logits : Tensor
        Shape ``(N, C)``, one client's logits on its own labelled data.
    labels : Tensor
        Shape ``(N,)``, integer labels in ``[0, num_classes)``.
    num_classes : int
        Number of classes (rows of the result).

    Returns
    -------
    class_logits : Tensor
        Shape ``(num_classes, C)``; row ``c`` is the mean logit vector of the examples labelled
        ``c``, zeros for a class the client does not have.
    class_counts : Tensor
        Shape ``(num_classes,)``, int64 number of examples per class.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (N, C), got {tuple(logits.shape)}")
    labels = torch.as_tensor(labels, device=logits.device)
    if labels.shape != (logits.shape[0],):
        raise ValueError(
            f"labels must have shape ({logits.shape[0]},) to match logits, "
            f"got {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    labels = labels.long()
    if labels.numel() and (bool((labels < 0).any()) or bool((labels >= num_classes).any())):
        raise ValueError(f"labels must lie in [0, {num_classes}), got {labels.unique().tolist()}")
    one_hot = torch.nn.functional.one_hot(labels, num_classes).to(logits.dtype)
    sums = one_hot.T @ logits
    counts = torch.bincount(labels, minlength=num_classes)
    class_logits = sums / counts.clamp(min=1).to(logits.dtype)[:, None]
    return class_logits, counts


def aggregate_per_class(class_logits: Tensor, class_counts: Tensor) -> Tensor:
    """FD server step: count-weighted average of the clients' per-class logit vectors.

    Parameters
    ----------
    class_logits : Tensor
        Shape ``(K, num_classes, C)`` from :func:`per_class_mean_logits` of K clients.
    class_counts : Tensor
        Shape ``(K, num_classes)``, non-negative counts.

    Returns
    -------
    Tensor
        Shape ``(num_classes, C)``; row ``c`` averages the clients' rows for class ``c`` weighted
        by their counts, zeros for a class no client has.
    """
    if class_logits.dim() != 3:
        raise ValueError(
            f"class_logits must have shape (K, num_classes, C), got {tuple(class_logits.shape)}"
        )
    counts = torch.as_tensor(class_counts, device=class_logits.device).to(class_logits.dtype)
    if counts.shape != class_logits.shape[:2]:
        raise ValueError(
            f"class_counts must have shape {tuple(class_logits.shape[:2])}, "
            f"got {tuple(counts.shape)}"
        )
    if bool((counts < 0).any()):
        raise ValueError("class_counts must be non-negative")
    totals = counts.sum(dim=0)
    sums = torch.einsum("kc,kcd->cd", counts, class_logits)
    safe_totals = torch.where(totals > 0, totals, torch.ones_like(totals))
    return sums / safe_totals[:, None]
