"""Builders of pruned layers, one per criterion, and the shape rules of a ``prune`` stage.

magnitude: |W| (data-free). wanda: |W_ij|·‖X_j‖ (Sun et al. 2023). sparsegpt: OBS updates with
the Hessian X·Xᵀ, column by column (Frantar & Alistarh 2023). After a low-rank stage, pruning
acts on the factors U and V (magnitude only).
"""

from __future__ import annotations

from torch import nn

from hfcompress.decompose.calibrated import sparsegpt_prune, wanda_mask
from hfcompress.layers.base import CompressedLayer, dense_weight_of, source_kind
from hfcompress.methods.prune.config import PruneStage
from hfcompress.methods.prune.layer import PrunedLinear
from hfcompress.registry import Planned
from hfcompress.stats import LayerStats


def build_magnitude(module: nn.Module, stage: PruneStage, stats: LayerStats | None) -> nn.Module:
    """Keep the largest |W|; on a factored layer (low rank), prune each factor so."""
    params = stage.layer_params()
    factors = module.factors() if isinstance(module, CompressedLayer) else {}
    if factors:
        return module.with_factors(
            {name: PrunedLinear.from_module(f, **params) for name, f in factors.items()}
        )
    return PrunedLinear.from_module(module, **params)


def build_wanda(module: nn.Module, stage: PruneStage, stats: LayerStats) -> PrunedLinear:
    W = dense_weight_of(module)
    mask = wanda_mask(W, stats.inputs.input_norm, sparsity=stage.sparsity, pattern=stage.pattern)
    return PrunedLinear.from_weight(
        W, mask, module.bias, source_kind(module), stage.pattern, stage.sparsity
    )


def build_sparsegpt(module: nn.Module, stage: PruneStage, stats: LayerStats) -> PrunedLinear:
    W = dense_weight_of(module)
    pruned, mask = sparsegpt_prune(
        W, stats.inputs.gram, sparsity=stage.sparsity, pattern=stage.pattern
    )
    return PrunedLinear.from_weight(
        pruned, mask, module.bias, source_kind(module), stage.pattern, stage.sparsity
    )


def plan_prune(stage: PruneStage, planned: Planned) -> Planned:
    """Check the stage fits (N:M divides the input size, of each factor after low rank)."""
    prune = {"pattern": stage.pattern, "sparsity": stage.sparsity}
    out_f, in_f = planned.out_features, planned.in_features
    if planned.kind != "dense":  # a factored layer: prune its factors
        factors = planned.info.get("factors")
        if factors is None:
            # e.g. an energy-chosen rank: only N:M divisibility is unknown until the SVD
            PrunedLinear(in_f, 1, **prune, device="meta")
        else:
            for f_out, f_in in factors.values():
                PrunedLinear(f_in, f_out, **prune, device="meta")
        return Planned(planned.kind, out_f, in_f, {**planned.info, "factors_compressed": True})
    PrunedLinear(in_f, out_f, **prune, device="meta")
    return Planned("prune", out_f, in_f)
