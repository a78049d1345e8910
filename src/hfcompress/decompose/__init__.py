"""Pure tensor math behind the compressed layers: no ``nn.Module`` here.

Every function computes in fp32 whatever the input dtype, and returns tensors in the input's
dtype and on its device, so a bf16 model on CUDA is decomposed accurately without leaving the GPU.
"""

from hfcompress.decompose.calibrated import (
    activation_svd_factors,
    fisher_svd_factors,
    scaled_nearest_kronecker,
    sparsegpt_prune,
    wanda_mask,
    wanda_scores,
    whitened_svd_factors,
)
from hfcompress.decompose.kronecker import (
    KroneckerShape,
    kron_rearrange,
    kronecker_error,
    kronecker_shapes,
    kronecker_sum,
    nearest_kronecker,
)
from hfcompress.decompose.masks import (
    magnitude_mask,
    nm_mask,
    pack_bitmask,
    parse_nm_pattern,
    unpack_bitmask,
)
from hfcompress.decompose.svd import (
    low_rank_error,
    rank_for_energy,
    rank_for_ratio,
    resolve_rank,
    svd_factors,
)

__all__ = [
    "KroneckerShape",
    "activation_svd_factors",
    "fisher_svd_factors",
    "kron_rearrange",
    "kronecker_error",
    "kronecker_shapes",
    "kronecker_sum",
    "low_rank_error",
    "magnitude_mask",
    "nearest_kronecker",
    "nm_mask",
    "pack_bitmask",
    "parse_nm_pattern",
    "rank_for_energy",
    "rank_for_ratio",
    "resolve_rank",
    "scaled_nearest_kronecker",
    "sparsegpt_prune",
    "svd_factors",
    "unpack_bitmask",
    "wanda_mask",
    "wanda_scores",
    "whitened_svd_factors",
]
