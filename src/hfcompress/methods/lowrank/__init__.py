"""``lowrank``: W ≈ U·V by truncated SVD, plain or data-aware, one registration."""

from hfcompress.methods.lowrank.build import (
    build_activation,
    build_fisher,
    build_fisher_whitened,
    build_svd,
    build_whitened,
    plan_lowrank,
)
from hfcompress.methods.lowrank.config import LowRankStage
from hfcompress.methods.lowrank.layer import LowRankLinear
from hfcompress.registry import Criterion, Method, register_method

METHOD = register_method(
    Method(
        name="lowrank",
        stage=LowRankStage,
        criteria={
            "svd": Criterion(build_svd),
            "activation": Criterion(build_activation, frozenset({"inputs"})),
            "whitened": Criterion(build_whitened, frozenset({"gram"})),
            "fisher": Criterion(build_fisher, frozenset({"weight_fisher"})),
            "fisher_whitened": Criterion(
                build_fisher_whitened, frozenset({"gram", "output_fisher"})
            ),
        },
        plan=plan_lowrank,
        layers=(LowRankLinear,),
        description="W ≈ U·V (svd, activation, whitened, fisher, fisher_whitened)",
    )
)

__all__ = ["METHOD", "LowRankLinear", "LowRankStage"]
