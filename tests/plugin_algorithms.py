"""An algorithm outside fedkd's registry, for the registry's tests (import path, entry point)."""

from __future__ import annotations

from dataclasses import dataclass

from strategies.dsfl import DSFL
from strategies.params import ParamError, TeacherParams


@dataclass
class SharpParams(TeacherParams):
    """A plugin's own parameter beside DS-FL's."""

    sharpness: float = 2.0

    def check(self) -> None:
        super().check()
        if self.sharpness <= 1:
            raise ParamError(f"sharpness: must be > 1, got {self.sharpness}")


class SharpDSFL(DSFL):
    """A registered plugin for the entry-point test."""

    name = "sharp_dsfl"
    Params = SharpParams
