"""``kronecker``: W ≈ Σₖ Aₖ ⊗ Bₖ (Van Loan, or activation-weighted), one registration."""

from hfcompress.methods.kronecker.build import build_activation, build_vanloan, plan_kronecker
from hfcompress.methods.kronecker.config import KroneckerStage
from hfcompress.methods.kronecker.layer import KroneckerLinear
from hfcompress.registry import Criterion, Method, register_method

METHOD = register_method(
    Method(
        name="kronecker",
        stage=KroneckerStage,
        criteria={
            "vanloan": Criterion(build_vanloan),
            "activation": Criterion(build_activation, frozenset({"inputs"})),
        },
        plan=plan_kronecker,
        layers=(KroneckerLinear,),
        description="W ≈ Σ A⊗B (vanloan, activation)",
    )
)

__all__ = ["METHOD", "KroneckerLinear", "KroneckerStage"]
