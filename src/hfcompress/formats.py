"""What every compressed layer's on-disk state shares: the marker under the dense key.

A compressed module whose own tensors do not include ``<p>.weight`` (low rank stores
``u.weight``/``v.weight``, Kronecker ``A``/``B``) gets an empty ``<p>.weight`` marker when saved,
so that loading the checkpoint *without* ``import hfcompress`` fails with transformers' size
mismatch instead of silently building a dense model with random weights. Loading with
hfcompress drops the marker. Method-specific state (a pruned layer's bitmask) lives in
``hfcompress.methods.<name>.format``.
"""

from __future__ import annotations

import torch
from torch import nn

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
