"""``prune``: unstructured or N:M sparsity (magnitude, Wanda, SparseGPT), one registration."""

from hfcompress.methods.prune.build import build_magnitude, build_sparsegpt, build_wanda, plan_prune
from hfcompress.methods.prune.config import PruneStage
from hfcompress.methods.prune.layer import PrunedLinear
from hfcompress.registry import Criterion, Method, register_method

METHOD = register_method(
    Method(
        name="prune",
        stage=PruneStage,
        criteria={
            "magnitude": Criterion(build_magnitude),
            "wanda": Criterion(build_wanda, frozenset({"inputs"})),
            "sparsegpt": Criterion(build_sparsegpt, frozenset({"gram"})),
        },
        plan=plan_prune,
        after=frozenset({"dense", "lowrank"}),
        layers=(PrunedLinear,),
        description="zero weights: unstructured or N:M (magnitude, wanda, sparsegpt)",
    )
)

__all__ = ["METHOD", "PruneStage", "PrunedLinear"]
