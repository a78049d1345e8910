"""Checks of an hfcompress checkpoint against its config, before anything is rebuilt or loaded.

Every module spec is checked: known fields only, each of the right type, agreeing with the module
it replaces and with the tensors on disk (their safetensors headers: presence, dtype, shape;
nothing extra under the module's prefix; and each bitmask's set bits against the values stored
and the spec's pattern and sparsity). A disagreement is a ``CheckpointError`` naming the module or
tensor, the file and the field. ``hfcompress.serialization`` runs these checks from its quantizer.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from safetensors import SafetensorError, safe_open
from torch import nn

from hfcompress.errors import HfCompressError
from hfcompress.formats import MARKER, needs_marker
from hfcompress.formats import nm_group_counts as _nm_group_counts
from hfcompress.formats import popcount_bytes as _popcount_bytes
from hfcompress.layers import (
    CompressedLayer,
    dense_weight_of,
    registered_methods,
    source_kind,
)
from hfcompress.layers.base import (
    SOURCE_KINDS,
    ContentCheck,
    FoundTensor,
    SpecField,
    StoredTensor,
    is_positive_int,
)

Header = tuple[str, list[int], str]  # a tensor's safetensors (dtype, shape, file)
# Kept importable from here (tests and older callers): the marker key, the bitmask arithmetic.
_REEXPORTED = (MARKER, _nm_group_counts, _popcount_bytes)


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
# ``module_spec`` writes {"method": "dense", "source"} for a plain factor.
_DENSE_FIELDS = frozenset({"method", "source"})

_BASE_CHECKS: dict[str, SpecField] = {
    "method": SpecField(lambda v: isinstance(v, str), "a method name"),
    "in_features": SpecField(is_positive_int, "a positive integer"),
    "out_features": SpecField(is_positive_int, "a positive integer"),
    "bias": SpecField(lambda v: isinstance(v, bool), "true or false"),
    "source": SpecField(
        lambda v: isinstance(v, str) and v in SOURCE_KINDS, f"one of {list(SOURCE_KINDS)}"
    ),
}


def _checked_fields() -> dict[str, dict[str, SpecField]]:
    """Method -> every field its spec may have (base + the layer class's ``spec_fields``), for
    the methods whose layer class declares them; ``"dense"`` for a plain factor."""
    table = {
        method: {**_BASE_CHECKS, **cls.spec_fields}
        for method, cls in registered_methods().items()
        if cls.spec_fields is not None
    }
    table["dense"] = {name: _BASE_CHECKS[name] for name in sorted(_DENSE_FIELDS)}
    return table


class _SpecFieldTable(Mapping[str, tuple[frozenset[str], frozenset[str]]]):
    """Method -> (required, optional) spec fields: exactly the keys each layer's ``to_spec``
    writes (base fields + ``compression_params`` + what the class adds). Optional: what
    ``from_spec`` can do without. Read from the registry on every use, so a method registered
    later (with ``spec_fields``) is checked too."""

    def __getitem__(self, method: str) -> tuple[frozenset[str], frozenset[str]]:
        fields = _checked_fields()[method]
        base = _DENSE_FIELDS if method == "dense" else _BASE_FIELDS
        required = base | {name for name, field in fields.items() if field.required}
        return frozenset(required), frozenset(set(fields) - required)

    def __iter__(self) -> Iterator[str]:
        return iter(_checked_fields())

    def __len__(self) -> int:
        return len(_checked_fields())


SPEC_FIELDS: Mapping[str, tuple[frozenset[str], frozenset[str]]] = _SpecFieldTable()


def _spec_where(spec_name: str) -> str:
    """How messages name a module's spec in ``config.json``."""
    return f"config.json quantization_config.modules[{spec_name!r}]"


def check_spec(spec: object, where: str) -> None:
    """Check one layer spec's structure: a mapping, known keys only, each of the right type.

    ``where`` names the spec in messages. The fields are those of the method's layer class
    (``CompressedLayer.spec_fields``); a spec's ``factors`` are checked too, and must agree
    with the layer (its class's ``factor_spec_error``). A method whose layer class declares no
    fields (registered by other code than hfcompress's layers) is only checked for being a
    mapping.

    Raises:
        CheckpointError: naming ``where`` and the offending field.
    """
    _check_spec(spec, where, None)


def _check_spec(
    spec: object, where: str, factor_of: tuple[type[CompressedLayer], dict, str] | None
) -> None:
    """``check_spec``; ``factor_of``: (layer class, layer spec, factor name) for a factor's spec."""
    if not isinstance(spec, dict):
        raise CheckpointError(f"{where}: expected a layer spec mapping, got {spec!r}")
    method = spec.get("method")
    if not isinstance(method, str):
        raise CheckpointError(f"{where}: field 'method' missing or not a string ({method!r})")
    table = _checked_fields()
    factor = factor_of is not None
    if method not in table or (method == "dense" and not factor):
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
    for name, value in spec.items():
        field = table[method][name]
        if not field.check(value):
            raise CheckpointError(
                f"{where}: field {name!r}: expected {field.wanted}, got {value!r}"
            )
    if factor_of is not None:
        layer_cls, layer_spec, factor_name = factor_of
        error = layer_cls.factor_spec_error(layer_spec, factor_name, spec)
        if error is not None:
            raise CheckpointError(f"{where}: {error}")
    factors = spec.get("factors", {})
    if factors:
        layer_cls = registered_methods()[method]
        for name, factor_spec in factors.items():
            _check_spec(factor_spec, f"{where}.factors[{name!r}]", (layer_cls, spec, name))


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


def _factor_path(sub: str) -> str:
    """The spec path of a layer's submodule: ``""`` for the layer, ``.factors['u']`` for u."""
    return f".factors[{sub!r}]" if sub else ""


def _describing_layer(modules: dict[str, nn.Module], sub: str) -> tuple[str, CompressedLayer]:
    """The compressed layer that describes the tensors of submodule ``sub``: the nearest one at
    or above it (a plain factor is described by the layer holding it)."""
    path = sub
    while not isinstance(modules[path], CompressedLayer):
        path = path.rpartition(".")[0]
    return path, modules[path]


def _expectations(name: str, layer: CompressedLayer) -> dict[str, StoredTensor]:
    """Checkpoint key -> what it must hold, for every tensor of one rebuilt layer.

    In state-dict order (the first disagreement is reported), the marker last. Fields are
    spec paths: ``factors['u'].pattern`` for a tensor a compressed factor describes.
    """
    modules = dict(layer.named_modules())
    expected: dict[str, StoredTensor] = {}
    for key, tensor in layer.state_dict().items():
        sub, _, local = key.rpartition(".")
        path, owner = _describing_layer(modules, sub)
        relative = sub[len(path) :].lstrip(".")
        stored_local, want = owner.stored_tensor(relative, local, tensor)
        spec_path = _factor_path(path).lstrip(".")
        fields = tuple(f"{spec_path}.{f}" if spec_path else f for f in want.fields)
        stored_key = f"{sub}.{stored_local}" if sub else stored_local
        expected[f"{name}.{stored_key}"] = StoredTensor(want.shape, want.kind, fields)
    if needs_marker(layer):
        expected[f"{name}.{MARKER}"] = StoredTensor([0], "marker", ("method",))
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


def _check_header(key: str, want: StoredTensor, found: Header, where: str) -> None:
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
            f"(from {where} fields {', '.join(want.fields)})"
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
) -> list[ContentCheck]:
    """Check a rebuilt layer against the checkpoint headers; return its content checks to run.

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
        check
        for sub, module in layer.named_modules()
        if isinstance(module, CompressedLayer)
        for check in module.content_checks(
            _found_under(found, f"{spec_name}.{sub}" if sub else spec_name),
            where + _factor_path(sub),
        )
    ]


def _found_under(found: dict[str, tuple[str, Header]], prefix: str) -> dict[str, FoundTensor]:
    """The found tensors under ``prefix``, by their name relative to it."""
    return {
        key[len(prefix) + 1 :]: FoundTensor(hit_key, dtype, shape, file)
        for key, (hit_key, (dtype, shape, file)) in found.items()
        if key.startswith(prefix + ".")
    }


# --- stored values --------------------------------------------------------------------------------


def _run_content_checks(checks: list[ContentCheck]) -> None:
    """Read each tensor the layers asked to check (each file opened once) and check it."""
    by_file: dict[str, list[ContentCheck]] = {}
    for check in checks:
        by_file.setdefault(check.file, []).append(check)
    for file, file_checks in by_file.items():
        try:
            with safe_open(file, framework="pt") as handle:
                for check in file_checks:
                    error = check.check(handle.get_tensor(check.key))
                    if error is not None:
                        raise CheckpointError(error)
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"{file}: unreadable safetensors file ({error})") from error
