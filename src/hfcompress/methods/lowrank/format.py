"""The on-disk state of a low-rank layer: its factors under their own names, and the marker.

``<p>.u.weight`` [out, r] (+ ``<p>.u.bias``), ``<p>.v.weight`` [r, in]; a factor compressed by a
later stage is stored in that method's format (a pruned factor as values + bitmask). The saved
factors decide the rank on load, so a rank lowered in training is restored when resuming.

The spec (``config.json``) adds ``rank`` and, optionally, ``factors``: {``u``/``v``: the factor's
own spec, ``{"method": "dense", "source": "linear"}`` for a plain one}. ``LowRankLinear``
describes both to the checkpoint loader through the hooks of ``CompressedLayer``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from hfcompress.formats import drop_marker
from hfcompress.layers.base import SpecField, StoredTensor, is_positive_int
from hfcompress.methods.prune.format import BITMASK_SUFFIX

FACTOR_NAMES = ("u", "v")


def _is_factor_map(value: object) -> bool:
    return isinstance(value, dict) and set(value) <= set(FACTOR_NAMES)


SPEC_FIELDS: dict[str, SpecField] = {
    "rank": SpecField(is_positive_int, "a positive integer"),
    "factors": SpecField(
        _is_factor_map, f"a mapping with keys among {list(FACTOR_NAMES)}", required=False
    ),
}


def factor_spec_error(
    spec: Mapping[str, Any], name: str, factor_spec: Mapping[str, Any]
) -> str | None:
    """A factor's spec must be an nn.Linear's, and a compressed factor's in/out/bias those of
    the low-rank layer's factor ``name``: u maps rank → out_features and carries the layer's
    bias; v maps in_features → rank."""
    if factor_spec["source"] != "linear":
        return f"field 'source': a low-rank factor is an nn.Linear, got {factor_spec['source']!r}"
    if factor_spec["method"] == "dense":
        return None
    if name == "v" and factor_spec["bias"]:
        return "field 'bias' is true, but factor 'v' never has a bias"
    wanted = (
        {"in_features": "rank", "out_features": "out_features", "bias": "bias"}
        if name == "u"
        else {"in_features": "in_features", "out_features": "rank"}
    )
    for field, layer_field in wanted.items():
        if factor_spec[field] != spec[layer_field]:
            return (
                f"field {field!r} = {factor_spec[field]!r} disagrees with the low-rank "
                f"layer's field {layer_field!r} = {spec[layer_field]!r}"
            )
    return None


def plain_factor_tensor(path: str, local: str, tensor: torch.Tensor) -> StoredTensor:
    """A plain (nn.Linear) factor's tensor: the low-rank layer's own fields decide its shape."""
    if local == "bias":
        fields = ("bias", "out_features")
    else:
        fields = ("rank", "out_features" if path == "u" else "in_features")
    return StoredTensor(list(tensor.shape), "float", fields)


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
