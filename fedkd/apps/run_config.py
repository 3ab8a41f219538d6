"""The spec as Flower's run config carries it (for `flwr run .` and deployments)."""

from __future__ import annotations

import functools
from pathlib import Path

from fedkd.spec import DEPLOYMENT_NOISE_RNG, Spec, load_spec, with_noise_rng

APP_DIR = Path(__file__).resolve().parents[2]


def _resolve(spec_path: str) -> Path | None:
    if not spec_path:
        return None
    path = Path(spec_path).expanduser()
    if path.is_absolute() or path.is_file():
        return path
    # Relative paths name files of the app (e.g. simulations/quickstart.toml).
    return APP_DIR / path


@functools.lru_cache(maxsize=8)
def _cached(spec_path: str, overrides: str, out_dir: str) -> Spec:
    items = [item.strip() for item in overrides.split(";") if item.strip()]
    if out_dir:
        items.append(f'output.dir="{out_dir}"')
    return with_noise_rng(load_spec(_resolve(spec_path), items), DEPLOYMENT_NOISE_RNG)


def spec_from_run_config(run_config: dict) -> Spec:
    """Run config keys: ``spec`` (path or "" for the default), ``overrides`` ("k=v;k=v"),
    ``out-dir``. A spec that names no ``privacy.noise_rng`` gets secure noise here: a run on a
    SuperLink may be a deployment on real data."""
    return _cached(
        str(run_config.get("spec", "")),
        str(run_config.get("overrides", "")),
        str(run_config.get("out-dir", "")),
    )
