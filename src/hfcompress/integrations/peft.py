"""PEFT LoRA on hfcompress layers: injection, ``"all-linear"``, merging into each form.

A plain ``LoraConfig`` fails on hfcompress layers ("Target module PrunedLinear is not supported"),
and its ``"all-linear"`` skips them (or puts LoRA on a low-rank layer's factors).
:func:`lora_config` / :func:`prepare_lora_config` register :class:`CompressedLoraLinear` for
every ``CompressedLayer`` through PEFT's custom-module API and expand ``"all-linear"`` to names
that include them.

LoRA (Hu et al., 2021) adds s·B·A·x, A: [r, in], B: [out, r], s = lora_alpha / r. Merging:

- ``lowrank``: exact; rank r + r_lora with U' = [U, s·B] and V' = [V; A].
- ``prune``: the mask is kept, W' = M ⊙ (W + s·B·A): sparsity kept, *not* exact.
- ``kronecker``: refused, naming the module (Σ Aₖ ⊗ Bₖ + s·B·A is not a Kronecker sum).
- :func:`merge_and_unload` with ``dense=[...]`` (or ``True``): a dense ``nn.Linear`` / ``Conv1D``
  holding W + s·B·A, exact for every form.

Example:
    >>> config = lora_config(model, r=8, lora_alpha=16, target_modules="all-linear")
    >>> peft_model = peft.get_peft_model(model, config)  # train, save_pretrained, load_adapter
    >>> merged = merge_and_unload(peft_model, dense=["kronecker"])
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from os import PathLike
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from hfcompress.errors import (
    HfCompressError,
    InvalidParameterError,
    MissingDependencyError,
    UnsupportedModuleError,
)
from hfcompress.layers.base import (
    CompressedLayer,
    dense_weight_of,
    get_layer_class,
    make_dense,
    registered_methods,
    source_kind,
)
from hfcompress.methods.kronecker.layer import KroneckerLinear
from hfcompress.methods.lowrank.layer import LowRankLinear
from hfcompress.methods.prune.layer import PrunedLinear
from hfcompress.serialization import decompress
from hfcompress.surgery import QUANT_METHOD, compression_spec, record_compression

try:
    from peft import LoraConfig, PeftConfig, PeftModel, TaskType
    from peft.tuners.lora.layer import Linear as _PeftLoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
except ImportError as error:
    raise MissingDependencyError(
        "hfcompress.integrations.peft needs PEFT: pip install peft"
    ) from error

if not hasattr(LoraConfig, "_register_custom_module"):
    raise MissingDependencyError(
        "hfcompress.integrations.peft needs a PEFT with LoraConfig._register_custom_module "
        "(custom LoRA layers): pip install -U peft"
    )

__all__ = [
    "CompressedLoraLinear",
    "LoraMergeError",
    "all_linear_names",
    "load_adapter",
    "lora_config",
    "merge_and_unload",
    "prepare_lora_config",
]

ALL_LINEAR = "all-linear"
# PEFT's SEQ_CLS_HEAD_NAMES: classifier heads "all-linear" leaves out of a classification model
SEQ_CLS_HEADS = ("score", "classifier")
# why a form cannot hold W + s·B·A (the error names the fix)
_NOT_MERGEABLE = {KroneckerLinear: "Σ Aₖ ⊗ Bₖ + s·B·A is not a sum of Kronecker products"}


class LoraMergeError(HfCompressError, ValueError):
    """A LoRA adapter cannot be merged into a compressed layer in its form; the message says why
    and how to merge into a dense layer instead."""


class CompressedLoraLinear(_PeftLoraLinear):
    """LoRA on an hfcompress layer: y = layer(x) + s·B·A·x.

    A: [r, in] (``lora_A[name].weight``), B: [out, r] (``lora_B[name].weight``) and
    s = lora_alpha / r (lora_alpha / √r with rsLoRA). Every hfcompress layer takes x: [..., in]
    and stores [out, in], also where it replaced a GPT-2 ``Conv1D``, so ``fan_in_fan_out`` plays
    no part here. PEFT builds this layer once it is registered through
    ``LoraConfig._register_custom_module``, which :func:`prepare_lora_config` does.

    Plain LoRA only: DoRA and the other variants, and every ``init_lora_weights`` but True, False
    and ``"gaussian"``, are refused. ``merge`` keeps the form (see the module docstring) or, with
    ``merge_dense``, replaces the base layer by a dense one; ``unmerge`` undoes either.

    Attributes:
        merge_dense: merge into a dense ``nn.Linear`` / ``Conv1D`` (:func:`merge_and_unload`).
        target_name: the module's qualified name, for messages.
    """

    merge_dense: bool = False
    target_name: str = ""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: LoraConfig,
        r: int = 0,
        lora_alpha: int = 1,
        **kwargs: Any,
    ) -> None:
        layer = base_layer
        if isinstance(base_layer, BaseTunerLayer):
            layer = base_layer.get_base_layer()
        if not isinstance(layer, CompressedLayer):
            raise UnsupportedModuleError(
                f"CompressedLoraLinear: expected an hfcompress CompressedLayer, got "
                f"{type(layer).__qualname__}"
            )
        super().__init__(base_layer, adapter_name, config, r=r, lora_alpha=lora_alpha, **kwargs)
        self.fan_in_fan_out = False
        # per merged adapter, in order: the form it went into and the layer a dense merge replaced
        self._merge_records: list[tuple[str, nn.Module | None]] = []

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    @property
    def lora_variants(self) -> dict[tuple[str, ...], None]:
        return {(): None}

    def resolve_lora_variant(self, **kwargs: Any) -> None:
        try:
            return super().resolve_lora_variant(**kwargs)
        except ValueError as error:
            raise InvalidParameterError(
                f"{self.target_name}: LoRA on an hfcompress layer supports plain LoRA only, not "
                f"DoRA or other variants ({error})"
            ) from error

    def update_layer(
        self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs: Any
    ) -> None:
        self.target_name = kwargs.get("target_name") or type(self.get_base_layer()).__name__
        init = config.init_lora_weights
        if not (init is True or init is False or init == "gaussian"):
            raise InvalidParameterError(
                f"{self.target_name}: init_lora_weights={init!r}: expected True, False or "
                "'gaussian' on an hfcompress layer (the other inits rewrite the base weight, "
                "which a compressed layer does not hold as one tensor)"
            )
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    # --- the delta ---------------------------------------------------------------------------

    def _factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A: [r, in], B: [out, r], s) of ``adapter``, in fp32."""
        A = self.lora_A[adapter].weight.detach().float()
        B = self.lora_B[adapter].weight.detach().float()
        return A, B, float(self.scaling[adapter])

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """s·B·A: [out, in], in the adapter's dtype (computed in fp32)."""
        A, B, s = self._factors(adapter)
        return (s * (B @ A)).to(self.lora_B[adapter].weight.dtype)

    def _bias_delta(self, adapter: str) -> torch.Tensor | None:
        """s·b_B with ``lora_bias``, else None."""
        if not self.lora_bias.get(adapter, False):
            return None
        return self.scaling[adapter] * self.lora_B[adapter].bias.detach().float()

    # --- merging -----------------------------------------------------------------------------

    def merge_form(self) -> str:
        """Where the next merge goes: ``"dense"``, ``"lowrank"`` or ``"prune"``.

        Raises:
            LoraMergeError: the form cannot hold W + s·B·A and ``merge_dense`` is off.
        """
        base = self.get_base_layer()
        if self.merge_dense or not isinstance(base, CompressedLayer):
            return "dense"
        if isinstance(base, PrunedLinear):
            return "prune"
        fix = (
            f"merge into a dense layer with hfcompress.integrations.peft.merge_and_unload(model, "
            f"dense=[{base.method!r}]), or keep the adapter unmerged"
        )
        if isinstance(base, LowRankLinear):
            if not (type(base.u) is nn.Linear and type(base.v) is nn.Linear):
                raise LoraMergeError(
                    f"{self.target_name}: this LowRankLinear's factors are "
                    f"{type(base.u).__name__}/{type(base.v).__name__}; appending LoRA's rank "
                    f"would not keep their structure; {fix}"
                )
            return "lowrank"
        reason = _NOT_MERGEABLE.get(type(base), f"W + s·B·A is not a {type(base).__name__}")
        raise LoraMergeError(
            f"{self.target_name}: a LoRA adapter cannot be merged into a {type(base).__name__} in "
            f"its form ({reason}); {fix}"
        )

    def check_mergeable(self, adapter_names: list[str] | None = None) -> None:
        """Raise :class:`LoraMergeError` if ``merge(adapter_names)`` would fail; change nothing."""
        names = self.active_adapters if adapter_names is None else adapter_names
        names = [n for n in names if n in self.lora_A and n not in self.merged_adapters]
        if not names:
            return
        form = self.merge_form()
        base = self.get_base_layer()
        if any(self._bias_delta(n) is not None for n in names) and base.bias is None:
            raise LoraMergeError(
                f"{self.target_name}: lora_bias=True, but the base layer has no bias to merge into"
            )
        if form == "lowrank":
            rank = base.rank + sum(self.r[n] for n in names)
            limit = min(base.out_features, base.in_features)
            if rank > limit:
                raise LoraMergeError(
                    f"{self.target_name}: merged rank r + r_lora = {rank} exceeds min(out, in) = "
                    f"{limit}; merge into a dense layer with hfcompress.integrations.peft."
                    "merge_and_unload(model, dense=['lowrank'])"
                )

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Merge the adapters into the base layer, in its form or dense (module docstring).

        Raises:
            LoraMergeError: the form cannot hold the merge (nothing is changed).
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        adapter_names = [n for n in adapter_names if n in self.lora_A]
        for adapter in adapter_names:
            self.check_mergeable([adapter])
            form = self.merge_form()
            replaced = _MERGE[form](self, adapter, safe_merge)
            self._merge_records.append((form, replaced))
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Take every merged adapter out of the base layer again, last merged first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            form, replaced = self._merge_records.pop()
            if replaced is not None:
                self.base_layer = replaced
            else:
                _MERGE[form](self, adapter, False, sign=-1)


def _finite(layer: CompressedLoraLinear, adapter: str, *tensors: torch.Tensor | None) -> None:
    if not all(t is None or bool(torch.isfinite(t).all()) for t in tensors):
        raise ValueError(
            f"{layer.target_name}: NaNs detected in the merged weights. The adapter {adapter} "
            "seems to be broken"
        )


def _plus_bias(layer: CompressedLoraLinear, adapter: str, bias, sign: int = 1):
    """bias ± s·b_B with ``lora_bias``, else bias itself."""
    delta = layer._bias_delta(adapter)
    return bias if delta is None else bias.detach() + sign * delta.to(bias)


def _merge_pruned(layer: CompressedLoraLinear, adapter: str, safe: bool, sign: int = 1) -> None:
    """W ← W ± M ⊙ (s·B·A) in place: with W zero off the mask, merging gives M ⊙ (W + s·B·A)."""
    base: PrunedLinear = layer.get_base_layer()
    A, B, s = layer._factors(adapter)
    delta = (s * (B @ A)).to(base.weight.device) * base.mask
    weight = base.weight.detach() + sign * delta.to(base.weight.dtype)
    bias = None if base.bias is None else _plus_bias(layer, adapter, base.bias, sign)
    if safe:
        _finite(layer, adapter, weight, bias)
    base.weight.data = weight
    if bias is not None:
        base.bias.data = bias


def _merge_lowrank(layer: CompressedLoraLinear, adapter: str, safe: bool, sign: int = 1) -> None:
    """U ← [U, s·B], V ← [V; A]: rank r + r_lora and U'·V' = U·V + s·B·A exactly.

    With ``sign=-1``, the unmerge: the appended r_lora columns of U and rows of V are dropped.
    """
    base: LowRankLinear = layer.get_base_layer()
    A, B, s = layer._factors(adapter)
    U, V = base.u.weight.detach(), base.v.weight.detach()
    if sign > 0:
        U, V = torch.cat([U, (s * B).to(U)], dim=1), torch.cat([V, A.to(V)], dim=0)
    else:
        rank = base.rank - layer.r[adapter]
        U, V = U[:, :rank], V[:rank]
    bias = None if base.u.bias is None else _plus_bias(layer, adapter, base.u.bias, sign)
    if safe:
        _finite(layer, adapter, U, V, bias)
    trainable = (base.u.weight.requires_grad, base.v.weight.requires_grad)
    fresh = LowRankLinear.from_factors(U, V, bias, base.source)
    base.u, base.v = fresh.u.requires_grad_(trainable[0]), fresh.v.requires_grad_(trainable[1])


def _merge_dense(layer: CompressedLoraLinear, adapter: str, safe: bool) -> nn.Module:
    """Replace the base layer by a dense Linear/Conv1D holding W + s·B·A; return the old one."""
    base = layer.get_base_layer()
    A, B, s = layer._factors(adapter)
    with torch.no_grad():
        W = dense_weight_of(base)
        weight = (W.float() + (s * (B @ A)).to(W.device)).to(W.dtype)
        bias = base.dense_bias() if isinstance(base, CompressedLayer) else base.bias
        bias = None if bias is None else _plus_bias(layer, adapter, bias)
        if safe:
            _finite(layer, adapter, weight, bias)
        source = base.source if isinstance(base, CompressedLayer) else source_kind(base)
        dense = make_dense(weight, bias, source)
    dense.requires_grad_(any(p.requires_grad for p in base.parameters()))
    layer.base_layer = dense
    return base


_MERGE = {"prune": _merge_pruned, "lowrank": _merge_lowrank, "dense": _merge_dense}


# --- configs -------------------------------------------------------------------------------------


def all_linear_names(model: nn.Module, task_type: str | None = None) -> set[str]:
    """What ``target_modules="all-linear"`` means on a compressed model.

    The qualified names of every ``nn.Linear``, ``Conv1D`` and hfcompress layer (not of the
    factors inside a compressed layer, nor of modules inside a PEFT layer), less the output
    embeddings and, for a ``SEQ_CLS`` task without them, the classifier head: PEFT's rules for
    ``"all-linear"``, with compressed layers counted as linear.
    """
    if isinstance(model, PeftModel):
        model = model.get_base_model()
    names: set[str] = set()
    opaque: set[str] = set()  # compressed and PEFT layers: their children are not targets
    for name, module in model.named_modules():
        if _inside(name, opaque):
            continue
        if isinstance(module, BaseTunerLayer):
            opaque.add(name)
            if isinstance(module.get_base_layer(), (nn.Linear, Conv1D, CompressedLayer)):
                names.add(name)
        elif isinstance(module, CompressedLayer):
            opaque.add(name)
            names.add(name)
        elif isinstance(module, (nn.Linear, Conv1D)):
            names.add(name)
    heads: list[nn.Module] = []
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    if output is not None:
        heads.append(output)
    elif task_type == TaskType.SEQ_CLS:
        heads += [h for h in (getattr(model, n, None) for n in SEQ_CLS_HEADS) if h is not None][:1]
    for head in heads:
        names -= {n for n, m in model.named_modules() if m is head}
    return names


def _inside(name: str, prefixes: set[str]) -> bool:
    parts = name.split(".")
    return any(".".join(parts[:i]) in prefixes for i in range(1, len(parts)))


def prepare_lora_config(config: LoraConfig, model: nn.Module | None = None) -> LoraConfig:
    """A copy of ``config`` whose LoRA also applies to hfcompress layers.

    It registers :class:`CompressedLoraLinear` for every
    :class:`~hfcompress.layers.CompressedLayer` and, given ``model``, replaces
    ``target_modules="all-linear"`` by :func:`all_linear_names`. ``config`` is not changed.

    Raises:
        InvalidParameterError: not a ``LoraConfig``, or ``"all-linear"`` without ``model``.
    """
    if not isinstance(config, LoraConfig):
        raise InvalidParameterError(f"config: expected a LoraConfig, got {type(config).__name__}")
    config = copy.deepcopy(config)
    config._register_custom_module({CompressedLayer: CompressedLoraLinear})
    targets = config.target_modules
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        if model is None:
            raise InvalidParameterError(
                "target_modules='all-linear': pass the model, so that it expands to the names of "
                "its linear and compressed layers (PEFT's own expansion skips compressed layers)"
            )
        config.target_modules = all_linear_names(model, config.task_type)
    return config


def lora_config(model: nn.Module | None = None, /, **kwargs: Any) -> LoraConfig:
    """``peft.LoraConfig(**kwargs)`` whose LoRA also applies to hfcompress layers.

    Args:
        model: needed for ``target_modules="all-linear"`` (see :func:`all_linear_names`).
        **kwargs: any ``LoraConfig`` field.
    """
    return prepare_lora_config(LoraConfig(**kwargs), model)


def load_adapter(model: nn.Module, path: str | PathLike[str], **kwargs: Any) -> PeftModel:
    """``PeftModel.from_pretrained(model, path, ...)`` for an adapter on a compressed model.

    The saved ``adapter_config.json`` cannot record the custom-layer registration, so a plain
    ``from_pretrained`` fails on compressed layers; this reads the config, prepares it with
    :func:`prepare_lora_config` and loads. ``kwargs`` go to ``PeftModel.from_pretrained``
    (``adapter_name``, ``is_trainable``, ...).
    """
    config = kwargs.pop("config", None) or PeftConfig.from_pretrained(str(path))
    if isinstance(config, LoraConfig):
        config = prepare_lora_config(config, model)
    return PeftModel.from_pretrained(model, path, config=config, **kwargs)


def _dense_methods(dense: bool | str | Iterable[str]) -> set[str]:
    if isinstance(dense, bool):
        return set(registered_methods()) if dense else set()
    names = {dense} if isinstance(dense, str) else set(dense)
    for name in names:
        if not isinstance(name, str):
            raise InvalidParameterError(
                f"dense: expected a bool or method names, got {name!r} in {dense!r}"
            )
        get_layer_class(name)  # raises, listing the known methods
    return names


def merge_and_unload(
    peft_model: nn.Module,
    *,
    dense: bool | str | Iterable[str] = False,
    progressbar: bool = False,
    safe_merge: bool = False,
    adapter_names: list[str] | None = None,
) -> nn.Module:
    """PEFT's ``merge_and_unload`` for a model with LoRA on compressed layers.

    Args:
        peft_model: a ``PeftModel`` (or ``LoraModel``) built with :func:`lora_config`.
        dense: the methods (``"prune"``, ``"lowrank"``, ``"kronecker"``, ...) whose layers merge
            into a dense ``nn.Linear`` / ``Conv1D`` holding W + s·B·A, or True for all. Other
            layers keep their form: low-rank exactly (rank r + r_lora), pruned with the mask
            kept (M ⊙ (W + s·B·A), not exact), Kronecker refused.
        progressbar, safe_merge, adapter_names: as in PEFT.

    Returns:
        The base model, merged. Its hfcompress ``quantization_config`` is re-recorded so that it
        saves and reloads (and dropped if no compressed layer is left).

    Raises:
        LoraMergeError: some layer cannot merge in its form; raised before anything changes,
            naming the module and the ``dense=`` that merges it.
        HfCompressError: an unknown method name in ``dense``.
    """
    methods = _dense_methods(dense)
    layers = [m for m in peft_model.modules() if isinstance(m, CompressedLoraLinear)]
    previous = [layer.merge_dense for layer in layers]
    try:
        for layer in layers:
            base = layer.get_base_layer()
            layer.merge_dense = isinstance(base, CompressedLayer) and base.method in methods
            layer.check_mergeable(adapter_names)
    except HfCompressError:
        for layer, flag in zip(layers, previous, strict=True):
            layer.merge_dense = flag
        raise
    model = peft_model.merge_and_unload(
        progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
    )
    _record(model)
    return model


def _record(model: nn.Module) -> None:
    """Bring an hfcompress ``quantization_config`` up to date with the merged structure."""
    spec = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(spec, dict):
        method = spec.get("quant_method")
    else:
        method = getattr(spec, "quant_method", None)
    if spec is None or str(getattr(method, "value", method)) != QUANT_METHOD:
        return
    if compression_spec(model):
        record_compression(model)
    else:
        decompress(model)  # nothing compressed is left: a plain transformers model
