"""What every structured method asks of the model as a whole: does it predict tokens, which
stack of blocks holds a module, and calibration batches its forward accepts."""

from __future__ import annotations

from torch import nn

from hfcompress.errors import InvalidParameterError


def has_lm_head(model: nn.Module) -> bool:
    """Whether the model predicts tokens (its loss with labels = input_ids is meaningful)."""
    getter = getattr(model, "get_output_embeddings", None)
    return callable(getter) and getter() is not None


def outer_stack(model: nn.Module, name: str) -> tuple[str, nn.ModuleList]:
    """The outermost ``nn.ModuleList`` holding module ``name``: the model's blocks (T5's
    ``encoder.block``, not the sub-layer list inside each block).

    Raises:
        InvalidParameterError: none holds it.
    """
    for prefix, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and name.startswith(prefix + "."):
            return prefix, module
    raise InvalidParameterError(
        f"{name!r} is not inside a stack of blocks (nn.ModuleList), which calibration runs "
        "block by block"
    )


def stacks(model: nn.Module, names: list[str]) -> dict[str, list[str]]:
    """Module names grouped by the stack of blocks (``model.layers``, ``encoder.block``)
    holding them."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(outer_stack(model, name)[0], []).append(name)
    return groups


def model_batches(model: nn.Module, batches: list[dict]) -> list[dict]:
    """Calibration batches the model's forward accepts: an encoder-decoder also reads the
    tokens as its decoder input."""
    config = getattr(model, "config", None)
    if not getattr(config, "is_encoder_decoder", False):
        return batches
    return [{**b, "decoder_input_ids": b.get("decoder_input_ids", b["input_ids"])} for b in batches]
