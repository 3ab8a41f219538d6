"""Local Hugging Face data sets for tests: a folder of one parquet file per split, which
``datasets.load_dataset`` reads without network (the ``hf_offline`` fixture of conftest.py
gives the folder and an offline, private cache)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_hf_split(
    folder: Path, split: str, n: int, seed: int, shape: tuple[int, ...] = (8, 8)
) -> np.ndarray:
    """Write `n` random ``uint8`` grey images of `shape` as the column ``img`` (PIL images, as
    the hub stores them) with labels 0, 1, 2, 0, ... as ``label``; return the images."""
    import datasets

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    features = datasets.Features(
        {"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=3)}
    )
    table = datasets.Dataset.from_dict(
        {"img": list(images), "label": np.arange(n) % 3}, features=features
    )
    table.to_parquet(str(folder / f"{split}.parquet"))
    return images
