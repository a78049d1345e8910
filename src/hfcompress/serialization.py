"""Compressed checkpoints through the ordinary ``save_pretrained`` / ``from_pretrained``.

Integration goes through transformers' public quantizer extension points only:
``register_quantization_config`` and ``register_quantizer`` under the name ``"hfcompress"``.

* ``config.json`` carries ``quantization_config = {"quant_method": "hfcompress",
  "format_version", "hfcompress_version", "modules": {name: layer spec}}``.
* Tensors keep the compressed modules' own names (``mlp.c_fc.u.weight``, ``o_proj.A``), except
  where a layer class stores some in another form (``CompressedLayer.stored_form``): pruned
  weights, stored compactly as their non-zero values and a bitmask:
  ``<p>.weight`` = values [nnz] (1-D, weight dtype, row-major order) and
  ``<p>.weight_bitmask`` = uint8 [out, ⌈in/8⌉] (bit j of byte b in row r is mask[r, 8b + j]).
  At 50% sparsity in fp32 that is 4·0.5 + 1/8 bytes per weight: 0.53× dense.
* A module without a tensor of its own under the dense key (``hfcompress.formats.needs_marker``:
  low rank, Kronecker) also gets an empty ``<p>.weight`` marker.

This module and ``hfcompress.checkpoint_checks`` name no method: each layer class describes its
on-disk state (spec fields, stored tensors, stored form, content checks; see
``hfcompress.layers.base``).

Why the dense key ``<p>.weight`` always holds something that cannot fit a dense layer: loading
without ``import hfcompress``, transformers only warns "Unknown quantization type, got
hfcompress" and would build a dense model with random weights. With the marker it raises a
size-mismatch error instead, right after that warning. With hfcompress imported, the quantizer
rebuilds the modules before the weights load, the values and bitmask are decoded by a
``WeightConverter``, and the markers are ignored.

Before anything is rebuilt or converted, every module spec is checked against the module it
replaces and the tensors on disk (``hfcompress.checkpoint_checks``), and every tensor's bytes
against the CRC-32 that ``save_pretrained`` recorded in the safetensors metadata
(``hfcompress_digests``; a checkpoint without it, from an older hfcompress, loads unverified).
A disagreement is a ``CheckpointError`` naming the module or tensor, the file and the field,
instead of a silent drop, an anonymous error from inside transformers' conversion, or a
silently different model.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import warnings
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import ConversionOps, WeightConverter
from transformers.pytorch_utils import Conv1D
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from hfcompress._version import __version__
from hfcompress.checkpoint_checks import (
    MARKER,
    SPEC_FIELDS,
    CheckpointError,
    Header,
    _check_spec_fits_module,
    _check_tensors,
    _nm_group_counts,
    _popcount_bytes,
    _read_headers,
    _run_content_checks,
    _spec_where,
    check_spec,
    expected_tensors,
)
from hfcompress.errors import HfCompressError
from hfcompress.formats import marker_tensor, needs_marker
from hfcompress.layers import CompressedLayer, layer_from_spec
from hfcompress.layers.base import ContentCheck, StoredForm
from hfcompress.structured.reference import SETTINGS
from hfcompress.surgery import (
    QUANT_METHOD,
    SPEC_FORMAT_VERSION,
    compression_spec,
    register_record_hook,
)

# The checks moved to hfcompress.checkpoint_checks; these names stay importable from here.
_REEXPORTED = (SPEC_FIELDS, Header, expected_tensors)
_REEXPORTED_PRIVATE = (_nm_group_counts, _popcount_bytes)  # tests use them

# --- stored forms: a layer's tensors on disk <-> in memory (CompressedLayer.stored_form) --------


class _StoredFormOp(ConversionOps):
    """A conversion between a layer's loaded tensors and their stored form (its ``StoredForm``)."""

    # Many sources to many targets. No ``hf_quantizer`` attribute on purpose: with one,
    # transformers would skip casting the values to the requested load dtype.
    supports_many_to_many = True

    def __init__(self, module_name: str, form: StoredForm) -> None:
        self.module_name = module_name
        self.form = form


class _DecodeStored(_StoredFormOp):
    """[<p>.<stored>...] -> {<p>.<loaded>...} (pruned: [values, bitmask] -> {weight, mask})."""

    def convert(
        self,
        input_dict: dict[str, list[torch.Tensor]],
        source_patterns: list[str] | None = None,
        target_patterns: list[str] | None = None,
        full_layer_name: str | None = None,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        stored = [input_dict.get(pattern) for pattern in source_patterns]
        if not all(stored):
            raise CheckpointError(
                f"{self.module_name}: {self.form.needs} in the checkpoint; "
                f"found {sorted(input_dict)}"
            )
        loaded = self.form.decode(*(tensors[0] for tensors in stored), self.module_name)
        prefix = full_layer_name.rpartition(".")[0]
        return {f"{prefix}.{local}": t for local, t in zip(self.form.loaded, loaded, strict=True)}

    @property
    def reverse_op(self) -> ConversionOps:
        return _EncodeStored(self.module_name, self.form)


class _EncodeStored(_StoredFormOp):
    """The reverse, used if transformers reverts conversions when saving a loaded model."""

    def convert(
        self,
        input_dict: dict[str, list[torch.Tensor]],
        source_patterns: list[str] | None = None,
        target_patterns: list[str] | None = None,
        full_layer_name: str | None = None,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        prefix = full_layer_name.rpartition(".")[0]
        loaded = [input_dict.get(pattern) for pattern in source_patterns]
        if not all(loaded[1:]):
            # Saving a loaded model: the quantizer's state dict is already in the on-disk form
            # (a pruned layer's 1-D values; its bitmask key does not match this converter and
            # passes through).
            return {f"{prefix}.{self.form.stored[0]}": loaded[0][0]}
        stored = self.form.encode(*(tensors[0] for tensors in loaded))
        return {f"{prefix}.{local}": t for local, t in zip(self.form.stored, stored, strict=True)}

    @property
    def reverse_op(self) -> ConversionOps:
        return _DecodeStored(self.module_name, self.form)


def _stored_form_converter(module_name: str, form: StoredForm) -> WeightConverter:
    """Decode ``<module>.<stored>...`` (a pruned layer: ``weight`` + ``weight_bitmask``) into
    ``<module>.<loaded>...`` (``weight`` and ``mask``).

    Sources match the module name after the start or a dot (a zero-width look-behind, so a
    checkpoint key carrying a head's base-model prefix still matches and keeps its prefix);
    transformers appends a word boundary, so ``weight`` never matches ``weight_bitmask``.
    Targets are literal names, which is how transformers uses them.
    """
    name = re.escape(module_name)
    boundary = r"(?<![^.])"
    return WeightConverter(
        source_patterns=[rf"{boundary}{name}\.{re.escape(local)}" for local in form.stored],
        target_patterns=[rf"{name}\.{re.escape(local)}" for local in form.loaded],
        operations=[_DecodeStored(module_name, form)],
    )


def _stored_forms(model: nn.Module) -> dict[str, StoredForm]:
    """Module name -> stored form, for every hfcompress layer (factors included) that has one."""
    forms = {
        name: module.stored_form()
        for name, module in model.named_modules()
        if isinstance(module, CompressedLayer)
    }
    return {name: form for name, form in forms.items() if form is not None}


def _marked_layers(model: nn.Module) -> list[str]:
    """Names of the hfcompress layers that save the empty marker under their dense key."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, CompressedLayer) and needs_marker(module)
    ]


# --- config and quantizer -------------------------------------------------------------------------


@register_quantization_config(QUANT_METHOD)
class HfCompressConfig(QuantizationConfigMixin):
    """``quantization_config`` of an hfcompress checkpoint: the per-module layer specs.

    Args:
        modules: {qualified module name: layer spec}, as ``CompressedLayer.to_spec()`` writes.
        format_version: the spec format; newer than this library reads is an error.
        hfcompress_version: the library version that wrote it (informational).
    """

    def __init__(
        self,
        modules: dict[str, dict[str, Any]] | None = None,
        format_version: int = SPEC_FORMAT_VERSION,
        hfcompress_version: str | None = None,
        shapes: dict[str, dict[str, Any]] | None = None,
        settings: dict[str, dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("quant_method", None)
        if kwargs:
            warnings.warn(
                f"quantization_config: ignoring unknown hfcompress keys {sorted(kwargs)} "
                "(written by a newer hfcompress?)",
                stacklevel=2,
            )
        if not isinstance(format_version, int) or format_version > SPEC_FORMAT_VERSION:
            raise CheckpointError(
                f"config.json quantization_config.format_version={format_version!r}: this "
                f"hfcompress {__version__} reads format ≤ {SPEC_FORMAT_VERSION}; upgrade hfcompress"
            )
        if not isinstance(modules, dict):
            raise CheckpointError(
                f"config.json quantization_config.modules: expected a mapping of module names "
                f"to layer specs, got {type(modules).__name__}"
            )
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.hfcompress_version = hfcompress_version or __version__
        self.modules = modules
        self.shapes = _checked_shapes(shapes)
        self.settings = _checked_settings(settings)

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        for key in ("shapes", "settings"):
            if not data.get(key):
                data.pop(key, None)
        return data


def _checked_shapes(shapes: Any) -> dict[str, dict[str, Any]]:
    """``quantization_config.shapes``: {module: {kind, out, in, bias}} of structurally pruned
    Linear/Conv1D modules whose shapes the config cannot describe (per-layer widths)."""
    if shapes is None:
        return {}
    if not isinstance(shapes, dict):
        raise CheckpointError(
            f"config.json quantization_config.shapes: expected a mapping, got "
            f"{type(shapes).__name__}"
        )
    for name, shape in shapes.items():
        where = f"config.json quantization_config.shapes[{name!r}]"
        if not isinstance(shape, dict) or set(shape) != {"kind", "out", "in", "bias"}:
            raise CheckpointError(f"{where}: expected keys kind, out, in, bias; got {shape!r}")
        if shape["kind"] not in ("linear", "conv1d"):
            raise CheckpointError(
                f"{where}.kind: expected 'linear' or 'conv1d', got {shape['kind']!r}"
            )
        for key in ("out", "in"):
            value = shape[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise CheckpointError(f"{where}.{key}: expected a positive integer, got {value!r}")
        if not isinstance(shape["bias"], bool):
            raise CheckpointError(f"{where}.bias: expected true/false, got {shape['bias']!r}")
    return shapes


def _checked_settings(settings: Any) -> dict[str, dict[str, Any]]:
    """``quantization_config.settings``: {module: {attribute: int}} (per-layer head counts)."""
    if settings is None:
        return {}
    if not isinstance(settings, dict) or not all(
        isinstance(v, dict)
        and all(isinstance(x, int) and not isinstance(x, bool) for x in v.values())
        for v in settings.values()
    ):
        raise CheckpointError(
            "config.json quantization_config.settings: expected {module: {attribute: integer}}"
        )
    return settings


def _rebuild_shapes(model: nn.Module, config: HfCompressConfig) -> None:
    """Give the modules in ``config.shapes`` their recorded shapes and ``config.settings``
    their attributes, before the weights load (every entry is checked before any change)."""
    plan = []
    for spec_name, shape in config.shapes.items():
        name = _resolve(model, spec_name)
        old = model.get_submodule(name)
        if not isinstance(old, (nn.Linear, Conv1D)):
            raise CheckpointError(
                f"config.json quantization_config.shapes[{spec_name!r}]: the model's module is "
                f"a {type(old).__name__}, not a Linear/Conv1D"
            )
        plan.append((name, shape, old))
    attributes = []
    for spec_name, values in config.settings.items():
        name = _resolve(model, spec_name)
        unknown = set(values) - set(SETTINGS)
        if unknown:
            raise CheckpointError(
                f"config.json quantization_config.settings[{spec_name!r}]: unknown attributes "
                f"{sorted(unknown)}; known: {list(SETTINGS)}"
            )
        attributes.append((model.get_submodule(name), values))
    for name, shape, old in plan:
        weight = old.weight
        if shape["kind"] == "conv1d":
            new: nn.Module = Conv1D(nf=shape["out"], nx=shape["in"])
        else:
            new = nn.Linear(shape["in"], shape["out"], bias=shape["bias"], device="meta")
        new = new.to(device=weight.device, dtype=weight.dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    for module, values in attributes:
        for key, value in values.items():
            setattr(module, key, value)


def _resolve(model: nn.Module, name: str) -> str:
    """The model's own name for a module named ``name`` in the checkpoint (head prefixes differ)."""
    names = dict(model.named_modules())
    prefix = getattr(model, "base_model_prefix", "")
    for candidate in (name, name.removeprefix(prefix + "."), f"{prefix}.{name}"):
        if candidate in names:
            return candidate
    raise CheckpointError(
        f"config.json quantization_config.modules names {name!r}, which is not a module of "
        f"{type(model).__name__}"
    )


# --- integrity digests ----------------------------------------------------------------------------

DIGESTS_KEY = "hfcompress_digests"  # safetensors metadata: JSON {tensor key: CRC-32, 8 hex digits}
DIGEST_ALGORITHM_KEY = "hfcompress_digest"
DIGEST_ALGORITHM = "crc32"
VERIFY_ENV = "HFCOMPRESS_VERIFY_DIGESTS"  # "0": skip the digest check when loading


def digests_enabled() -> bool:
    """Whether loading verifies the recorded digests (on unless ``HFCOMPRESS_VERIFY_DIGESTS=0``)."""
    return os.environ.get(VERIFY_ENV, "1").strip().lower() not in {"0", "false", "no", "off"}


def tensor_digest(tensor: torch.Tensor) -> str | None:
    """CRC-32 of a tensor's raw bytes, as safetensors writes them; None for a meta tensor."""
    if tensor.device.type == "meta":
        return None
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return f"{zlib.crc32(data):08x}"


def tensor_digests(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """Key -> digest for every tensor of a state dict that has data (offloaded ones have none)."""
    digests = {key: tensor_digest(tensor) for key, tensor in state.items()}
    return {key: digest for key, digest in digests.items() if digest is not None}


def _recorded_digests(file: str) -> dict[str, str] | None:
    """The digests in a safetensors file's metadata; None for a checkpoint written without."""
    try:
        with safe_open(file, framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{file}: unreadable safetensors file ({error})") from error
    raw = metadata.get(DIGESTS_KEY)
    algorithm = metadata.get(DIGEST_ALGORITHM_KEY, DIGEST_ALGORITHM)
    if raw is None:
        return None
    if algorithm != DIGEST_ALGORITHM:
        raise CheckpointError(
            f"{file}: metadata {DIGEST_ALGORITHM_KEY!r} = {algorithm!r}; this hfcompress "
            f"{__version__} verifies {DIGEST_ALGORITHM!r} only"
        )
    try:
        digests = json.loads(raw)
    except ValueError as error:
        raise CheckpointError(f"{file}: metadata {DIGESTS_KEY!r} is not JSON ({error})") from error
    if not isinstance(digests, dict) or not all(isinstance(v, str) for v in digests.values()):
        raise CheckpointError(f"{file}: metadata {DIGESTS_KEY!r} is not a mapping to hex strings")
    return digests


def _file_digests(file: str, keys: set[str]) -> dict[str, str]:
    """CRC-32 of the stored bytes of the tensors ``keys`` of a safetensors file (one mmap)."""
    found: dict[str, str] = {}
    with open(file, "rb") as stream, mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        length = int.from_bytes(mm[:8], "little")
        header = json.loads(mm[8 : 8 + length])
        with memoryview(mm) as view:
            for key in keys & header.keys():
                start, end = header[key]["data_offsets"]
                found[key] = f"{zlib.crc32(view[8 + length + start : 8 + length + end]):08x}"
    return found


def verify_digests(files: Iterable[str]) -> None:
    """Every tensor of the checkpoint against the digest ``save_pretrained`` recorded for it.

    Files without recorded digests (older hfcompress) are not verified. A tensor the digests do
    not list (renamed by a transformers weight conversion at save) is left to the other checks.

    Raises:
        CheckpointError: naming the file and the first tensor whose bytes changed since saving.
    """
    for file in map(str, files):
        recorded = _recorded_digests(file)
        if recorded is None:
            continue
        for key, digest in sorted(_file_digests(file, set(recorded)).items()):
            if digest != recorded[key]:
                raise CheckpointError(
                    f"{file}: tensor {key!r} does not match the digest recorded when it was saved "
                    f"({DIGEST_ALGORITHM} {recorded[key]}, now {digest}): the file was changed "
                    f"or damaged after saving (set {VERIFY_ENV}=0 to load it anyway)"
                )


@register_quantizer(QUANT_METHOD)
class HfCompressQuantizer(HfQuantizer):
    """Rebuilds hfcompress modules before ``from_pretrained`` loads their weights."""

    requires_calibration = True  # compressing happens in compress_model, never at load time

    def __init__(self, quantization_config: HfCompressConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self._converters: list[WeightConverter] = []

    def _process_model_before_weight_loading(
        self, model: nn.Module, checkpoint_files: list[str] | None = None, **kwargs: Any
    ) -> nn.Module:
        headers = _read_headers(checkpoint_files) if checkpoint_files else None
        sorted_keys = sorted(headers) if headers is not None else []
        dtype = torch.get_default_dtype()  # from_pretrained builds the model under the load dtype
        tied = {
            k
            for pair in (getattr(model, "all_tied_weights_keys", None) or {}).items()
            for k in pair
        }
        # structurally pruned shapes first: the layer specs are checked against them
        _rebuild_shapes(model, self.quantization_config)
        plan = []
        content_checks: list[ContentCheck] = []
        for spec_name, spec in self.quantization_config.modules.items():
            where = _spec_where(spec_name)
            check_spec(spec, where)
            name = _resolve(model, spec_name)
            dense = model.get_submodule(name)
            _check_spec_fits_module(spec, dense, model, where)
            if f"{name}.weight" in tied:
                raise CheckpointError(
                    f"{where}: its weight is tied; hfcompress never compresses tied weights"
                )
            try:
                layer = layer_from_spec(spec, dtype=dtype)
            except (HfCompressError, ValueError) as error:
                raise CheckpointError(f"{where}: {error}") from error
            if headers is not None:
                content_checks += _check_tensors(spec_name, layer, headers, sorted_keys)
            plan.append((name, layer))
        # before transformers converts anything: its errors would not name the tensor
        _run_content_checks(content_checks)
        if checkpoint_files and digests_enabled():
            verify_digests(checkpoint_files)
        # every spec checked: only now change the model
        for name, layer in plan:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        self._converters = [
            _stored_form_converter(name, form) for name, form in _stored_forms(model).items()
        ]
        markers = {re.escape(n) + r"\." + MARKER + "$" for n in _marked_layers(model)}
        model._keys_to_ignore_on_load_unexpected = (
            set(model._keys_to_ignore_on_load_unexpected or ()) | markers
        )
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        for hook in _LOAD_HOOKS:
            hook(model)
        return model

    def get_weight_conversions(self) -> list[WeightConverter]:
        return list(self._converters)

    def get_state_dict_and_metadata(
        self, model: nn.Module
    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        state = compact_state_dict(model)
        metadata = {
            "hfcompress_version": __version__,
            DIGEST_ALGORITHM_KEY: DIGEST_ALGORITHM,
            DIGESTS_KEY: json.dumps(tensor_digests(state), separators=(",", ":")),
        }
        return state, metadata

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        # compressed layers are ordinary trainable modules: Trainer may fine-tune them
        return True


def compact_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` in the on-disk form: each layer's ``encode_state`` (pruned
    weights as values + bitmask), then the markers.

    The order of the keys is that of the safetensors metadata's digests: the encoded tensors
    move to the end, layer by layer, then one marker per marked layer.
    """
    state = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, CompressedLayer):
            module.encode_state(state, name)
    for name in _marked_layers(model):
        state[f"{name}.{MARKER}"] = marker_tensor()
    return state


# Called with each model from_pretrained loads; later layers (the model card) register here, so
# that imports keep pointing one way.
_LOAD_HOOKS: list[Callable[[nn.Module], None]] = []


def register_load_hook(hook: Callable[[nn.Module], None]) -> None:
    """Run ``hook(model)`` on every hfcompress model ``from_pretrained`` has loaded."""
    if hook not in _LOAD_HOOKS:
        _LOAD_HOOKS.append(hook)


def attach_quantizer(model: nn.Module) -> None:
    """Make an in-memory compressed model save like a loaded one (compact sparse tensors)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "save_pretrained"):
        return
    spec = config.quantization_config
    if isinstance(spec, dict):
        spec = HfCompressConfig(**spec)
        config.quantization_config = spec
    model.hf_quantizer = HfCompressQuantizer(spec, pre_quantized=True)


register_record_hook(attach_quantizer)


def decompress(model: nn.Module) -> nn.Module:
    """Replace every hfcompress layer by the dense module it stands for, in place.

    The result is a plain transformers model (``nn.Linear`` / ``Conv1D`` in their original
    layouts, no ``quantization_config``) that saves and loads anywhere without hfcompress.
    Returns the model.
    """
    for name in list(compression_spec(model)):
        layer = model.get_submodule(name)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.to_dense())
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    return model


def is_hfcompress_checkpoint(path: str | Path) -> bool:
    """Whether ``path/config.json`` describes an hfcompress checkpoint."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    data = json.loads(config.read_text(encoding="utf-8"))
    return (data.get("quantization_config") or {}).get("quant_method") == QUANT_METHOD
