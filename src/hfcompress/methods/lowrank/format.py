"""The on-disk state of a low-rank layer: its factors under their own names, and the marker.

``<p>.u.weight`` [out, r] (+ ``<p>.u.bias``), ``<p>.v.weight`` [r, in]; a factor compressed by a
later stage is stored in that method's format (a pruned factor as values + bitmask). The saved
factors decide the rank on load, so a rank lowered in training is restored when resuming.
"""

from __future__ import annotations

import torch
from torch import nn

from hfcompress.formats import drop_marker
from hfcompress.methods.prune.format import BITMASK_SUFFIX


def _saved_rank(state_dict: dict[str, torch.Tensor], prefix: str) -> int | None:
    """The rank of the factors in a state dict: V is [r, in], or its bitmask [r, ⌈in/8⌉]."""
    for key in (prefix + "v." + BITMASK_SUFFIX, prefix + "v.weight"):
        tensor = state_dict.get(key)
        if tensor is not None and tensor.ndim == 2:
            return int(tensor.shape[0])
    return None


def follow_saved_rank(
    module: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str, *args: object
) -> None:
    """Let ``load_state_dict`` restore a rank lowered in training (resuming a checkpoint).

    The saved factors decide the rank; the on-disk marker under the dense key is dropped.
    """
    drop_marker(module, state_dict, prefix)
    rank = _saved_rank(state_dict, prefix)
    if rank is not None and rank != module.rank:
        module.resize_rank_(rank)
