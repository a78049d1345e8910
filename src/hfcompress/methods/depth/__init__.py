"""``depth``: remove whole transformer blocks (ShortGPT's block influence), one registration."""

from hfcompress.methods.depth.build import (
    block_influence_scores,
    check_depth,
    find_stacks,
    given_blocks,
    loss_scores,
    transform_depth,
)
from hfcompress.methods.depth.config import DepthStage
from hfcompress.registry import Criterion, Method, register_method

METHOD = register_method(
    Method(
        name="depth",
        stage=DepthStage,
        criteria={
            "block_influence": Criterion(block_influence_scores, frozenset({"activations"})),
            "loss": Criterion(loss_scores, frozenset({"activations"})),
            "given": Criterion(given_blocks),
        },
        scope="model",
        check=check_depth,
        transform=transform_depth,
        description="whole transformer blocks (block_influence, loss, or given layers)",
    )
)

__all__ = ["METHOD", "DepthStage", "find_stacks"]
