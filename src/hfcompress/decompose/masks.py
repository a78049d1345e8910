"""Pruning masks: per-layer magnitude (unstructured) and N:M semi-structured.

Masks are boolean tensors of W's shape, ``True`` where a weight is kept. W is [out, in]
(``nn.Linear`` layout); N:M groups run along the input dimension, which is what sparse tensor
cores (2:4 on Ampere and later) accelerate.
"""

from __future__ import annotations

import math

import torch

from hfcompress.decompose.patterns import parse_nm_pattern
from hfcompress.errors import InvalidParameterError


def _check_sparsity(sparsity: float) -> None:
    if (
        isinstance(sparsity, bool)
        or not isinstance(sparsity, (int, float))
        or not 0.0 <= sparsity < 1.0
    ):
        raise InvalidParameterError(
            f"sparsity={sparsity!r}: expected a fraction of weights to prune in [0, 1)"
        )


def pruned_count(numel: int, sparsity: float) -> int:
    """How many of ``numel`` weights a ``sparsity`` prunes: round(sparsity·numel)."""
    _check_sparsity(sparsity)
    return min(round(sparsity * numel), numel - 1)


def magnitude_mask(W: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the largest-magnitude weights of the layer, pruning round(sparsity·numel) of them.

    Args:
        W: weight of any shape.
        sparsity: fraction of weights to prune, in [0, 1).

    Returns:
        Boolean mask of W's shape with exactly ``numel − round(sparsity·numel)`` ``True``
        entries; every kept |w| is ≥ every pruned |w| (ties broken by ``torch.topk``).
    """
    n_keep = W.numel() - pruned_count(W.numel(), sparsity)
    scores = W.detach().abs().float().flatten()
    keep = torch.topk(scores, n_keep, largest=True, sorted=False).indices
    mask = torch.zeros(W.numel(), dtype=torch.bool, device=W.device)
    mask[keep] = True
    return mask.view_as(W)


def _check_nm(n: int, m: int) -> None:
    parse_nm_pattern(f"{n}:{m}")


def nm_mask(W: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the N largest-magnitude weights in every group of M consecutive inputs.

    Args:
        W: [out, in] weight; ``in`` must be divisible by M.
        n: weights kept per group, 1 ≤ N < M.
        m: group size along the input dimension.

    Returns:
        Boolean mask of W's shape with exactly N ``True`` entries per group; its sparsity is
        1 − N/M.

    Raises:
        InvalidParameterError: N ≥ M, or the input dimension is not a multiple of M.
    """
    _check_nm(n, m)
    if W.ndim != 2 or W.shape[1] % m:
        raise InvalidParameterError(
            f"N:M pattern {n}:{m}: expected a 2-D weight [out, in] with in divisible by {m}, "
            f"got shape {tuple(W.shape)}"
        )
    groups = W.detach().abs().float().reshape(-1, m)
    keep = torch.topk(groups, n, dim=1, largest=True, sorted=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(1, keep, True)
    return mask.view_as(W)


def pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    """bool [out, in] -> uint8 [out, ⌈in/8⌉]; bit j of byte b holds column 8b + j.

    The on-disk form of a pruning mask: 1 bit per weight instead of a byte.
    """
    out_features, in_features = mask.shape
    n_bytes = math.ceil(in_features / 8)
    padded = torch.zeros(out_features, n_bytes * 8, dtype=torch.uint8, device=mask.device)
    padded[:, :in_features] = mask
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=mask.device)
    return (padded.view(out_features, n_bytes, 8) * weights).sum(-1, dtype=torch.uint8)


def unpack_bitmask(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """uint8 [out, ⌈in/8⌉] -> bool [out, in], the inverse of :func:`pack_bitmask`."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = ((packed.unsqueeze(-1) >> shifts) & 1).reshape(packed.shape[0], -1).bool()
    return bits[:, :in_features].contiguous()
