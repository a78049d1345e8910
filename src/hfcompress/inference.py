"""The inference form of a compressed model, and what it costs in memory.

``freeze(model)`` drops what only training needs: a ``PrunedLinear`` keeps no mask in memory
(the weight's zeros are the mask), so a frozen pruned model takes exactly the dense model's bytes
instead of 1.25× (fp32) / 1.5× (bf16); every compressed weight stops requiring gradients.
Low-rank and Kronecker layers keep their factors (they are already their cheapest form).
Frozen models still save (the checkpoint is the same as unfrozen: values + bitmask) and
generate identically; training one is refused with an error until ``unfreeze(model)``.
"""

from __future__ import annotations

from torch import nn

from hfcompress.layers import CompressedLayer, PrunedLinear


def freeze(model: nn.Module) -> nn.Module:
    """Put every hfcompress layer of ``model`` in its inference form, in place; returns it.

    Example:
        >>> model = AutoModelForCausalLM.from_pretrained("smollm2-pruned")
        >>> hfcompress.freeze(model).eval()
        >>> model.generate(**inputs, max_new_tokens=64)
    """
    for module in model.modules():
        if isinstance(module, PrunedLinear):
            module.freeze_()
        elif isinstance(module, CompressedLayer):
            module.requires_grad_(False)
    return model


def unfreeze(model: nn.Module) -> nn.Module:
    """Undo :func:`freeze`: masks rebuilt from the weights' non-zeros, gradients on again."""
    for module in model.modules():
        if isinstance(module, PrunedLinear):
            module.unfreeze_()
        elif isinstance(module, CompressedLayer):
            module.requires_grad_(True)
    return model


def is_frozen(model: nn.Module) -> bool:
    """Whether any pruned layer of ``model`` is in the frozen (mask-free) form."""
    return any(isinstance(m, PrunedLinear) and m.frozen for m in model.modules())


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers in memory (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for tensor in (*model.parameters(), *model.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total
