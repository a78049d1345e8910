"""Checks of an hfcompress checkpoint against its config, before anything is rebuilt or loaded.

Every module spec is checked: known fields only, each of the right type, agreeing with the module
it replaces and with the tensors on disk (their safetensors headers: presence, dtype, shape;
nothing extra under the module's prefix; and each bitmask's set bits against the values stored
and the spec's pattern and sparsity). A disagreement is a ``CheckpointError`` naming the module or
tensor, the file and the field. ``hfcompress.serialization`` runs these checks from its quantizer.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from hfcompress.decompose.masks import parse_nm_pattern, unpack_bitmask
from hfcompress.decompose.patterns import UNSTRUCTURED, normalize_pattern
from hfcompress.errors import HfCompressError
from hfcompress.layers import (
    CompressedLayer,
    KroneckerLinear,
    LowRankLinear,
    PrunedLinear,
    dense_weight_of,
    registered_methods,
    source_kind,
)
from hfcompress.layers.base import SOURCE_KINDS
from hfcompress.methods.prune.format import BITMASK_SUFFIX

MARKER = "weight"  # the dense key that a low-rank / Kronecker module fills with an empty tensor
Header = tuple[str, list[int], str]  # a tensor's safetensors (dtype, shape, file)


class CheckpointError(HfCompressError, ValueError):
    """A compressed checkpoint that does not match its config: names the file, module or field."""


def _read_headers(files: Iterable[str]) -> dict[str, Header]:
    """Key -> (dtype, shape, file) for every tensor, from the safetensors headers only."""
    headers: dict[str, Header] = {}
    for file in files:
        if not str(file).endswith(".safetensors"):
            raise CheckpointError(
                f"{file}: hfcompress checkpoints load from safetensors only (never unpickled)"
            )
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    tensor_slice = handle.get_slice(key)
                    headers[key] = (tensor_slice.get_dtype(), tensor_slice.get_shape(), str(file))
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"{file}: unreadable safetensors file ({error})") from error
    return headers


# --- spec validation ------------------------------------------------------------------------------

_BASE_FIELDS = frozenset({"method", "in_features", "out_features", "bias", "source"})
# Exactly the keys each layer's ``to_spec`` writes (base fields + ``compression_params``, and
# LowRankLinear's ``factors``); ``module_spec`` writes {"method": "dense", "source"} for a
# plain factor. Optional: what ``from_spec`` can do without (an N:M sparsity, dense factors).
SPEC_FIELDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "prune": (_BASE_FIELDS | {"pattern"}, frozenset({"sparsity"})),
    "lowrank": (_BASE_FIELDS | {"rank"}, frozenset({"factors"})),
    "kronecker": (_BASE_FIELDS | {"a_shape", "terms"}, frozenset()),
    "dense": (frozenset({"method", "source"}), frozenset()),
}
FACTOR_NAMES = ("u", "v")


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


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


def _is_shape_pair(value: object) -> bool:
    return (
        isinstance(value, (list, tuple)) and len(value) == 2 and all(map(_is_positive_int, value))
    )


def _is_factor_map(value: object) -> bool:
    return isinstance(value, dict) and set(value) <= set(FACTOR_NAMES)


_FIELD_CHECKS: dict[str, tuple[Callable[[object], bool], str]] = {
    "method": (lambda v: isinstance(v, str), "a method name"),
    "in_features": (_is_positive_int, "a positive integer"),
    "out_features": (_is_positive_int, "a positive integer"),
    "bias": (lambda v: isinstance(v, bool), "true or false"),
    "source": (lambda v: isinstance(v, str) and v in SOURCE_KINDS, f"one of {list(SOURCE_KINDS)}"),
    "pattern": (_is_pattern, "'unstructured' or 'N:M' with 1 ≤ N < M"),
    "sparsity": (_is_fraction_or_null, "a number in [0, 1)"),
    "rank": (_is_positive_int, "a positive integer"),
    "factors": (_is_factor_map, f"a mapping with keys among {list(FACTOR_NAMES)}"),
    "a_shape": (_is_shape_pair, "[m1, n1], two positive integers"),
    "terms": (_is_positive_int, "a positive integer"),
}


def _spec_where(spec_name: str) -> str:
    """How messages name a module's spec in ``config.json``."""
    return f"config.json quantization_config.modules[{spec_name!r}]"


def check_spec(spec: object, where: str, *, factor: bool = False) -> None:
    """Check one layer spec's structure: a mapping, known keys only, each of the right type.

    ``where`` names the spec in messages. A low-rank spec's ``factors`` are checked too, and
    must agree with the layer (u: [rank → out] carrying the bias, v: [in → rank]). A method
    registered by other code than hfcompress's layers is only checked for being a mapping.

    Raises:
        CheckpointError: naming ``where`` and the offending field.
    """
    if not isinstance(spec, dict):
        raise CheckpointError(f"{where}: expected a layer spec mapping, got {spec!r}")
    method = spec.get("method")
    if not isinstance(method, str):
        raise CheckpointError(f"{where}: field 'method' missing or not a string ({method!r})")
    if method not in SPEC_FIELDS or (method == "dense" and not factor):
        if method in registered_methods():
            return  # a layer type from outside hfcompress: its own from_spec decides
        known = sorted(registered_methods()) + (["dense"] if factor else [])
        raise CheckpointError(f"{where}: field 'method': unknown method {method!r}; known {known}")
    required, optional = SPEC_FIELDS[method]
    unknown = sorted(set(spec) - required - optional, key=str)
    if unknown:
        raise CheckpointError(
            f"{where}: unknown field {unknown[0]!r} in a {method!r} spec "
            f"(accepted: {sorted(required | optional)})"
        )
    missing = sorted(required - set(spec))
    if missing:
        raise CheckpointError(f"{where}: missing field {missing[0]!r} in a {method!r} spec")
    for field, value in spec.items():
        is_valid, wanted = _FIELD_CHECKS[field]
        if not is_valid(value):
            raise CheckpointError(f"{where}: field {field!r}: expected {wanted}, got {value!r}")
    if factor and spec["source"] != "linear":
        raise CheckpointError(
            f"{where}: field 'source': a low-rank factor is an nn.Linear, got {spec['source']!r}"
        )
    for name, factor_spec in spec.get("factors", {}).items():
        factor_where = f"{where}.factors[{name!r}]"
        check_spec(factor_spec, factor_where, factor=True)
        _check_factor_fits(spec, name, factor_spec, factor_where)


def _check_factor_fits(
    spec: dict[str, Any], name: str, factor_spec: dict[str, Any], where: str
) -> None:
    """A compressed factor's in/out/bias must be those of the low-rank layer's factor ``name``.

    u maps rank → out_features and carries the layer's bias; v maps in_features → rank.
    """
    if factor_spec["method"] == "dense" or factor_spec["method"] not in SPEC_FIELDS:
        return
    if name == "v" and factor_spec["bias"]:
        raise CheckpointError(f"{where}: field 'bias' is true, but factor 'v' never has a bias")
    wanted = (
        {"in_features": "rank", "out_features": "out_features", "bias": "bias"}
        if name == "u"
        else {"in_features": "in_features", "out_features": "rank"}
    )
    for field, layer_field in wanted.items():
        if factor_spec[field] != spec[layer_field]:
            raise CheckpointError(
                f"{where}: field {field!r} = {factor_spec[field]!r} disagrees with the low-rank "
                f"layer's field {layer_field!r} = {spec[layer_field]!r}"
            )


def _check_spec_fits_module(
    spec: dict[str, Any], dense: nn.Module, model: nn.Module, where: str
) -> None:
    """The spec's source and in/out features must be those of the module it replaces."""
    try:
        kind = source_kind(dense)
    except HfCompressError as error:
        raise CheckpointError(f"{where}: {error}") from error
    if spec.get("method") not in SPEC_FIELDS:
        return
    out_features, in_features = dense_weight_of(dense).shape
    model_values = {"source": kind, "in_features": in_features, "out_features": out_features}
    for field, value in model_values.items():
        if spec[field] != value:
            raise CheckpointError(
                f"{where}: field {field!r} = {spec[field]!r}, but the {type(model).__name__} "
                f"module it replaces has {field} {value!r}"
            )


# --- spec against the tensors on disk -------------------------------------------------------------

TensorKind = Literal["float", "bitmask", "marker"]


@dataclass(frozen=True)
class _Expected:
    """One checkpoint tensor a rebuilt layer needs."""

    shape: list[int] | None  # None: 1-D values whose length the bitmask decides
    kind: TensorKind
    fields: str  # the spec fields that decide it, for messages


@dataclass(frozen=True)
class _PrunedCheck:
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


def _factor_path(sub: str) -> str:
    """The spec path of a layer's submodule: ``""`` for the layer, ``.factors['u']`` for u."""
    return f".factors[{sub!r}]" if sub else ""


def _tensor_fields(sub: str, owner: nn.Module, local: str) -> str:
    """Which spec fields decide the tensor ``local`` of a layer's submodule ``sub``."""
    if type(owner) is nn.Linear:  # a plain low-rank factor: the low-rank layer's fields decide
        if local == "bias":
            return "bias, out_features"
        return "rank, " + ("out_features" if sub == "u" else "in_features")
    if local == "bias":
        fields = ["bias", "out_features"]
    elif isinstance(owner, PrunedLinear) and local == "weight":
        fields = ["pattern", "sparsity"]  # the values: as many as the bitmask keeps
    elif isinstance(owner, KroneckerLinear):
        fields = ["a_shape", "terms"] + (["in_features", "out_features"] if local == "B" else [])
    else:
        fields = ["in_features", "out_features"]
    path = _factor_path(sub).lstrip(".")
    return ", ".join(f"{path}.{field}" if path else field for field in fields)


def _expectations(name: str, layer: CompressedLayer) -> dict[str, _Expected]:
    """Checkpoint key -> what it must hold, for every tensor of one rebuilt layer."""
    modules = dict(layer.named_modules())
    expected: dict[str, _Expected] = {}
    for key, tensor in layer.state_dict().items():
        sub, _, local = key.rpartition(".")
        owner = modules[sub]
        if isinstance(owner, PrunedLinear) and local == "mask":
            expected[f"{name}.{key[: -len('mask')]}{BITMASK_SUFFIX}"] = _Expected(
                [owner.out_features, math.ceil(owner.in_features / 8)],
                "bitmask",
                _tensor_fields(sub, owner, BITMASK_SUFFIX),
            )
            continue
        values = isinstance(owner, PrunedLinear) and local == "weight"
        shape = None if values else list(tensor.shape)
        expected[f"{name}.{key}"] = _Expected(shape, "float", _tensor_fields(sub, owner, local))
    if isinstance(layer, (LowRankLinear, KroneckerLinear)):
        expected[f"{name}.{MARKER}"] = _Expected([0], "marker", "method")
    return expected


def expected_tensors(name: str, layer: CompressedLayer) -> dict[str, list[int] | None]:
    """Checkpoint keys of one rebuilt layer -> expected shape (None: 1-D, length unknown)."""
    return {key: want.shape for key, want in _expectations(name, layer).items()}


def _is_floating(dtype: str) -> bool:
    """Whether a safetensors dtype name (F16, BF16, F32, F8_E4M3, ...) is a floating type."""
    return dtype.startswith("F") or dtype == "BF16"


def _find_tensor(key: str, headers: dict[str, Header]) -> tuple[str, Header] | None:
    """The checkpoint key (and header) holding ``key``; it may carry a head's base-model prefix."""
    if key in headers:
        return key, headers[key]
    return next(((k, v) for k, v in headers.items() if k.endswith("." + key)), None)


def _keys_under(sorted_keys: list[str], prefix: str) -> list[str]:
    """The keys of ``sorted_keys`` that start with ``prefix`` (a binary search, not a scan)."""
    start = bisect.bisect_left(sorted_keys, prefix)
    end = start
    while end < len(sorted_keys) and sorted_keys[end].startswith(prefix):
        end += 1
    return sorted_keys[start:end]


def _check_header(key: str, want: _Expected, found: Header, where: str) -> None:
    """One tensor's dtype and shape against what the spec implies."""
    dtype, got, file = found
    if want.kind == "float" and not _is_floating(dtype):
        raise CheckpointError(
            f"{file}: tensor {key!r} has dtype {dtype}, expected a floating dtype "
            f"(F16, BF16, F32, ...) for {where}"
        )
    if want.kind == "bitmask" and dtype != "U8":
        raise CheckpointError(
            f"{file}: tensor {key!r} has dtype {dtype}, expected U8 (a packed bitmask) for {where}"
        )
    if (want.shape is None and len(got) != 1) or (want.shape is not None and got != want.shape):
        shape = "1-D values" if want.shape is None else str(want.shape)
        raise CheckpointError(
            f"{file}: tensor {key!r} has shape {got}, expected {shape} "
            f"(from {where} fields {want.fields})"
        )


def _extra_tensor_error(key: str, file: str, where: str) -> CheckpointError:
    hint = (
        "; a bias, but the spec's field 'bias' says there is none" if key.endswith(".bias") else ""
    )
    return CheckpointError(
        f"{file}: tensor {key!r} is not accounted for by {where}{hint} "
        "(an edited config.json, or tensors of another model?)"
    )


def _check_tensors(
    spec_name: str,
    layer: CompressedLayer,
    headers: dict[str, Header],
    sorted_keys: list[str],
) -> list[_PrunedCheck]:
    """Check a rebuilt layer against the checkpoint headers; return its bitmask checks to run.

    Every tensor the spec implies must be there, of the right dtype and shape, and nothing else
    may sit under the module's prefix.
    """
    where = f"quantization_config.modules[{spec_name!r}]"
    expected = _expectations(spec_name, layer)
    found: dict[str, tuple[str, Header]] = {}
    for key, want in expected.items():
        hit = _find_tensor(key, headers)
        if hit is None:
            field = " (its field 'bias' is true)" if key.endswith(".bias") else ""
            raise CheckpointError(
                f"checkpoint lacks tensor {key!r} for compressed module {spec_name!r}{field} "
                f"(config.json {where} describes it)"
            )
        _check_header(hit[0], want, hit[1], where)
        found[key] = hit
    some_key, (hit_key, _) = next(iter(found.items()))
    prefix = hit_key[: len(hit_key) - len(some_key)] + spec_name
    accounted = {k for k, _ in found.values()}
    for key in _keys_under(sorted_keys, prefix + "."):
        if key not in accounted:
            raise _extra_tensor_error(key, headers[key][2], where)
    return [
        _pruned_check(spec_name, sub, module, found)
        for sub, module in layer.named_modules()
        if isinstance(module, PrunedLinear)
    ]


def _pruned_check(
    spec_name: str, sub: str, module: PrunedLinear, found: dict[str, tuple[str, Header]]
) -> _PrunedCheck:
    prefix = f"{spec_name}.{sub}" if sub else spec_name
    values_key, (_, values_length, _) = found[f"{prefix}.{MARKER}"]
    bitmask_key, (_, _, bitmask_file) = found[f"{prefix}.{BITMASK_SUFFIX}"]
    return _PrunedCheck(
        where=f"quantization_config.modules[{spec_name!r}]{_factor_path(sub)}",
        values_key=values_key,
        values_length=values_length[0],
        bitmask_key=bitmask_key,
        bitmask_file=bitmask_file,
        out_features=module.out_features,
        in_features=module.in_features,
        pattern=module.pattern,
        sparsity=module.sparsity,
    )


# --- bitmask contents -----------------------------------------------------------------------------


def _popcount_bytes(packed: torch.Tensor) -> torch.Tensor:
    """Set bits of every byte of a uint8 tensor (SWAR: three shifts and masks, no table)."""
    x = packed - ((packed >> 1) & 0x55)
    x = (x & 0x33) + ((x >> 2) & 0x33)
    return (x + (x >> 4)) & 0x0F


def _nm_group_counts(packed: torch.Tensor, in_features: int, m: int) -> torch.Tensor:
    """Kept weights in every group of ``m`` consecutive inputs: [out, in / m]."""
    if m % 8 == 0:
        return _popcount_bytes(packed).view(packed.shape[0], -1, m // 8).sum(-1, dtype=torch.int32)
    if 8 % m == 0:
        fields = [_popcount_bytes((packed >> (m * i)) & ((1 << m) - 1)) for i in range(8 // m)]
        counts = torch.stack(fields, dim=-1).view(packed.shape[0], -1)
        return counts[:, : in_features // m]
    mask = unpack_bitmask(packed, in_features)
    return mask.view(mask.shape[0], -1, m).sum(-1, dtype=torch.int32)


def _check_bitmask(check: _PrunedCheck, packed: torch.Tensor) -> None:
    """A bitmask's set bits against the values stored and the pattern/sparsity of the spec."""
    file, key = check.bitmask_file, check.bitmask_key
    tail = check.in_features % 8
    if tail:
        stray = (packed[:, -1] >> tail) != 0
        if bool(stray.any()):
            row = int(stray.nonzero()[0])
            raise CheckpointError(
                f"{file}: tensor {key!r} sets bits beyond in_features={check.in_features} "
                f"(row {row}) of {check.where}"
            )
    kept = int(_popcount_bytes(packed).sum(dtype=torch.int64))
    if kept != check.values_length:
        raise CheckpointError(
            f"{file}: tensor {check.values_key!r} holds {check.values_length} values, but "
            f"{key!r} keeps {kept} weights (its set bits) for {check.where}"
        )
    numel = check.out_features * check.in_features
    if check.pattern == UNSTRUCTURED:
        # magnitude masks prune round(s·numel); per-row (Wanda, SparseGPT) or per-block
        # choices round once per row or block: allow one weight per row and per column.
        pruned, implied = numel - kept, check.sparsity * numel
        if abs(pruned - implied) > check.out_features + check.in_features:
            raise CheckpointError(
                f"{file}: tensor {key!r} prunes {pruned} of {numel} weights, but {check.where} "
                f"field 'sparsity' = {check.sparsity!r} implies about {round(implied)}"
            )
        return
    n, m = parse_nm_pattern(check.pattern)
    over = _nm_group_counts(packed, check.in_features, m) > n
    if bool(over.any()):
        row = int(over.any(dim=1).nonzero()[0])
        raise CheckpointError(
            f"{file}: tensor {key!r} keeps more than {n} of {m} weights in a group (row {row}), "
            f"which {check.where} field 'pattern' = {check.pattern!r} forbids"
        )


def _check_bitmasks(checks: list[_PrunedCheck]) -> None:
    """Read every pruned layer's bitmask (1 bit per weight, opened once per file) and check it."""
    by_file: dict[str, list[_PrunedCheck]] = {}
    for check in checks:
        by_file.setdefault(check.bitmask_file, []).append(check)
    for file, file_checks in by_file.items():
        try:
            with safe_open(file, framework="pt") as handle:
                for check in file_checks:
                    _check_bitmask(check, handle.get_tensor(check.bitmask_key))
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"{file}: unreadable safetensors file ({error})") from error
