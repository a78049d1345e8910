"""The on-disk state of a pruned layer: non-zero values and a 1-bit-per-weight bitmask.

``<p>.weight`` = values [nnz] (1-D, the weight's dtype, row-major order) and
``<p>.weight_bitmask`` = uint8 [out, ⌈in/8⌉] (bit j of byte b in row r is mask[r, 8b + j]).
At 50% sparsity in fp32 that is 4·0.5 + 1/8 bytes per weight: 0.53× dense.
"""

from __future__ import annotations

import math

import torch

from hfcompress.decompose.masks import pack_bitmask, unpack_bitmask
from hfcompress.errors import InvalidParameterError

BITMASK_SUFFIX = "weight_bitmask"
FORMAT_VERSION = 1


def sparse_encode(weight: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [out, in], mask) -> (values [nnz] in row-major order, packed bitmask)."""
    return weight.detach()[mask].contiguous(), pack_bitmask(mask)


def sparse_decode(
    values: torch.Tensor, packed: torch.Tensor, in_features: int, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, packed bitmask) -> (W [out, in] with zeros where pruned, mask)."""
    if (
        packed.dtype != torch.uint8
        or packed.ndim != 2
        or packed.shape[1] != math.ceil(in_features / 8)
    ):
        raise InvalidParameterError(
            f"{name}.{BITMASK_SUFFIX}: expected uint8 [out, {math.ceil(in_features / 8)}], "
            f"got {packed.dtype} {list(packed.shape)}"
        )
    mask = unpack_bitmask(packed, in_features)
    if values.ndim != 1 or values.numel() != int(mask.sum()):
        raise InvalidParameterError(
            f"{name}.weight: expected {int(mask.sum())} values (the bitmask's set bits), "
            f"got shape {list(values.shape)}"
        )
    weight = values.new_zeros(mask.shape)
    weight[mask] = values
    return weight, mask


def accept_compact_weights(
    module: torch.nn.Module, state_dict: dict[str, torch.Tensor], prefix: str, *args: object
) -> None:
    """``load_state_dict`` accepts the on-disk form too: 1-D values + packed bitmask.

    ``Trainer(resume_from_checkpoint=...)`` loads a saved hfcompress checkpoint this way.
    """
    packed = state_dict.pop(prefix + BITMASK_SUFFIX, None)
    values = state_dict.get(prefix + "weight")
    if packed is None or values is None or values.ndim != 1:
        return
    weight, mask = sparse_decode(values, packed, module.in_features, prefix.rstrip("."))
    state_dict[prefix + "weight"] = weight
    state_dict[prefix + "mask"] = mask
