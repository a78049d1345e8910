"""Builders of low-rank layers, one per criterion, and the shape rules of a ``lowrank`` stage.

svd: truncated SVD of W (data-free). activation: ASVD, W·diag(s) with s the mean |x| (Yuan et
al. 2023). whitened: SVD-LLM, minimizes ‖(W − Ŵ)X‖ through the Cholesky factor of X·Xᵀ (Wang
et al. 2024). fisher: FWSVD, rows weighted by squared weight gradients (Hsu et al. 2022).
fisher_whitened: both, minimizing Σ_j G_j ‖(W − Ŵ)_j X‖². See hfcompress.decompose.calibrated.
"""

from __future__ import annotations

from torch import nn

from hfcompress.decompose.calibrated import (
    activation_svd_factors,
    fisher_svd_factors,
    whitened_svd_factors,
)
from hfcompress.decompose.svd import rank_for_ratio
from hfcompress.layers.base import dense_weight_of, source_kind
from hfcompress.methods.lowrank.config import LowRankStage
from hfcompress.methods.lowrank.layer import LowRankLinear
from hfcompress.registry import Planned
from hfcompress.stats import LayerStats


def _factored(module: nn.Module, U, V) -> LowRankLinear:
    return LowRankLinear.from_factors(U, V, module.bias, source_kind(module))


def build_svd(module: nn.Module, stage: LowRankStage, stats: LayerStats | None) -> LowRankLinear:
    return LowRankLinear.from_module(module, **stage.layer_params())


def build_activation(module: nn.Module, stage: LowRankStage, stats: LayerStats) -> LowRankLinear:
    W = dense_weight_of(module)
    return _factored(
        module, *activation_svd_factors(W, stats.inputs.mean_abs, **stage.layer_params())
    )


def build_whitened(module: nn.Module, stage: LowRankStage, stats: LayerStats) -> LowRankLinear:
    W = dense_weight_of(module)
    return _factored(module, *whitened_svd_factors(W, stats.inputs.gram, **stage.layer_params()))


def build_fisher(module: nn.Module, stage: LowRankStage, stats: LayerStats) -> LowRankLinear:
    W = dense_weight_of(module)
    return _factored(module, *fisher_svd_factors(W, stats.row_weights, **stage.layer_params()))


def build_fisher_whitened(
    module: nn.Module, stage: LowRankStage, stats: LayerStats
) -> LowRankLinear:
    W = dense_weight_of(module)
    U, V = whitened_svd_factors(
        W, stats.inputs.gram, row_importance=stats.row_weights, **stage.layer_params()
    )
    return _factored(module, U, V)


def plan_lowrank(stage: LowRankStage, planned: Planned) -> Planned:
    """Check the rank fits; the planned layer knows its rank (None when energy decides it)."""
    out_f, in_f = planned.out_features, planned.in_features
    rank = stage.rank
    if rank is not None:
        LowRankLinear(in_f, out_f, rank, device="meta")
    elif stage.ratio is not None:
        rank = rank_for_ratio(out_f, in_f, stage.ratio)
    factors = None if rank is None else {"u": (out_f, rank), "v": (rank, in_f)}
    return Planned("lowrank", out_f, in_f, {"rank": rank, "factors": factors})
