"""The ``lowrank`` stage of a recipe. No torch here."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from hfcompress.stage import StageBase

_RANK_FIELDS = frozenset({"rank", "ratio", "energy"})


class LowRankStage(StageBase):
    """Truncated-SVD factorization W ≈ U·V (Hajimolahoseini et al., seed 000 §4).

    Example:
        .. code-block:: yaml

            - method: lowrank
              targets: 'model\\.layers\\.\\d+\\.mlp\\..*'
              ratio: 0.5               # or rank: 64, or energy: 0.95 (criterion svd)
              criterion: whitened      # svd | activation | whitened | fisher | fisher_whitened
    """

    alternatives: ClassVar[frozenset[str]] = _RANK_FIELDS

    method: Literal["lowrank"] = "lowrank"
    rank: int | None = Field(
        default=None, ge=1, strict=True, description="Rank r of U: [out, r], V: [r, in]."
    )
    ratio: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        strict=True,
        allow_inf_nan=False,
        description="Fraction of the layer's parameters to keep.",
    )
    energy: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        strict=True,
        allow_inf_nan=False,
        description="Fraction of Σσᵢ² the kept rank retains.",
    )
    criterion: Literal["svd", "activation", "whitened", "fisher", "fisher_whitened"] = Field(
        default="svd",
        description="'svd' (data-free, minimizes ‖W − Ŵ‖), 'activation' (ASVD scaling), 'whitened' "
        "(SVD-LLM, minimizes ‖(W − Ŵ)X‖), 'fisher' (FWSVD row weights from squared "
        "gradients) or 'fisher_whitened' (minimizes Σ_j G_j‖(W − Ŵ)_j X‖², G_j the squared "
        "loss gradients of output j: an estimate of the loss increase); all but 'svd' need "
        "calibration data.",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> LowRankStage:
        given = [k for k in ("rank", "ratio", "energy") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"rank/ratio/energy: give exactly one, got {given or 'none'}")
        if self.energy is not None and self.criterion != "svd":
            raise ValueError(
                f"energy: selects ranks from W's own spectrum, so only with criterion 'svd'; "
                f"use rank or ratio with criterion {self.criterion!r}"
            )
        return self

    def layer_params(self) -> dict[str, Any]:
        return {
            k: getattr(self, k) for k in ("rank", "ratio", "energy") if getattr(self, k) is not None
        }
