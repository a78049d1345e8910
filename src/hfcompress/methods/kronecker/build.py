"""Builders of Kronecker layers, one per criterion, and the shape rules of a ``kronecker`` stage.

vanloan: the nearest Kronecker sum by Van Loan & Pitsianis's rearrangement and an SVD
(data-free). activation: the same problem weighted by the inputs' norms, which minimizes an
estimate of the output error (KronyPT, seed 004).
"""

from __future__ import annotations

from torch import nn

from hfcompress.decompose.calibrated import scaled_nearest_kronecker
from hfcompress.layers.base import dense_weight_of, source_kind
from hfcompress.methods.kronecker.config import KroneckerStage
from hfcompress.methods.kronecker.layer import KroneckerLinear
from hfcompress.registry import Planned
from hfcompress.stats import LayerStats


def build_vanloan(
    module: nn.Module, stage: KroneckerStage, stats: LayerStats | None
) -> KroneckerLinear:
    return KroneckerLinear.from_module(module, **stage.layer_params())


def build_activation(
    module: nn.Module, stage: KroneckerStage, stats: LayerStats
) -> KroneckerLinear:
    W = dense_weight_of(module)
    A, B = scaled_nearest_kronecker(W, tuple(stage.a_shape), stage.terms, stats.inputs.input_norm)
    return KroneckerLinear.from_factors(A, B, module.bias, source_kind(module))


def plan_kronecker(stage: KroneckerStage, planned: Planned) -> Planned:
    """Check that A's shape divides the weight's (the layer's own constructor, on meta)."""
    out_f, in_f = planned.out_features, planned.in_features
    KroneckerLinear(in_f, out_f, tuple(stage.a_shape), stage.terms, device="meta")
    return Planned("kronecker", out_f, in_f)
