"""Shared test setup: one torch thread (2-core CI machines), no Flower telemetry, and a fresh
partition cache per session (inherited by the subprocesses and Ray workers tests start)."""

import os
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ["FEDKD_CACHE_DIR"] = tempfile.mkdtemp(prefix="fedkd-test-cache-")
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
MNIST_NPZ = REPO.parent / "shared" / "data" / "mnist.npz"


@pytest.fixture
def mnist_path() -> Path:
    if not MNIST_NPZ.is_file():
        pytest.skip(f"real MNIST not found at {MNIST_NPZ} (only on developer and CI machines)")
    return MNIST_NPZ
