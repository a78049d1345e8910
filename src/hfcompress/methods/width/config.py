"""The ``width`` stage of a recipe: MLP intermediate channels. No torch here."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from hfcompress.stage import StageBase


class WidthStage(StageBase):
    """Remove whole MLP intermediate channels (Minitron's width pruning of the MLP).

    Channel j of an MLP is row j of its gate/up projections and column j of its down
    projection; the result is a plain MLP of ``keep`` × the width. Targets are MLP modules
    (``model.layers.3.mlp``; a block where the architecture has no MLP module, as OPT).

    Example:
        .. code-block:: yaml

            - method: width
              targets: 'model\\.layers\\.\\d+\\.mlp'
              keep: 0.5
              criterion: activation     # magnitude | activation | taylor
    """

    method: Literal["width"] = "width"
    keep: float = Field(
        gt=0.0,
        le=1.0,
        strict=True,
        allow_inf_nan=False,
        description="Fraction of each MLP's intermediate channels kept (rounded to "
        "multiple_of, at least one).",
    )
    criterion: Literal["magnitude", "activation", "taylor", "reconstruction"] = Field(
        default="activation",
        description="Channel importance: 'magnitude' (weight norms, data-free), 'activation' "
        "(E[x_j²]·‖W_down[:, j]‖², the energy channel j adds to the MLP's output on "
        "calibration data) or 'taylor' (Σ|w·∂L/∂w| over the channel's weights, first-order "
        "estimate of the loss change, LLM-Pruner) or 'reconstruction' (channels removed "
        "greedily to keep the down projection's output after the refit, structured OBS as in "
        "ZipLM; slower, usually best one-shot).",
    )
    refit: bool | None = Field(
        default=None,
        description="Refit the down projection by least squares on the kept channels' "
        "calibration activations (FLAP/ZipLM-style compensation). Default: on when "
        "calibration data is given.",
    )
    refit_damping: float = Field(
        default=1e-3,
        ge=0.0,
        strict=True,
        allow_inf_nan=False,
        description="Ridge term of the refit, relative to the mean diagonal of the kept "
        "channels' Gram matrix.",
    )
    multiple_of: int = Field(
        default=1,
        ge=1,
        strict=True,
        description="Round the kept width to a multiple of this (8 or 64 suit GPU kernels).",
    )
