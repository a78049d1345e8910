"""The ``kronecker`` stage of a recipe. No torch here."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, StrictInt, field_validator

from hfcompress.stage import StageBase


class KroneckerStage(StageBase):
    """Nearest Kronecker sum W ≈ Σₖ Aₖ ⊗ Bₖ (Van Loan & Pitsianis; KronyPT, seed 004).

    Example:
        .. code-block:: yaml

            - method: kronecker
              targets: 'transformer\\.h\\.\\d+\\.mlp\\.c_fc'
              a_shape: [768, 768]      # (m1, n1); B is [out/m1, in/n1]
              terms: 1
              criterion: vanloan       # vanloan | activation
    """

    method: Literal["kronecker"] = "kronecker"
    a_shape: tuple[StrictInt, StrictInt] = Field(
        description="(m1, n1), the shape of A; must divide the weight's [out, in]."
    )
    terms: int = Field(default=1, ge=1, strict=True, description="Number of Kronecker terms k.")
    criterion: Literal["vanloan", "activation"] = Field(
        default="vanloan",
        description="'vanloan' (data-free nearest Kronecker sum) or 'activation' (weights the "
        "problem by the inputs' norms, minimizing the output error); 'activation' needs "
        "calibration data.",
    )

    @field_validator("a_shape")
    @classmethod
    def _positive(cls, value: tuple[int, int]) -> tuple[int, int]:
        if min(value) < 1:
            raise ValueError(f"a_shape={list(value)}: expected two positive integers")
        return value

    def layer_params(self) -> dict[str, Any]:
        return {"a_shape": tuple(self.a_shape), "terms": self.terms}
