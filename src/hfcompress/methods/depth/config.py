"""The ``depth`` stage of a recipe: whole transformer blocks. No torch here."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, StrictInt, ValidationInfo, field_validator

from hfcompress.stage import StageBase


class DepthStage(StageBase):
    """Remove whole transformer blocks (ShortGPT's depth pruning, Men et al. 2024).

    The result is the same architecture with fewer blocks: the layer stack (an
    ``nn.ModuleList``) keeps the other blocks in order and the config's block count follows,
    so the model saves as a plain checkpoint. Give ``drop`` (how many blocks, chosen by
    ``criterion`` on calibration data) or ``layers`` (which ones).

    Example:
        .. code-block:: yaml

            - method: depth
              targets: 'model\\.layers'     # optional: the model's one stack of blocks
              drop: 4
              criterion: block_influence    # block_influence | loss

            - method: depth
              layers: [20, 21, 22]
    """

    method: Literal["depth"] = "depth"
    targets: str | None = Field(
        default=None,
        description="Regex (re.fullmatch) naming the stack of blocks, an nn.ModuleList such "
        "as 'model\\.layers', 'transformer\\.h' or 'decoder\\.block'. Default: the model's "
        "only stack (an encoder-decoder has two and must name one).",
    )
    drop: int | None = Field(
        default=None,
        ge=1,
        strict=True,
        description="How many blocks to remove, the least important by `criterion`.",
    )
    layers: list[StrictInt] | None = Field(
        default=None,
        min_length=1,
        validate_default=True,
        description="Indices of the blocks to remove, in the stack as it is before this stage.",
    )
    criterion: Literal["block_influence", "loss"] | None = Field(
        default=None,
        validate_default=True,
        description="Block importance with `drop`: 'block_influence' (ShortGPT: mean over "
        "tokens of 1 − cos(block input, block output) on calibration data; the default) or "
        "'loss' (the language-model loss with the block skipped, one pass per block). Not "
        "with `layers`.",
    )

    @field_validator("layers")
    @classmethod
    def _one_choice(cls, value: list[int] | None, info: ValidationInfo) -> list[int] | None:
        if "drop" not in info.data:  # drop itself failed; its own error says why
            return value
        drop = info.data["drop"]
        if (drop is None) == (value is None):
            raise ValueError(
                "give exactly one of `drop` (how many blocks, chosen by `criterion`) and "
                "`layers` (which blocks)"
            )
        if value is not None:
            repeated = sorted({i for i in value if value.count(i) > 1})
            if repeated:
                raise ValueError(f"{repeated} listed more than once")
        return value

    @field_validator("criterion")
    @classmethod
    def _no_criterion_with_layers(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("layers") is not None:
            raise ValueError(
                f"{value!r} chooses blocks to drop, but `layers` already names them; remove one"
            )
        return value

    @field_validator("overrides")
    @classmethod
    def _no_overrides(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        # the stage acts on the stack as a whole: there is no per-module setting to override
        if value:
            raise ValueError(
                "depth acts on the stack as a whole; per-module overrides do not apply"
            )
        return value

    @property
    def criterion_name(self) -> str:
        """``"given"`` with ``layers``; else the criterion, ``"block_influence"`` by default."""
        if self.layers is not None:
            return "given"
        return self.criterion or "block_influence"
