"""Shared test setup: one torch thread (2-core CI machines), no Flower telemetry, and a fresh
partition cache per session (inherited by the subprocesses and Ray workers tests start)."""

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
# One throwaway data cache per test session (Ray workers and subprocess runs inherit it),
# removed when the session's process exits.
os.environ["FEDKD_CACHE_DIR"] = tempfile.mkdtemp(prefix="fedkd-test-cache-")
atexit.register(shutil.rmtree, os.environ["FEDKD_CACHE_DIR"], ignore_errors=True)
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
MNIST_NPZ = REPO.parent / "shared" / "data" / "mnist.npz"


@pytest.fixture
def mnist_path() -> Path:
    if not MNIST_NPZ.is_file():
        pytest.skip(f"real MNIST not found at {MNIST_NPZ} (only on developer and CI machines)")
    return MNIST_NPZ


@pytest.fixture
def hf_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Offline Hugging Face setup with a private cache; returns a folder for data sets."""
    import datasets
    import flwr_datasets.common.telemetry as telemetry

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # datasets and flwr-datasets read these at import time, so the variables alone are late.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(telemetry, "FLWR_TELEMETRY_ENABLED", "0")
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    folder = tmp_path / "hf-data"
    folder.mkdir()
    yield folder
    if bars:
        datasets.enable_progress_bars()
