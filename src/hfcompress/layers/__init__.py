"""Compressed drop-in replacements for ``nn.Linear`` and GPT-2's ``Conv1D``.

What every layer shares lives in :mod:`hfcompress.layers.base`; each layer class lives with its
method (``hfcompress.methods.<name>.layer``) and is importable from here too.
"""

from __future__ import annotations

from typing import Any

from hfcompress.layers.base import (
    CompressedLayer,
    LazyWeight,
    count_parameters,
    dense_weight_of,
    get_layer_class,
    layer_from_spec,
    make_dense,
    module_spec,
    register_layer,
    registered_methods,
    source_kind,
)

# The built-in layers live with their methods, which import this package's base: resolved on
# first access so that importing ``hfcompress.layers.base`` from a method never cycles.
_METHOD_LAYERS = {
    "PrunedLinear": "hfcompress.methods.prune.layer",
    "LowRankLinear": "hfcompress.methods.lowrank.layer",
    "KroneckerLinear": "hfcompress.methods.kronecker.layer",
}

__all__ = [
    "CompressedLayer",
    "KroneckerLinear",
    "LazyWeight",
    "LowRankLinear",
    "PrunedLinear",
    "count_parameters",
    "dense_weight_of",
    "get_layer_class",
    "layer_from_spec",
    "make_dense",
    "module_spec",
    "register_layer",
    "registered_methods",
    "source_kind",
]


def __getattr__(name: str) -> Any:
    if name in _METHOD_LAYERS:
        import importlib

        return getattr(importlib.import_module(_METHOD_LAYERS[name]), name)
    raise AttributeError(f"module 'hfcompress.layers' has no attribute {name!r}")
