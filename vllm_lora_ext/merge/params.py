"""Validated parameters of each merge method (names and meanings as in PEFT's add_weighted_adapter).

Unknown fields are refused rather than ignored, so a misspelt ``densty`` fails loudly instead of
silently merging with a default.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class MergeParams(BaseModel):
    """Base of every method's parameters: frozen, no extra fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class NoParams(MergeParams):
    """linear and cat take no parameters."""


class SvdParams(MergeParams):
    """Re-factorisation of the dense merged ΔW (PEFT's ``svd_*`` arguments)."""

    svd_rank: int | None = Field(default=None, gt=0, description="default: max adapter rank")
    svd_clamp: float | None = Field(default=None, ge=0.0, le=1.0, description="quantile")
    svd_full_matrices: bool = True
    svd_driver: Literal["gesvd", "gesvdj", "gesvda"] | None = Field(
        default=None, description="CUDA only, as in torch.linalg.svd"
    )


class DensityParams(MergeParams):
    """Fraction of entries kept by pruning (0 keeps none, 1 keeps all)."""

    density: float = Field(ge=0.0, le=1.0)


class TiesParams(DensityParams):
    majority_sign_method: Literal["total", "frequency"] = "total"


class DareParams(DensityParams):
    """``seed`` makes the random masks reproducible (None: torch's global generator)."""

    seed: int | None = None


class DareTiesParams(TiesParams):
    seed: int | None = None


class TiesSvdParams(TiesParams, SvdParams):
    pass


class DareSvdParams(DareParams, SvdParams):
    pass


class DareTiesSvdParams(DareTiesParams, SvdParams):
    pass


class MagnitudePruneSvdParams(DensityParams, SvdParams):
    pass
