"""The inference form of a compressed model, and what it costs in memory.

``freeze(model)`` drops what only training needs: a ``PrunedLinear`` keeps no mask in memory
(the weight's zeros are the mask), so a frozen pruned model takes exactly the dense model's bytes
instead of 1.25× (fp32) / 1.5× (bf16); every compressed weight stops requiring gradients.
Low-rank and Kronecker layers keep their factors (they are already their cheapest form).
Frozen models still save (the checkpoint is the same as unfrozen: values + bitmask) and
generate identically; training one is refused with an error until ``unfreeze(model)``.
"""

from __future__ import annotations

import torch
from torch import nn

from hfcompress.layers import CompressedLayer


def freeze(model: nn.Module) -> nn.Module:
    """Put every hfcompress layer of ``model`` in its inference form, in place; returns it.

    Example:
        >>> model = AutoModelForCausalLM.from_pretrained("smollm2-pruned")
        >>> hfcompress.freeze(model).eval()
        >>> model.generate(**inputs, max_new_tokens=64)
    """
    for module in model.modules():
        if isinstance(module, CompressedLayer):
            module.freeze_()
    return model


def unfreeze(model: nn.Module) -> nn.Module:
    """Undo :func:`freeze`: masks rebuilt from the weights' non-zeros, gradients on again."""
    for module in model.modules():
        if isinstance(module, CompressedLayer):
            module.unfreeze_()
    return model


def is_frozen(model: nn.Module) -> bool:
    """Whether any hfcompress layer of ``model`` is in an inference-only form (a pruned layer
    without its mask; see ``CompressedLayer.frozen``)."""
    return any(isinstance(m, CompressedLayer) and m.frozen for m in model.modules())


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds: a tensor subclass (torchao's int8) counts its inner tensors."""
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is not None:
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def _packed_bytes(module: nn.Module) -> int:
    """Bytes of a torch.ao dynamically quantized Linear, whose weight is no parameter or buffer.

    Its int8 values, plus per output row a float32 scale and an int32 zero point (what the
    fbgemm/qnnpack kernels keep; the unpacked tensor reports them as float64/int64), plus the
    bias. Kernel-specific packing overhead is not counted.
    """
    weight, bias = module._packed_params._weight_bias()
    rows = weight.shape[0]
    total = weight.numel() * weight.element_size() + rows * 8
    return total + (bias.numel() * bias.element_size() if bias is not None else 0)


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers in memory (shared tensors counted once).

    int8-quantized weights (:func:`hfcompress.quantize_int8`) count their int8 values and scales.
    """
    seen: set[int] = set()
    total = 0
    for tensor in (*model.parameters(), *model.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor_bytes(tensor)
    for module in model.modules():
        if hasattr(module, "_packed_params") and hasattr(module._packed_params, "_weight_bias"):
            total += _packed_bytes(module)
    return total
