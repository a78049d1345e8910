"""The on-disk state of a pruned layer: non-zero values and a 1-bit-per-weight bitmask.

``<p>.weight`` = values [nnz] (1-D, the weight's dtype, row-major order) and
``<p>.weight_bitmask`` = uint8 [out, ⌈in/8⌉] (bit j of byte b in row r is mask[r, 8b + j]).
At 50% sparsity in fp32 that is 4·0.5 + 1/8 bytes per weight: 0.53× dense.

``PrunedLinear`` describes this format to the checkpoint loader through the hooks of
``CompressedLayer`` (``stored_tensor``, ``stored_form``, ``content_checks``), built here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial

import torch

from hfcompress.decompose.masks import pack_bitmask, unpack_bitmask
from hfcompress.decompose.patterns import UNSTRUCTURED, normalize_pattern, parse_nm_pattern
from hfcompress.errors import HfCompressError, InvalidParameterError
from hfcompress.formats import nm_group_counts, popcount_bytes
from hfcompress.layers.base import (
    ContentCheck,
    FoundTensor,
    SpecField,
    StoredForm,
    StoredTensor,
)

BITMASK_SUFFIX = "weight_bitmask"
FORMAT_VERSION = 1


def _is_pattern(value: object) -> bool:
    try:
        normalize_pattern(value)  # type: ignore[arg-type]
    except (HfCompressError, TypeError):
        return False
    return True


def _is_fraction_or_null(value: object) -> bool:
    if value is None:
        return True
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1


# The fields PrunedLinear.compression_params writes; an N:M layer's sparsity is implied.
SPEC_FIELDS: dict[str, SpecField] = {
    "pattern": SpecField(_is_pattern, "'unstructured' or 'N:M' with 1 ≤ N < M"),
    "sparsity": SpecField(_is_fraction_or_null, "a number in [0, 1)", required=False),
}


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


# --- what the checkpoint loader is told -----------------------------------------------------------


def stored_tensor(
    out_features: int, in_features: int, local: str
) -> tuple[str, StoredTensor] | None:
    """The stored name and header of a pruned layer's ``weight`` or ``mask`` (None: other)."""
    if local == "mask":
        shape = [out_features, math.ceil(in_features / 8)]
        return BITMASK_SUFFIX, StoredTensor(shape, "bitmask", ("in_features", "out_features"))
    if local == "weight":  # the values: as many as the bitmask keeps
        return local, StoredTensor(None, "float", ("pattern", "sparsity"))
    return None


def _decode(
    values: torch.Tensor, packed: torch.Tensor, name: str, *, in_features: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return sparse_decode(values, packed, in_features, name)


def stored_form(in_features: int) -> StoredForm:
    """(weight [out, in], mask) in memory <-> (values [nnz], bitmask [out, ⌈in/8⌉]) on disk."""
    return StoredForm(
        loaded=("weight", "mask"),
        stored=("weight", BITMASK_SUFFIX),
        encode=sparse_encode,
        decode=partial(_decode, in_features=in_features),
        needs=f"a pruned layer needs both 'weight' values and '{BITMASK_SUFFIX}'",
    )


@dataclass(frozen=True)
class BitmaskCheck:
    """What the bitmask of one pruned (sub)layer must agree with, read after the headers."""

    where: str
    values_key: str
    values_length: int
    bitmask_key: str
    bitmask_file: str
    out_features: int
    in_features: int
    pattern: str
    sparsity: float


def bitmask_check(
    found: Mapping[str, FoundTensor],
    where: str,
    *,
    out_features: int,
    in_features: int,
    pattern: str,
    sparsity: float,
) -> ContentCheck:
    """The check of a pruned layer's stored bitmask against its values and its spec."""
    values, bitmask = found["weight"], found[BITMASK_SUFFIX]
    check = BitmaskCheck(
        where=where,
        values_key=values.key,
        values_length=values.shape[0],
        bitmask_key=bitmask.key,
        bitmask_file=bitmask.file,
        out_features=out_features,
        in_features=in_features,
        pattern=pattern,
        sparsity=sparsity,
    )
    return ContentCheck(bitmask.file, bitmask.key, partial(bitmask_error, check))


def bitmask_error(check: BitmaskCheck, packed: torch.Tensor) -> str | None:
    """What is wrong with a bitmask's set bits (against the values stored, the pattern and
    sparsity of the spec), or None."""
    file, key = check.bitmask_file, check.bitmask_key
    tail = check.in_features % 8
    if tail:
        stray = (packed[:, -1] >> tail) != 0
        if bool(stray.any()):
            row = int(stray.nonzero()[0])
            return (
                f"{file}: tensor {key!r} sets bits beyond in_features={check.in_features} "
                f"(row {row}) of {check.where}"
            )
    kept = int(popcount_bytes(packed).sum(dtype=torch.int64))
    if kept != check.values_length:
        return (
            f"{file}: tensor {check.values_key!r} holds {check.values_length} values, but "
            f"{key!r} keeps {kept} weights (its set bits) for {check.where}"
        )
    numel = check.out_features * check.in_features
    if check.pattern == UNSTRUCTURED:
        # magnitude masks prune round(s·numel); per-row (Wanda, SparseGPT) or per-block
        # choices round once per row or block: allow one weight per row and per column.
        pruned, implied = numel - kept, check.sparsity * numel
        if abs(pruned - implied) > check.out_features + check.in_features:
            return (
                f"{file}: tensor {key!r} prunes {pruned} of {numel} weights, but {check.where} "
                f"field 'sparsity' = {check.sparsity!r} implies about {round(implied)}"
            )
        return None
    n, m = parse_nm_pattern(check.pattern)
    over = nm_group_counts(packed, check.in_features, m) > n
    if bool(over.any()):
        row = int(over.any(dim=1).nonzero()[0])
        return (
            f"{file}: tensor {key!r} keeps more than {n} of {m} weights in a group (row {row}), "
            f"which {check.where} field 'pattern' = {check.pattern!r} forbids"
        )
    return None
