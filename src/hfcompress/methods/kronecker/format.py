"""The on-disk state of a Kronecker layer: its factors under their own names, and the marker.

``<p>.A`` [k, m1, n1], ``<p>.B`` [k, m2, n2] (+ ``<p>.bias`` [out]), stored as in memory; the
spec (``config.json``) adds ``a_shape`` = [m1, n1] and ``terms`` = k, which with the layer's
in/out features decide both shapes. ``KroneckerLinear`` describes this to the checkpoint loader
through the hooks of ``CompressedLayer``.
"""

from __future__ import annotations

import torch

from hfcompress.layers.base import SpecField, StoredTensor, is_positive_int


def _is_shape_pair(value: object) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(map(is_positive_int, value))


SPEC_FIELDS: dict[str, SpecField] = {
    "a_shape": SpecField(_is_shape_pair, "[m1, n1], two positive integers"),
    "terms": SpecField(is_positive_int, "a positive integer"),
}


def factor_tensor(local: str, tensor: torch.Tensor) -> StoredTensor | None:
    """A (k, m1, n1) or B (k, out/m1, in/n1): the spec fields that decide their shapes."""
    if local == "A":
        return StoredTensor(list(tensor.shape), "float", ("a_shape", "terms"))
    if local == "B":
        fields = ("a_shape", "terms", "in_features", "out_features")
        return StoredTensor(list(tensor.shape), "float", fields)
    return None
