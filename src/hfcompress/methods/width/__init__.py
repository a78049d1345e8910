"""``width``: remove whole MLP intermediate channels (Minitron), one registration."""

from hfcompress.methods.width.build import (
    activation_scores,
    check_width,
    magnitude_scores,
    reconstruction_keep,
    taylor_scores,
    transform_width,
)
from hfcompress.methods.width.config import WidthStage
from hfcompress.registry import Criterion, Method, register_method
from hfcompress.structured.refit import refit_consumer

METHOD = register_method(
    Method(
        name="width",
        stage=WidthStage,
        criteria={
            "magnitude": Criterion(magnitude_scores),
            "activation": Criterion(activation_scores, frozenset({"activations"})),
            "taylor": Criterion(taylor_scores, frozenset({"gradients"})),
            "reconstruction": Criterion(reconstruction_keep, frozenset({"gram"})),
        },
        scope="model",
        check=check_width,
        transform=transform_width,
        description="MLP intermediate channels (magnitude, activation, taylor; refit)",
    )
)

__all__ = ["METHOD", "WidthStage", "refit_consumer"]
