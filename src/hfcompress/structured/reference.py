"""How a model differs from what its own config would build: what a checkpoint must record.

After structured pruning, a model whose every layer has the same shapes is described by its
config alone (``intermediate_size``, ``num_hidden_layers``, ...): it saves as a plain
checkpoint that loads anywhere. Where shapes differ per layer, the differences are recorded in
``quantization_config`` and rebuilt when loading. Both are decided here, by building the
config's model on the meta device (no memory, no initialization) and comparing.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

from hfcompress.layers.base import CompressedLayer
from hfcompress.structured.edit import dense_weight, is_dense

# Module attributes a structured method may change, and the loader may have to set again.
SETTINGS = ("num_key_value_groups", "num_heads", "num_key_value_heads", "intermediate_size")


def reference_model(model: nn.Module) -> nn.Module | None:
    """``type(model)(config)`` on the meta device, without hfcompress's quantization_config."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return type(model)(config)
    except Exception:  # a model that cannot be rebuilt from its config records nothing
        return None


def _logical_shape(module: nn.Module) -> tuple[tuple[int, int], str, bool] | None:
    """(out, in), kind and bias of a dense module or the dense module a compressed layer is."""
    if isinstance(module, CompressedLayer):
        bias = getattr(module, "bias", None) is not None
        return (module.out_features, module.in_features), module.source, bias
    if is_dense(module):
        kind = "linear" if isinstance(module, nn.Linear) else "conv1d"
        return tuple(dense_weight(module).shape), kind, module.bias is not None
    return None


def structural_differences(
    model: nn.Module,
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Dense modules and module settings that differ from the config-built model.

    A compressed layer counts as the dense module it stands for (its spec records the rest).

    Returns:
        ``(shapes, settings)``: {module: {"kind": "linear"|"conv1d", "out", "in", "bias"}} for
        every Linear/Conv1D whose shape differs, and {module: {attribute: value}} for the
        :data:`SETTINGS` that differ. Both empty when the config describes the model.
    """
    reference = reference_model(model)
    if reference is None:
        return {}, {}
    ours = dict(model.named_modules())
    theirs = dict(reference.named_modules())
    shapes: dict[str, dict[str, Any]] = {}
    settings: dict[str, dict[str, Any]] = {}
    for name, module in ours.items():
        other = theirs.get(name)
        if other is None or _inside_compressed(name, ours):
            continue
        mine, ref = _logical_shape(module), _logical_shape(other)
        if mine is not None and ref is not None and mine[0] != ref[0]:
            (out_features, in_features), kind, bias = mine
            shapes[name] = {"kind": kind, "out": out_features, "in": in_features, "bias": bias}
        changed = {
            key: getattr(module, key)
            for key in SETTINGS
            if isinstance(getattr(module, key, None), int)
            and getattr(module, key) != getattr(other, key, None)
        }
        if changed:
            settings[name] = changed
    return shapes, settings


def _inside_compressed(name: str, modules: dict[str, nn.Module]) -> bool:
    """Whether ``name`` is a factor inside a compressed layer (``mlp.down_proj.u``)."""
    parts = name.split(".")
    return any(
        isinstance(modules.get(".".join(parts[:i])), CompressedLayer) for i in range(1, len(parts))
    )
