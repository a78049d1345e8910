"""Compressed drop-in replacements for ``nn.Linear`` and GPT-2's ``Conv1D``, one file per type."""

from hfcompress.layers.base import (
    CompressedLayer,
    dense_weight_of,
    get_layer_class,
    layer_from_spec,
    make_dense,
    module_spec,
    register_layer,
    registered_methods,
    source_kind,
)
from hfcompress.layers.kronecker import KroneckerLinear
from hfcompress.layers.low_rank import LowRankLinear
from hfcompress.layers.pruned import PrunedLinear

__all__ = [
    "CompressedLayer",
    "KroneckerLinear",
    "LowRankLinear",
    "PrunedLinear",
    "dense_weight_of",
    "get_layer_class",
    "layer_from_spec",
    "make_dense",
    "module_spec",
    "register_layer",
    "registered_methods",
    "source_kind",
]
