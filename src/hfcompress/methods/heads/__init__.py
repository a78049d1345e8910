"""``heads``: remove whole attention heads or GQA groups (Minitron), one registration."""

from hfcompress.methods.heads.build import (
    activation_scores,
    check_heads,
    find_attention,
    magnitude_scores,
    taylor_scores,
    transform_heads,
)
from hfcompress.methods.heads.config import HeadsStage
from hfcompress.registry import Criterion, Method, register_method

METHOD = register_method(
    Method(
        name="heads",
        stage=HeadsStage,
        criteria={
            "magnitude": Criterion(magnitude_scores),
            "activation": Criterion(activation_scores, frozenset({"activations"})),
            "taylor": Criterion(taylor_scores, frozenset({"gradients"})),
        },
        scope="model",
        check=check_heads,
        transform=transform_heads,
        description="attention heads or whole GQA groups (magnitude, activation, taylor; refit)",
    )
)

__all__ = ["METHOD", "HeadsStage", "find_attention"]
