"""The ``prune`` stage of a recipe. No torch here."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from hfcompress.decompose.patterns import UNSTRUCTURED, normalize_pattern, resolve_sparsity
from hfcompress.stage import StageBase


class PruneStage(StageBase):
    """Pruning, per layer: unstructured, or N:M along the input dimension.

    Example:
        .. code-block:: yaml

            - method: prune
              targets: 'model\\.layers\\.\\d+\\.mlp\\..*'
              sparsity: 0.5            # or pattern: '2:4'
              criterion: sparsegpt     # magnitude | wanda | sparsegpt
    """

    method: Literal["prune"] = "prune"
    sparsity: float | None = Field(
        default=None,
        ge=0.0,
        lt=1.0,
        strict=True,
        allow_inf_nan=False,
        description="Fraction of weights set to zero, in [0, 1). Implied by an N:M pattern.",
    )
    pattern: str = Field(
        default=UNSTRUCTURED,
        description="'unstructured' or 'N:M' (keep N of every M consecutive inputs, N < M).",
    )
    criterion: Literal["magnitude", "wanda", "sparsegpt"] = Field(
        default="magnitude",
        description="'magnitude' (data-free), 'wanda' (|W|·‖X‖, Sun et al. 2023) or 'sparsegpt' "
        "(OBS updates with the Hessian X·Xᵀ, Frantar & Alistarh 2023); the last two need "
        "calibration data.",
    )

    @field_validator("pattern")
    @classmethod
    def _valid_pattern(cls, value: str) -> str:
        return normalize_pattern(value)

    @model_validator(mode="after")
    def _sparsity_fits_pattern(self) -> PruneStage:
        resolve_sparsity(self.pattern, self.sparsity)
        return self

    def layer_params(self) -> dict[str, Any]:
        return {"sparsity": self.sparsity, "pattern": self.pattern}
