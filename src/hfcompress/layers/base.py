"""What every compressed layer shares: the dense boundary, the registry, the base class.

hfcompress layers always store weights in ``nn.Linear`` layout, W: [out, in]. GPT-2's
``transformers.pytorch_utils.Conv1D`` stores its weight transposed, [in, out]; it is transposed
once, here, when a layer is built, and transposed back by ``to_dense``.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, NamedTuple, TypeVar

import torch
from torch import nn
from torch.utils._pytree import tree_map
from transformers.pytorch_utils import Conv1D

from hfcompress.errors import (
    InvalidParameterError,
    RegistrationError,
    UnknownMethodError,
    UnsupportedModuleError,
)

SourceKind = Literal["linear", "conv1d"]
SOURCE_KINDS: tuple[SourceKind, ...] = ("linear", "conv1d")

_LAYER_REGISTRY: dict[str, type[CompressedLayer]] = {}

C = TypeVar("C", bound="CompressedLayer")


def register_layer_class(cls: type[C]) -> type[C]:
    """Register a layer class under its ``method`` class attribute (used to rebuild specs).

    ``hfcompress.registry.register_method`` calls this for the method's layers.

    Raises:
        HfCompressError: no ``method`` attribute, or the name is taken by another class.
    """
    method = getattr(cls, "method", None)
    if not isinstance(method, str):
        raise RegistrationError(f"{cls.__name__}: a layer class needs a `method: ClassVar[str]`")
    if _LAYER_REGISTRY.get(method, cls) is not cls:
        raise RegistrationError(
            f"method {method!r} is already registered to {_LAYER_REGISTRY[method].__name__}"
        )
    _LAYER_REGISTRY[method] = cls
    return cls


def unregister_layer_class(cls: type[CompressedLayer]) -> None:
    if _LAYER_REGISTRY.get(cls.method) is cls:
        del _LAYER_REGISTRY[cls.method]


def register_layer(method: str) -> Callable[[type[C]], type[C]]:
    """Class decorator: set ``cls.method`` and register the class for rebuilding from specs.

    A layer registered this way can be loaded from a checkpoint; to make it a recipe method,
    register a :class:`hfcompress.registry.Method` (which registers its layers itself).

    Raises:
        HfCompressError: the name is already taken.
    """

    def decorate(cls: type[C]) -> type[C]:
        if method in _LAYER_REGISTRY:
            raise RegistrationError(
                f"method {method!r} is already registered to {_LAYER_REGISTRY[method].__name__}"
            )
        cls.method = method
        return register_layer_class(cls)

    return decorate


def get_layer_class(method: str) -> type[CompressedLayer]:
    """The layer class registered as ``method``.

    Raises:
        HfCompressError: unknown name; the message lists the known ones.
    """
    try:
        return _LAYER_REGISTRY[method]
    except KeyError:
        raise UnknownMethodError(
            f"unknown method {method!r}; known methods: {sorted(_LAYER_REGISTRY)}"
        ) from None


def registered_methods() -> dict[str, type[CompressedLayer]]:
    """A copy of the registry: method name -> layer class."""
    return dict(_LAYER_REGISTRY)


def source_kind(module: nn.Module) -> SourceKind:
    """``"linear"`` or ``"conv1d"`` for a module hfcompress can compress.

    Raises:
        UnsupportedModuleError: any other module type.
    """
    if isinstance(module, Conv1D):
        return "conv1d"
    if isinstance(module, nn.Linear):
        return "linear"
    raise UnsupportedModuleError(
        f"module: expected torch.nn.Linear or transformers.pytorch_utils.Conv1D, "
        f"got {type(module).__module__}.{type(module).__qualname__}"
    )


def dense_weight_of(module: nn.Module) -> torch.Tensor:
    """W: [out, in] of a Linear, Conv1D or compressed layer (a view, not a copy, for dense)."""
    if isinstance(module, CompressedLayer):
        return module.dense_weight()
    weight = getattr(module, "weight", None)
    if callable(weight) and not isinstance(weight, torch.Tensor):
        return weight().dequantize()  # torch.ao's int8 Linear (hfcompress.quantize_int8)
    if source_kind(module) == "conv1d":
        return module.weight.T
    return module.weight


def make_dense(
    weight: torch.Tensor, bias: torch.Tensor | None, source: SourceKind
) -> nn.Linear | Conv1D:
    """A new ``nn.Linear`` or ``Conv1D`` holding W: [out, in] and the bias, on W's device/dtype."""
    out_features, in_features = weight.shape
    if source == "conv1d":
        dense = Conv1D(nf=out_features, nx=in_features)
        dense.to(device=weight.device, dtype=weight.dtype)
        dense.weight.data = weight.detach().T.contiguous().clone()
        if bias is None:
            # Conv1D always has a bias; a compressed layer built from one always keeps it.
            raise InvalidParameterError("a Conv1D needs a bias; this layer has none")
        dense.bias.data = bias.detach().clone()
        return dense
    dense = nn.Linear(
        in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype
    )
    dense.weight.data = weight.detach().contiguous().clone()
    if bias is not None:
        dense.bias.data = bias.detach().clone()
    return dense


def is_positive_int(value: object) -> bool:
    """Whether ``value`` is an int ≥ 1 (a bool is not)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


# --- the on-disk state format a layer class provides ----------------------------------------------
# The checkpoint loader (hfcompress.checkpoint_checks, hfcompress.serialization) names no method:
# it asks each layer class for these descriptions. The defaults fit a layer whose tensors are
# stored as they are in memory.


@dataclass(frozen=True)
class SpecField:
    """One method-specific field of a layer spec (``config.json`` ``quantization_config``).

    Attributes:
        check: whether a JSON value is valid for the field.
        wanted: what a valid value is, for messages ("a positive integer").
        required: whether ``from_spec`` needs it (an optional one may be absent).
    """

    check: Callable[[object], bool]
    wanted: str
    required: bool = True


TensorKind = Literal["float", "bitmask", "marker"]


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a layer's on-disk state, as its safetensors header must describe it.

    Attributes:
        shape: its shape; None for 1-D values whose length another tensor decides.
        kind: ``"float"`` (any floating dtype), ``"bitmask"`` (uint8, packed bits) or
            ``"marker"`` (the empty tensor under the dense key; any dtype).
        fields: the spec fields that decide it, named in messages.
    """

    shape: list[int] | None
    kind: TensorKind
    fields: tuple[str, ...]


class FoundTensor(NamedTuple):
    """A tensor the checkpoint holds, from its safetensors header only."""

    key: str  # the checkpoint's key (it may carry a head's base-model prefix)
    dtype: str  # safetensors dtype name: F32, BF16, U8, ...
    shape: list[int]
    file: str


@dataclass(frozen=True)
class ContentCheck:
    """A check of one stored tensor's values, run once every header agrees.

    ``check(tensor)`` returns the error message (naming ``file`` and ``key``), or None.
    """

    file: str
    key: str
    check: Callable[[torch.Tensor], str | None]


@dataclass(frozen=True)
class StoredForm:
    """A layer's own tensors that are stored in another form on disk than in memory.

    Attributes:
        loaded: their local names in memory, e.g. ``("weight", "mask")``.
        stored: their local names on disk, e.g. ``("weight", "weight_bitmask")``.
        encode: loaded tensors (in ``loaded`` order) -> stored tensors (in ``stored`` order).
        decode: (stored tensors, module name for messages) -> loaded tensors. Plain functions
            or ``functools.partial`` (transformers deep-copies the converter holding them).
        needs: what a checkpoint lacking some stored tensor is told, e.g. "a pruned layer needs
            both 'weight' values and 'weight_bitmask'".
    """

    loaded: tuple[str, ...]
    stored: tuple[str, ...]
    encode: Callable[..., tuple[torch.Tensor, ...]]
    decode: Callable[..., tuple[torch.Tensor, ...]]
    needs: str


@dataclass(frozen=True)
class Planned:
    """What a module would be at some point of a recipe, as validation sees it.

    Attributes:
        kind: ``"dense"`` or the method whose layer it is.
        out_features, in_features: its dense shape.
        info: what the method that made it tells later stages: ``factors`` {name: (out, in)}
            for a factored layer (None while unknown, as for an energy-chosen rank), and
            ``factors_compressed`` once a later stage compressed them.
    """

    kind: str
    out_features: int
    in_features: int
    info: Mapping[str, Any] = field(default_factory=dict)


class CompressedLayer(nn.Module, metaclass=ABCMeta):
    """Base of ``PrunedLinear``, ``LowRankLinear`` and ``KroneckerLinear``.

    Each stands in for an ``nn.Linear`` or ``Conv1D`` computing y = x·Wᵀ + b with
    W: [out, in], and remembers which of the two it replaced (``source``) so ``to_dense``
    gives back the same class and layout.
    """

    method: ClassVar[str]
    in_features: int
    out_features: int
    source: SourceKind

    def _init_common(self, in_features: int, out_features: int, source: SourceKind) -> None:
        if source not in SOURCE_KINDS:
            raise InvalidParameterError(f"source={source!r}: expected one of {SOURCE_KINDS}")
        self.in_features = in_features
        self.out_features = out_features
        self.source = source

    @classmethod
    @abstractmethod
    def from_module(cls, module: nn.Module, **params: object) -> CompressedLayer:
        """Build the compressed layer from an ``nn.Linear`` or ``Conv1D``."""

    @abstractmethod
    def dense_weight(self) -> torch.Tensor:
        """The effective W: [out, in] this layer computes with (materialized; not for forward)."""

    @abstractmethod
    def dense_bias(self) -> torch.Tensor | None:
        """The bias b: [out], or None."""

    @abstractmethod
    def compression_params(self) -> dict[str, object]:
        """The parameters that rebuild this layer's structure (rank, a_shape, pattern, ...)."""

    def to_spec(self) -> dict[str, object]:
        """JSON-compatible description of this layer's structure (no weights).

        ``layer_from_spec`` rebuilds an uninitialized layer of the same structure from it, which
        is what loading a checkpoint does before the weights arrive.
        """
        return {
            "method": self.method,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.dense_bias() is not None,
            "source": self.source,
            **self.compression_params(),
        }

    @classmethod
    @abstractmethod
    def from_spec(
        cls, spec: dict[str, object], device: torch.device | str | None, dtype: torch.dtype | None
    ) -> CompressedLayer:
        """An uninitialized layer with the structure ``spec`` describes (see ``to_spec``)."""

    def to_dense(self) -> nn.Linear | Conv1D:
        """The module type and layout that went in, holding W = ``dense_weight()`` and the bias."""
        with torch.no_grad():
            return make_dense(self.dense_weight(), self.dense_bias(), self.source)

    def dense_param_count(self) -> int:
        """Parameters of the dense module this layer replaces: out·in (+ out for a bias)."""
        bias = self.out_features if self.dense_bias() is not None else 0
        return self.out_features * self.in_features + bias

    def nonzero_param_count(self) -> int:
        """Parameters that can be non-zero (masked entries excluded)."""
        return sum(int(p.numel()) for p in self.parameters())

    def planned(self) -> Planned:
        """What validation sees of this layer (see :class:`Planned`)."""
        factors = self.factors()
        info: dict[str, Any] = {}
        if factors:
            info["factors"] = {n: (f.out_features, f.in_features) for n, f in factors.items()}
            info["factors_compressed"] = any(
                isinstance(f, CompressedLayer) for f in factors.values()
            )
        return Planned(self.method, self.out_features, self.in_features, info)

    def factors(self) -> dict[str, nn.Module]:
        """The factor modules a later stage may compress in turn ({} if none; low rank: u, v)."""
        return {}

    def with_factors(self, factors: dict[str, nn.Module]) -> CompressedLayer:
        """A new layer of this structure holding ``factors`` (for layers that have factors)."""
        raise InvalidParameterError(f"{type(self).__name__} has no factors to replace")

    def report_settings(self) -> dict[str, object]:
        """The settings the compression report shows for this layer."""
        return dict(self.compression_params())

    # True while a layer is in an inference-only form that refuses training (a pruned layer
    # without its mask); the default freeze_ only stops gradients, so it stays False.
    frozen: bool = False

    def freeze_(self) -> None:
        """Put the layer in its inference form (``hfcompress.freeze``): no gradients."""
        self.requires_grad_(False)

    def unfreeze_(self) -> None:
        """Undo :meth:`freeze_`: the trainable form, with gradients."""
        self.requires_grad_(True)

    # --- on-disk state format (see SpecField, StoredTensor, StoredForm) ---

    spec_fields: ClassVar[Mapping[str, SpecField] | None] = None
    """The spec fields of this method besides the base ones (method, in_features,
    out_features, bias, source). None: the spec is not checked field by field (a layer type from
    outside hfcompress that does not declare them: its own ``from_spec`` decides)."""

    @classmethod
    def factor_spec_error(
        cls, spec: Mapping[str, Any], name: str, factor_spec: Mapping[str, Any]
    ) -> str | None:
        """What is wrong with the (field-checked) spec of factor ``name`` of a (field-checked)
        layer spec, or None. Only a layer with ``factors`` in its spec has any."""
        return None

    def stored_tensor(
        self, path: str, local: str, tensor: torch.Tensor
    ) -> tuple[str, StoredTensor]:
        """How the checkpoint stores ``local`` of this layer's submodule ``path`` ("": itself).

        Called for the layer's own state-dict tensors and those of plain (non-compressed)
        submodules; a compressed submodule describes its own. Returns the stored name, relative
        to the submodule, and what it must hold. Default: as in memory, a floating tensor of
        the same shape.
        """
        fields = ("bias", "out_features") if local == "bias" else ("in_features", "out_features")
        return local, StoredTensor(list(tensor.shape), "float", fields)

    def stored_form(self) -> StoredForm | None:
        """This layer's own tensors stored in another form on disk (None: all as in memory)."""
        return None

    def encode_state(self, state: dict[str, torch.Tensor], name: str) -> None:
        """Put this layer's own tensors of a model state dict in their on-disk form, in place.

        ``name`` is the layer's module name (keys ``<name>.<local>``). A loaded tensor the state
        dict lacks (not resident, as a frozen pruned layer's mask) is read from the attribute.
        The stored tensors are appended in ``stored_form().stored`` order.
        """
        form = self.stored_form()
        if form is None:
            return
        prefix = f"{name}." if name else ""
        loaded = [state.pop(prefix + local, None) for local in form.loaded]
        loaded = [
            getattr(self, local) if t is None else t
            for local, t in zip(form.loaded, loaded, strict=True)
        ]
        for local, tensor in zip(form.stored, form.encode(*loaded), strict=True):
            state[prefix + local] = tensor

    def content_checks(self, found: Mapping[str, FoundTensor], where: str) -> list[ContentCheck]:
        """Checks of stored values (beyond their headers) to run before anything loads.

        ``found``: this layer's stored local names (as :meth:`stored_tensor` gives them) -> the
        checkpoint's tensor; ``where`` names the layer's spec in messages. Default: none.
        """
        return []


def count_parameters(module: nn.Module) -> int:
    """Parameters of a module that can be non-zero: a compressed layer's masked entries excluded.

    The one parameter count of hfcompress (reports, planner, evaluation). Shared tensors are
    counted once.
    """
    seen: set[int] = set()
    total = 0

    def visit(m: nn.Module) -> None:
        nonlocal total
        if isinstance(m, CompressedLayer):
            ids = {id(p) for p in m.parameters()}
            if not ids & seen:
                seen.update(ids)
                total += m.nonzero_param_count()
            return
        for p in m.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        for child in m.children():
            visit(child)

    visit(module)
    return total


class LazyWeight(torch.Tensor):
    """A compressed layer's dense W: [out, in] that costs nothing until its values are used.

    Reading ``dtype``, ``shape``, ``device`` (what HF code such as T5's feed-forward does on
    every forward) touches no data: the tensor is a stride-0 view of one element. Any other
    operation computes W with ``compute()`` and runs on that, so values are always right.
    """

    _compute: Callable[[], torch.Tensor]

    @staticmethod
    def __new__(
        cls, compute: Callable[[], torch.Tensor], shape: tuple[int, int], like: torch.Tensor
    ) -> LazyWeight:
        base = torch.empty((), dtype=like.dtype, device=like.device).expand(shape)
        tensor = torch.Tensor._make_subclass(cls, base, False)
        tensor._compute = compute
        return tensor

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _METADATA:
            args, kwargs = tree_map(_materialize, (args, kwargs))
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


def _materialize(value: object) -> object:
    return value._compute() if isinstance(value, LazyWeight) else value


# Tensor attributes and methods that read metadata only: answered without computing W.
_METADATA = frozenset(
    {
        torch.Tensor.dtype.__get__,
        torch.Tensor.shape.__get__,
        torch.Tensor.device.__get__,
        torch.Tensor.ndim.__get__,
        torch.Tensor.layout.__get__,
        torch.Tensor.is_cuda.__get__,
        torch.Tensor.is_meta.__get__,
        torch.Tensor.requires_grad.__get__,
        torch.Tensor.size,
        torch.Tensor.dim,
        torch.Tensor.numel,
        torch.Tensor.element_size,
        torch.Tensor.is_floating_point,
        torch.Tensor.get_device,
    }
)


def module_spec(module: nn.Module) -> dict[str, object]:
    """``to_spec()`` of a compressed layer, ``{"method": "dense"}`` for a Linear/Conv1D."""
    if isinstance(module, CompressedLayer):
        return module.to_spec()
    source = source_kind(module)
    return {"method": "dense", "source": source}


def layer_from_spec(
    spec: dict[str, object],
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> CompressedLayer:
    """Rebuild an uninitialized compressed layer from ``to_spec()`` output.

    Raises:
        HfCompressError: unknown method, or a spec that does not describe a valid layer.
    """
    if not isinstance(spec, dict) or "method" not in spec:
        raise InvalidParameterError(f"layer spec: expected a mapping with 'method', got {spec!r}")
    cls = get_layer_class(str(spec["method"]))
    try:
        return cls.from_spec(spec, device, dtype)
    except (KeyError, TypeError) as error:
        raise InvalidParameterError(
            f"layer spec {spec!r}: missing or malformed field ({error})"
        ) from error
