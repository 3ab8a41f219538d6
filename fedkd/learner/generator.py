"""The generator proxy (``proxy.synthetic = "generator"``): proxy inputs that a server-side
generator makes afresh every round, trained data-free against the server student.

What travels is the generator's weights, never inputs. Each round the server sends them with
the training request (and again with the digest, so that a client keeps nothing between the
two), with the seed and count of the round's latents; every party draws the same latents
``z ~ N(0, I)`` from that seed and runs the same generator on them (`generated_inputs`, on the
CPU), so the clients' proxy inputs are the server's bit for bit on the same machine and thread
settings. The round's indices then point into that generated set as into any proxy set.

After the round's distillation the server trains the generator (`ProxyGenerator.train`) against
the frozen server student with data-free losses (`generator_losses`): DAFL's (Chen et al., 2019)
cross-entropy of the student towards its own argmax (inputs it classifies confidently) minus
the weighted entropy of its batch-mean prediction (class balance), and a DFAD-style
(Fang et al., 2019) disagreement term, the mean absolute difference of logits between the
student and a frozen copy of the student the generator was last trained against (before this
round's distillation): the released teacher exists only on inputs the clients have labelled, so
it cannot be differentiated through the generator, and the student that has just absorbed it
stands in for it. DAFL's activation term needs the teacher's features and is not used; nor is
any batch-statistics term (the zoo has no BatchNorm). See docs/proxy.md.

The generator is a function of the server student only, which is computed from the released
teacher: post-processing, which costs no privacy.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedkd.data.proxy import ProxySource
from fedkd.data.splits import FederatedData
from fedkd.learner.loop import derive_seed, seeded_generator

# Payload names: the generator's weights carry this prefix; the round's latents are described
# by one int64 array (their seed, their count).
GENERATOR_PREFIX = "generator."
LATENTS = "generator_latents"
# A seed stream of its own (loop.py's phases are 0..7), and its sub-streams.
PHASE_GENERATOR = 9
_INIT, _LATENTS, _TRAINING = range(3)
# The generator's owner id in its seed keys, in the place a client's id takes in the clients'
# keys (``(seed, round, client id, phase)``): a negative id no client reaches, beside the server
# student's -1 and FedAvg's global model's -2. Without it the generator's keys ``(seed, round,
# PHASE_GENERATOR, ...)`` were client 9's: its latents, training batches and initial weights
# drew the same torch streams as client 9's private training, distillation and student.
_OWNER = -3


class Generator(nn.Module):
    """An MLP from latents to inputs of the private inputs' shape, each standardised.

    Parameters
    ----------
    latent_dim : int
        Size of a latent.
    hidden : int
        Width of its two hidden layers (LeakyReLU; no normalisation layers).
    input_shape : tuple of int
        Shape of one private input, channels first.

    Notes
    -----
    Each generated input is brought to zero mean and unit standard deviation over its own
    elements, the scale of the standardised private inputs; an input depends on its own latent
    only, never on the rest of its batch.
    """

    def __init__(self, latent_dim: int, hidden: int, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.net = nn.Sequential(
            nn.Linear(latent_dim, hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden, hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden, math.prod(self.input_shape)),
        )

    def forward(self, z: Tensor) -> Tensor:
        x = self.net(z)
        x = (x - x.mean(dim=1, keepdim=True)) / (x.std(dim=1, keepdim=True, correction=0) + 1e-6)
        return x.reshape(len(z), *self.input_shape)

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], input_shape: tuple[int, ...]) -> Generator:
        """The generator whose weights `arrays` holds (its state dict, as numpy arrays)."""
        hidden, latent_dim = arrays["net.0.weight"].shape
        with torch.random.fork_rng(devices=[]):  # the initial draws are overwritten below
            model = cls(latent_dim, hidden, input_shape)
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()})
        return model


def generated_inputs(payload: dict[str, np.ndarray], input_shape: tuple[int, ...]) -> np.ndarray:
    """The round's generated proxy set that a payload describes.

    Parameters
    ----------
    payload : dict of str to ndarray
        A round's payload holding the generator's weights (``generator.*``) and its latents'
        seed and count (``generator_latents``).
    input_shape : tuple of int
        Shape of one private input.

    Returns
    -------
    np.ndarray
        ``float32`` inputs ``(count, *input_shape)``, computed on the CPU.
    """
    weights = {
        k[len(GENERATOR_PREFIX) :]: v for k, v in payload.items() if k.startswith(GENERATOR_PREFIX)
    }
    model = Generator.from_arrays(weights, input_shape)
    seed, count = (int(v) for v in payload[LATENTS])
    latent_dim = model.net[0].in_features
    z = torch.randn(count, latent_dim, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(z).numpy().astype(np.float32)


def payload_proxy_inputs(data: FederatedData, payload: dict[str, np.ndarray]) -> np.ndarray:
    """The proxy inputs a round's payload points at: ``data.proxy_x[proxy_idx]``, or, where the
    payload carries a generator (`LATENTS`), its indices into the set the generator makes."""
    idx = payload["proxy_idx"].astype(np.int64)
    if LATENTS not in payload:
        return data.proxy_x[idx]
    return generated_inputs(payload, data.input_shape)[idx]


def generator_losses(logits: Tensor, earlier_logits: Tensor) -> dict[str, Tensor]:
    """The data-free terms of a batch of generated inputs.

    Parameters
    ----------
    logits : Tensor
        The server student's logits ``(B, C)`` on the generated batch.
    earlier_logits : Tensor
        The earlier (frozen) student's logits on the same batch.

    Returns
    -------
    dict of str to Tensor
        ``confidence``: cross-entropy of the student towards its own argmax (low where it is
        sure); ``balance``: entropy of its batch-mean prediction (high where the batch covers
        the classes evenly); ``disagreement``: mean absolute difference of the two students'
        logits.
    """
    confidence = F.cross_entropy(logits, logits.argmax(dim=1))
    mean_prediction = torch.softmax(logits, dim=1).mean(dim=0)
    balance = -(mean_prediction * torch.log(mean_prediction.clamp_min(1e-12))).sum()
    disagreement = (logits - earlier_logits).abs().mean()
    return {"confidence": confidence, "balance": balance, "disagreement": disagreement}


class ProxyGenerator:
    """The server's generator: the round's payload and proxy set, and its data-free training.

    Parameters
    ----------
    proxy : ProxySource
        The ``[proxy]`` settings (``latent_dim``, ``generator_hidden``, ``generator_steps``,
        ``generator_lr``, ``generator_batch``, ``generator_balance``,
        ``generator_disagreement``).
    input_shape : tuple of int
        Shape of one private input.
    seed : int
        The run's seed: the generator's initial weights, each round's latents and its training
        latents derive from it.
    size : int
        Inputs the generator makes each round (the round's proxy set).
    student : nn.Module
        The server student before any distillation: the first earlier student of the
        disagreement term.
    """

    def __init__(
        self,
        proxy: ProxySource,
        input_shape: tuple[int, ...],
        seed: int,
        size: int,
        student: nn.Module,
    ) -> None:
        self.proxy = proxy
        self.input_shape = tuple(input_shape)
        self.seed = seed
        self.size = size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, _OWNER, PHASE_GENERATOR, _INIT))
            self.model = Generator(proxy.latent_dim, proxy.generator_hidden, self.input_shape)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=proxy.generator_lr)
        self._earlier = _frozen_copy(student)

    def payload(self, round_num: int) -> dict[str, np.ndarray]:
        """What a round's messages carry for the clients to make its proxy set: the weights
        (``generator.<name>``) and the latents' seed and count."""
        arrays = {
            GENERATOR_PREFIX + k: v.detach().numpy().astype(np.float32, copy=True)
            for k, v in self.model.state_dict().items()
        }
        seed = derive_seed(self.seed, round_num, _OWNER, PHASE_GENERATOR, _LATENTS)
        return {**arrays, LATENTS: np.array([seed, self.size], dtype=np.int64)}

    def inputs(self, payload: dict[str, np.ndarray]) -> np.ndarray:
        """The proxy set `payload` describes, made as every client makes it."""
        return generated_inputs(payload, self.input_shape)

    def train(self, round_num: int, student: nn.Module) -> dict[str, float]:
        """Train the generator against the frozen `student` for ``generator_steps`` steps.

        Minimises ``confidence - generator_balance * balance - generator_disagreement *
        disagreement`` (`generator_losses`) on batches of ``generator_batch`` fresh latents,
        the earlier student being the one of the previous call (the student before any
        distillation at the first). Only the generator's weights change.

        Returns
        -------
        dict of str to float
            The three terms on the last step's batch, as ``generator_<term>`` (empty with no
            steps).
        """
        p = self.proxy
        gen = seeded_generator(self.seed, round_num, _OWNER, PHASE_GENERATOR, _TRAINING)
        params = list(self.model.parameters())
        was_training = student.training
        student.eval()
        self.model.train()
        terms: dict[str, Tensor] = {}
        for _ in range(p.generator_steps):
            z = torch.randn(p.generator_batch, p.latent_dim, generator=gen)
            x = self.model(z)
            terms = generator_losses(student(x), self._earlier(x))
            loss = (
                terms["confidence"]
                - p.generator_balance * terms["balance"]
                - p.generator_disagreement * terms["disagreement"]
            )
            # Gradients of the generator only: the students' own gradients stay untouched.
            for param, grad in zip(params, torch.autograd.grad(loss, params), strict=True):
                param.grad = grad
            self.opt.step()
        student.train(was_training)
        self._earlier = _frozen_copy(student)
        return {f"generator_{k}": float(v.detach()) for k, v in terms.items()}


def _frozen_copy(model: nn.Module) -> nn.Module:
    earlier = copy.deepcopy(model).eval()
    for param in earlier.parameters():
        param.requires_grad_(False)
    return earlier
