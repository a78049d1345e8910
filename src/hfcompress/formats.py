"""What every compressed layer's on-disk state shares: the marker under the dense key.

A compressed module whose own tensors do not include ``<p>.weight`` (low rank stores
``u.weight``/``v.weight``, Kronecker ``A``/``B``) gets an empty ``<p>.weight`` marker when saved,
so that loading the checkpoint *without* ``import hfcompress`` fails with transformers' size
mismatch instead of silently building a dense model with random weights. Loading with
hfcompress drops the marker. Method-specific state (a pruned layer's bitmask) lives in
``hfcompress.methods.<name>.format``, described to the loader by the layer class (see
``hfcompress.layers.base.StoredTensor``); the packed-bitmask arithmetic its checks use is here.
"""

from __future__ import annotations

import torch
from torch import nn

from hfcompress.decompose.masks import unpack_bitmask

MARKER = "weight"  # the dense key a compressed layer without its own `weight` fills when saved


def marker_tensor() -> torch.Tensor:
    """The empty tensor saved under ``<p>.weight``."""
    return torch.zeros(0, dtype=torch.uint8)


def needs_marker(layer: nn.Module) -> bool:
    """Whether ``layer`` has no tensor of its own under the dense key (so it gets the marker)."""
    return MARKER not in layer._parameters and MARKER not in layer._buffers


def drop_marker(
    module: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str, *args: object
) -> None:
    """``load_state_dict`` pre-hook: drop the empty marker saved under ``<prefix>weight``."""
    marker = state_dict.get(prefix + MARKER)
    if marker is not None and marker.numel() == 0 and needs_marker(module):
        del state_dict[prefix + MARKER]


# --- packed bitmasks: uint8 [rows, ⌈cols/8⌉], bit j of byte b in row r is mask[r, 8b + j] ---------


def popcount_bytes(packed: torch.Tensor) -> torch.Tensor:
    """Set bits of every byte of a uint8 tensor (SWAR: three shifts and masks, no table)."""
    x = packed - ((packed >> 1) & 0x55)
    x = (x & 0x33) + ((x >> 2) & 0x33)
    return (x + (x >> 4)) & 0x0F


def nm_group_counts(packed: torch.Tensor, in_features: int, m: int) -> torch.Tensor:
    """Set bits in every group of ``m`` consecutive columns of a packed bitmask: [rows, in / m]."""
    if m % 8 == 0:
        return popcount_bytes(packed).view(packed.shape[0], -1, m // 8).sum(-1, dtype=torch.int32)
    if 8 % m == 0:
        fields = [popcount_bytes((packed >> (m * i)) & ((1 << m) - 1)) for i in range(8 // m)]
        counts = torch.stack(fields, dim=-1).view(packed.shape[0], -1)
        return counts[:, : in_features // m]
    mask = unpack_bitmask(packed, in_features)
    return mask.view(mask.shape[0], -1, m).sum(-1, dtype=torch.int32)
