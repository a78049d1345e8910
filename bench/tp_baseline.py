"""Torch-Pruning 1.6.1 baseline: MLP width pruning of a HuggingFace Llama-architecture model.

Reproduces the pruning call of Torch-Pruning's LLM example, ``examples/LLMs/prune_llm.py``
(VainF/Torch-Pruning, tag v1.6.1): ``tp.importance.GroupMagnitudeImportance(p=2,
group_reduction='mean')`` with ``tp.pruner.BasePruner(global_pruning=False, round_to=4,
output_transform=lambda x: x.logits, ...)`` stepped interactively, then
``model.config.intermediate_size`` updated from ``gate_proj.out_features``.

Unlike the example, which also prunes attention heads and the hidden size, only the MLP
intermediate channels are pruned here (gate_proj/up_proj output rows, down_proj input columns):
embeddings, lm_head, norms and every attention projection are passed as ``ignored_layers``, so
Torch-Pruning skips every dependency group that would touch them and only the per-layer MLP groups
remain. The example's importance is magnitude-based and needs no gradients, so ``calibration``
only supplies the tracing input (the example traces with a tokenized "Hello world.").

Usage (with bench/ on sys.path):
    from tp_baseline import prune_mlp_width_torch_pruning
    info = prune_mlp_width_torch_pruning(model, keep=0.5)
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn as nn
import torch_pruning as tp

EXAMPLE = "VainF/Torch-Pruning@v1.6.1:examples/LLMs/prune_llm.py"
ROUND_TO = 4  # the example's round_to
TRACE_TOKENS = 8  # tracing only needs a short sequence


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    return list(model.model.layers)


def _ignored_modules(model: nn.Module) -> list[nn.Module]:
    """Everything that is not an MLP projection: Torch-Pruning skips groups that touch these."""
    ignored: list[nn.Module] = [model.model.embed_tokens, model.lm_head, model.model.norm]
    for layer in _decoder_layers(model):
        ignored += [layer.self_attn, layer.input_layernorm, layer.post_attention_layernorm]
    return ignored


def _norm_weights(model: nn.Module) -> list[tuple[nn.Parameter, int]]:
    """RMSNorm weights as (parameter, pruning dim), declared so tracing does not warn."""
    return [(m.weight, 0) for name, m in model.named_modules() if name.endswith("norm")]


def _example_inputs(model: nn.Module, calibration: torch.Tensor | None) -> torch.Tensor:
    device = next(model.parameters()).device
    if calibration is not None:
        return calibration[:1, :TRACE_TOKENS].to(device)
    return torch.arange(TRACE_TOKENS, device=device).unsqueeze(0) % model.config.vocab_size


def _pruning_ratio(width: int, target: int) -> float:
    """Ratio for which Torch-Pruning keeps exactly ``target`` channels.

    BasePruner keeps ``int(width * (1 - ratio))`` channels; aiming half a channel above the target
    keeps float error from truncating to ``target - 1``.
    """
    return 1.0 - (target + 0.5) / width


def _mlp_widths(model: nn.Module) -> list[int]:
    return [layer.mlp.gate_proj.out_features for layer in _decoder_layers(model)]


def _update_config(model: nn.Module) -> int:
    widths = set(_mlp_widths(model))
    if len(widths) != 1:
        raise RuntimeError(f"MLP widths differ across layers after pruning: {sorted(widths)}")
    width = widths.pop()
    model.config.intermediate_size = width
    for layer in _decoder_layers(model):
        if hasattr(layer.mlp, "intermediate_size"):
            layer.mlp.intermediate_size = width
    return width


def prune_mlp_width_torch_pruning(
    model: nn.Module, keep: float, calibration: torch.Tensor | None = None
) -> dict[str, Any]:
    """Prune every decoder MLP to ``round(keep * intermediate_size)`` channels in place.

    Args:
        model: a ``LlamaForCausalLM``-style model (``model.model.layers[i].mlp.*_proj``).
        keep: fraction of intermediate channels to keep, in (0, 1].
        calibration: optional LongTensor [n, seq]; only its first row prefix is used, for tracing.

    Returns:
        {"importance": str, "settings": dict, "params": int}
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    width = model.config.intermediate_size
    target = round(keep * width)
    ratio = _pruning_ratio(width, target)
    # round_to rounds the kept width down to a multiple; keep the example's 4 only when it agrees.
    round_to = ROUND_TO if target % ROUND_TO == 0 else None
    importance = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean")

    start = time.perf_counter()
    pruner = tp.pruner.BasePruner(
        model,
        example_inputs=_example_inputs(model, calibration),
        importance=importance,
        global_pruning=False,
        output_transform=lambda out: out.logits,
        pruning_ratio=ratio,
        ignored_layers=_ignored_modules(model),
        round_to=round_to,
        unwrapped_parameters=_norm_weights(model),
    )
    for group in pruner.step(interactive=True):
        group.prune()
    del pruner
    new_width = _update_config(model)
    seconds = time.perf_counter() - start

    if new_width != target:
        raise RuntimeError(f"Torch-Pruning kept {new_width} MLP channels, expected {target}")
    return {
        "importance": "GroupMagnitudeImportance(p=2, group_reduction='mean')",
        "settings": {
            "example": EXAMPLE,
            "pruner": "BasePruner",
            "global_pruning": False,
            "keep": keep,
            "pruning_ratio": ratio,
            "round_to": round_to,
            "ignored": "embed_tokens, lm_head, norms, self_attn",
            "example_inputs": "calibration[:1, :8]" if calibration is not None else "arange(8)",
            "intermediate_size": {"before": width, "after": new_width},
            "seconds": seconds,
        },
        "params": sum(p.numel() for p in model.parameters()),
    }
