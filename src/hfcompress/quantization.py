"""int8 on top of a compressed model: the remaining dense Linears, the pruned weights, the factors.

``torch.ao.quantization.quantize_dynamic(model, {nn.Linear})`` and torchao's ``quantize_`` look
for ``nn.Linear`` modules. A ``LowRankLinear`` holds its factors as two ``nn.Linear`` (``v``,
``u``), so they already see those; a ``PrunedLinear`` and a ``KroneckerLinear`` are not
``nn.Linear``, and are silently left in floating point. :func:`quantize_int8` is the route that
covers them:

1. every ``PrunedLinear`` becomes the ``nn.Linear`` of its weight, zeros included (the mask is
   dropped, as :func:`hfcompress.freeze` does). Symmetric int8 quantization maps 0 to 0, so the
   pruned pattern survives quantization exactly. GPT-2's ``Conv1D`` becomes an ``nn.Linear`` too;
2. every ``nn.Linear`` whose weight is not tied to another module (a tied ``lm_head`` shares the
   embedding matrix, which stays as it is) is quantized, by ``mode``:

   * ``"weight-only"`` (the default): int8 weights with one scale per output row, activations
     in floating point (torchao ``Int8WeightOnlyConfig``; any device; ``pip install
     "hfcompress[int8]"``). On SmolLM2-135M (CPU, fp32): perplexity 1.01×, decode 1.40×,
     model bytes 0.41× (docs/benchmarks.md);
   * ``"dynamic"``: activations quantized too, at run time, for int8 matrix products. On CPU,
     PyTorch's own dynamic quantization (``torch.ao``, fbgemm/qnnpack; one activation scale per
     tensor, float32 models): the fastest (decode 1.95×, prefill 2.09×) but the least accurate
     on LLMs, whose activations have outlier channels (perplexity 2.67×; 1.13× with
     ``exclude=r".*down_proj"``). On CUDA, torchao ``Int8DynamicActivationInt8WeightConfig``
     (one scale per token);
   * or any torchao ``config``.

Kronecker factors stay in floating point (their products are reshaped contractions, not
``nn.Linear``); they hold a quarter to a half of the dense parameters already.

The result is for inference only and cannot be saved with ``save_pretrained`` yet: save the
compressed model, and quantize after loading it.

References: Jacob et al., "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference" (CVPR 2018) for the affine int8 scheme.
"""

from __future__ import annotations

import types
import warnings
from typing import Any

import regex
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from hfcompress.errors import HfCompressError
from hfcompress.layers import CompressedLayer, PrunedLinear
from hfcompress.matching import fullmatch
from hfcompress.validation import tied_modules

__all__ = ["MODES", "int8_linear_names", "is_int8", "quantize_int8", "to_linear"]


def _linear_of(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight`` [out, in] and ``bias`` (no gradients)."""
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=False, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return linear


def to_linear(model: nn.Module) -> int:
    """Replace each ``PrunedLinear`` and untied ``Conv1D`` of ``model`` by an equal ``nn.Linear``.

    A pruned layer's ``nn.Linear`` shares its (zero-filled) weight, so it computes the same
    output; its mask is dropped. GPT-2's ``Conv1D`` holds its weight as [in, out]; the
    ``nn.Linear`` holds the transpose (a copy) and computes the same product. Returns the number
    of modules replaced.
    """
    tied = tied_modules(model)
    replaced = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, PrunedLinear):
            linear = _linear_of(module.weight.detach(), module.bias)
        elif isinstance(module, Conv1D) and name not in tied:
            linear = _linear_of(module.weight.detach().t().contiguous(), module.bias)
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
        replaced += 1
    return replaced


def int8_linear_names(model: nn.Module, exclude: str | None = None) -> list[str]:
    """Names of the ``nn.Linear`` modules :func:`quantize_int8` quantizes: all but tied ones,
    and but those whose name (or a parent's: ``...mlp.down_proj`` covers its factors)
    ``exclude`` matches in full."""
    tied = tied_modules(model)

    def excluded(name: str) -> bool:
        parts = name.split(".")
        prefixes = (".".join(parts[:i]) for i in range(1, len(parts) + 1))
        return exclude is not None and any(fullmatch(exclude, p, "exclude") for p in prefixes)

    return [
        name
        for name, module in model.named_modules()
        if type(module) is nn.Linear and name not in tied and not excluded(name)
    ]


MODES = ("weight-only", "dynamic")


def _quantize_torch_ao_dynamic(model: nn.Module, names: list[str]) -> None:
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        # torch.ao's eager quantization prints its migration notice to torchao on every call
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        quantize_dynamic(model, {name: per_channel_dynamic_qconfig for name in names}, inplace=True)


def _torchao() -> Any:
    try:
        import torchao.quantization as torchao_quantization
    except ImportError as error:
        raise HfCompressError(
            "quantize_int8: this mode needs torchao, which is not installed "
            '(pip install "hfcompress[int8]"); on CPU, mode="dynamic" needs only torch'
        ) from error
    return torchao_quantization


def _quantize_torchao(model: nn.Module, names: list[str], config: Any) -> None:
    wanted = set(names)
    _torchao().quantize_(model, config, filter_fn=lambda module, name: name in wanted)


def _backend(mode: str, config: Any | None, device: torch.device) -> tuple[str, Any | None]:
    """("torch.ao", None) or ("torchao", its config) for ``mode`` on ``device``."""
    if config is not None:
        return "torchao", config
    if mode not in MODES:
        raise HfCompressError(f"quantize_int8: mode={mode!r}; expected one of {list(MODES)}")
    if mode == "dynamic" and device.type == "cpu":
        return "torch.ao", None
    torchao = _torchao()
    if mode == "dynamic":
        return "torchao", torchao.Int8DynamicActivationInt8WeightConfig()
    return "torchao", torchao.Int8WeightOnlyConfig()


def _device_of(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def quantize_int8(
    model: nn.Module,
    mode: str = "weight-only",
    *,
    config: Any | None = None,
    exclude: str | None = None,
) -> nn.Module:
    """Quantize a (compressed) model's linear weights to int8, in place, for inference; returns it.

    Covers the model's remaining dense ``nn.Linear`` modules, its pruned layers (through
    :func:`to_linear`: zeros stay zeros) and the low-rank factors; tied weights and
    Kronecker factors stay in floating point. See the module docstring for the modes.

    Args:
        model: a model on one device, e.g. from ``compress_model`` or ``from_pretrained``.
        mode: ``"weight-only"`` (int8 weights, float activations: keeps the accuracy) or
            ``"dynamic"`` (int8 activations too: faster on CPU, less accurate on LLMs).
        config: a torchao ``AOBaseConfig`` instead of ``mode``.
        exclude: a regex; modules whose name it matches in full stay in floating point (e.g.
            ``r".*down_proj"``: the layers whose inputs carry the largest activation outliers,
            where per-tensor activation scales lose the most). Applied to a module and its
            factors alike.

    Raises:
        HfCompressError: an unknown mode, a bad ``exclude``, torchao missing for the mode, a
            non-float32 model for CPU dynamic quantization, or a model already in int8; the
            model is left as it was.

    Example:
        >>> model = AutoModelForCausalLM.from_pretrained("smollm2-pruned")
        >>> hfcompress.quantize_int8(model.eval())
        >>> model.generate(**inputs, max_new_tokens=64)
    """
    if is_int8(model):
        raise HfCompressError("quantize_int8: the model is already quantized to int8")
    backend, ao_config = _backend(mode, config, _device_of(model))
    if backend == "torch.ao":
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        if dtype not in (None, torch.float32):
            raise HfCompressError(
                f"quantize_int8: PyTorch's CPU dynamic quantization needs a float32 model, got "
                f'{dtype}; call model.float() first, or use mode="weight-only"'
            )
    try:
        if exclude is not None:
            regex.compile(exclude)  # a bad pattern fails here, before any change
    except regex.error as error:
        raise HfCompressError(f"quantize_int8: exclude={exclude!r}: {error}") from error
    to_linear(model)
    for module in model.modules():
        if isinstance(module, CompressedLayer):
            module.requires_grad_(False)
    names = int8_linear_names(model, exclude)
    kronecker = sum(getattr(m, "method", None) == "kronecker" for m in model.modules())
    if kronecker:
        warnings.warn(
            f"quantize_int8: the factors of {kronecker} Kronecker layer(s) stay in floating point "
            f"(only nn.Linear weights are quantized); {len(names)} Linear module(s) get int8",
            stacklevel=2,
        )
    if backend == "torch.ao":
        _quantize_torch_ao_dynamic(model, names)
    else:
        _quantize_torchao(model, names, ao_config)
    if hasattr(model, "save_pretrained"):
        model.save_pretrained = types.MethodType(_refuse_save, model)
    model.eval()
    return model


def _refuse_save(model: nn.Module, *args: Any, **kwargs: Any) -> None:
    raise HfCompressError(
        f"{type(model).__name__}.save_pretrained: this model was quantized to int8 by "
        "hfcompress.quantize_int8, a form that cannot be saved yet; save the compressed model "
        "before quantizing, and call quantize_int8 again after from_pretrained"
    )


def is_int8(model: nn.Module) -> bool:
    """Whether :func:`quantize_int8` (or torch.ao dynamic quantization) was applied to ``model``."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    for module in model.modules():
        if isinstance(module, DynamicLinear):
            return True
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and type(weight).__module__.startswith("torchao"):
            return True
    return False
