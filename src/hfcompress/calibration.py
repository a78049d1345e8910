"""Calibration: the statistics data-aware criteria need, gathered layer by layer.

SparseGPT (Frantar & Alistarh 2023) compresses a transformer one block at a time: the inputs of
block i are the outputs of blocks < i *after* they were compressed, so later layers see (and
correct for) earlier layers' errors, and memory stays near one block's activations plus the
model. :func:`run_layerwise` does that for any model whose layers sit in one ``nn.ModuleList``:
it captures the inputs of the first block once, then for each block gathers the input statistics
of the Linear layers that need them (forward hooks, fp32 accumulation), lets the caller compress
the block, and runs the compressed block to produce the next block's inputs.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from hfcompress.errors import CalibrationError
from hfcompress.layers.base import source_kind
from hfcompress.registry import ROW_WEIGHT_NEEDS, criterion_of, needs_calibration
from hfcompress.runner import (
    Batch,
    calibration_batches,
    collect_stats,
    layer_stack,
    recording_inputs,
    run_layerwise,
)
from hfcompress.stats import InputStats, LayerStats
from hfcompress.swap import Operation, Swapper

__all__ = [
    "Batch",
    "InputStats",
    "apply_layerwise",
    "calibration_batches",
    "collect_stats",
    "forward_groups",
    "layer_stack",
    "recording_inputs",
    "row_weights",
    "run_layerwise",
]


def forward_groups(block: nn.Module, inputs: list[tuple], names: Iterable[str]) -> list[list[str]]:
    """``names`` (modules of ``block``) grouped by the tensor they read, in forward order.

    Modules fed the very same tensor (q/k/v after the norm; gate and up) form one group, and a
    group comes after every group whose outputs it may depend on (o_proj after q/k/v, down_proj
    after gate/up). Found by running the block once on the first calibration batch.
    """
    wanted = list(names)
    seen: list[tuple[str, torch.Tensor]] = []

    def hook(name: str):
        def record(_module: nn.Module, args: tuple) -> None:
            if all(name != n for n, _ in seen):
                seen.append((name, args[0]))

        return record

    handles = [block.get_submodule(n).register_forward_pre_hook(hook(n)) for n in wanted]
    try:
        with torch.no_grad():
            args, kwargs = inputs[0]
            block(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list[str]] = []
    group_inputs: list[torch.Tensor] = []
    for name, x in seen:
        for group, gx in zip(groups, group_inputs, strict=True):
            if x is gx:
                group.append(name)
                break
        else:
            groups.append([name])
            group_inputs.append(x)
    missed = [n for n in wanted if all(n not in g for g in groups)]
    return groups + ([missed] if missed else [])


def fisher_row_importance(
    model: nn.Module, batches: list[Batch], module_names: list[str]
) -> dict[str, torch.Tensor]:
    """Σ over batches of (∂L/∂W)² summed over each output row, [out] per module (FWSVD).

    Hsu et al. (2022) weight a row of W by its Fisher information, estimated from squared
    gradients of the language-modeling loss on calibration data (labels = input_ids).
    """
    modules = {name: model.get_submodule(name) for name in module_names}
    importance = {name: None for name in module_names}
    device = next(model.parameters()).device
    was_training = model.training
    # The user's own gradients (e.g. accumulated by a training loop) are put back afterwards.
    saved_grads = [(p, p.grad) for p in model.parameters()]
    model.eval()
    try:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            inputs = {k: v.to(device) for k, v in batch.items()}
            with torch.enable_grad():  # compress_model runs under no_grad
                loss = model(**inputs, labels=inputs["input_ids"], use_cache=False).loss
                loss.backward()
            for name, module in modules.items():
                grad = module.weight.grad
                if grad is None:
                    raise CalibrationError(f"fisher: module {name!r} received no gradient")
                grad = (grad.T if source_kind(module) == "conv1d" else grad).float()  # [out, in]
                rows = grad.square().sum(1)
                importance[name] = rows if importance[name] is None else importance[name] + rows
    finally:
        for p, grad in saved_grads:
            p.grad = grad
        model.train(was_training)
    return importance


def output_gradient_energy(
    model: nn.Module, batches: list[Batch], module_names: list[str]
) -> dict[str, torch.Tensor]:
    """G_j = Σ_tokens (∂L/∂y_j)² for every output feature j of each module, [out] per module.

    The diagonal empirical Fisher of a module's outputs y (language-modeling loss, labels =
    input_ids): a small output change δy raises the loss by ≈ ½ Σ_j G_j δy_j², which makes
    errors of different modules comparable. No parameter gradient is computed: the first
    module's output is made to require grad, and hooks on the outputs read ∂L/∂y. Runs one
    sequence at a time (L its mean token loss), so memory stays at one sequence's activations
    and logits; a batch's mean loss would scale every G by the same 1/batch².
    """
    energy: dict[str, torch.Tensor] = {}

    def accumulate(name: str):
        def on_grad(grad: torch.Tensor) -> None:
            g = grad.detach().reshape(-1, grad.shape[-1]).float().square().sum(0)
            energy[name] = g if name not in energy else energy[name] + g

        def hook(_module: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
            if not out.requires_grad:
                out = out.detach().requires_grad_(True)
            out.register_hook(on_grad)
            return out

        return hook

    handles = [
        model.get_submodule(name).register_forward_hook(accumulate(name)) for name in module_names
    ]
    device = next(model.parameters()).device
    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for batch in batches:
            for row in range(batch["input_ids"].shape[0]):
                inputs = {k: v[row : row + 1].to(device) for k, v in batch.items()}
                with torch.enable_grad():
                    loss = model(**inputs, labels=inputs["input_ids"], use_cache=False).loss
                    loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)
    missing = [n for n in module_names if n not in energy]
    if missing:
        raise CalibrationError(f"output gradients: modules {missing[:4]} received no gradient")
    return energy


def row_weights(
    model: nn.Module, batches: list[Batch], ops: list[Operation]
) -> dict[str, dict[str, torch.Tensor]]:
    """Per-row weights the criteria need, measured on the model before anything changes.

    Returns {need: {module name: [out]}} for the needs ``weight_fisher`` (FWSVD's squared weight
    gradients) and ``output_fisher`` (the output-gradient energy).
    """
    measures = {"weight_fisher": fisher_row_importance, "output_fisher": output_gradient_energy}
    weights = {}
    for need, measure in measures.items():
        names = sorted({op.module_name for op in ops if need in criterion_of(op.stage).needs})
        if names:
            weights[need] = measure(model, batches, names)
    return weights


def _layer_stats(
    op: Operation, inputs: InputStats | None, weights: dict[str, dict[str, torch.Tensor]]
) -> LayerStats:
    needs = criterion_of(op.stage).needs
    rows = next((weights[n][op.module_name] for n in ROW_WEIGHT_NEEDS if n in needs), None)
    if rows is None and any(n in needs for n in ROW_WEIGHT_NEEDS):
        raise CalibrationError(
            f"criterion {op.stage.criterion_name!r}: no gradient statistics for this module"
        )
    if ({"inputs", "gram"} & needs) and (inputs is None or inputs.count == 0):
        raise CalibrationError(
            f"criterion {op.stage.criterion_name!r}: the module saw no calibration inputs"
        )
    return LayerStats(inputs=inputs, row_weights=rows)


def apply_layerwise(
    model: nn.Module,
    ops: list[Operation],
    batches: list[Batch],
    swapper: Swapper,
    progress: bool = True,
    true_sequential: bool = False,
    device: torch.device | str | None = None,
) -> None:
    """Apply every operation; those inside the layer stack block by block on calibration data.

    For each block: gather the statistics its modules' criteria need (one pass, or one per
    group of modules reading the same tensor with ``true_sequential``), ask each stage's
    builder for the new layer (``swapper.apply``), then run the compressed block to produce
    the next block's inputs. Operations outside the stack (data-free ones) run after.
    With ``device``, each block is calibrated there (see :func:`run_layerwise`).
    """
    calibrated = [op for op in ops if needs_calibration(op.stage)]
    prefix, stack = layer_stack(model, sorted({op.module_name for op in calibrated}))
    weights = row_weights(model, batches, ops)
    by_block: dict[int, list[Operation]] = {}
    outside: list[Operation] = []
    for op in ops:
        index = _block_index(prefix, op.module_name)
        (outside if index is None else by_block.setdefault(index, [])).append(op)

    home = next(stack[0].parameters()).device

    def compress(index: int, block: nn.Module, inputs: list[tuple]) -> None:
        ops_here = by_block.get(index, [])
        _compress_block(
            block, f"{prefix}.{index}.", ops_here, inputs, weights, swapper, true_sequential
        )
        # with a separate compute device, the replaced modules (kept for undo and the report)
        # went there with their block: they go back to where the model lives
        names = sorted({op.module_name for op in ops_here})
        for name in names:
            swapper.originals[name].to(home)
        swapper.stash_originals(names)  # with keep_originals="disk": only the new layers stay

    run_layerwise(model, batches, stack, compress, progress, device)
    for op in outside:
        swapper.apply(op)


def _compress_block(
    block: nn.Module,
    head: str,
    ops: list[Operation],
    inputs: list[tuple],
    weights: dict[str, dict[str, torch.Tensor]],
    swapper: Swapper,
    true_sequential: bool,
) -> None:
    by_module: dict[str, list[Operation]] = {}
    for op in ops:
        by_module.setdefault(op.module_name.removeprefix(head), []).append(op)
    if not by_module:
        return
    gram = {
        name: any("gram" in criterion_of(op.stage).needs for op in module_ops)
        for name, module_ops in by_module.items()
        if any(needs_calibration(op.stage) for op in module_ops)
    }
    # "True sequential" (the GPTQ option): modules reading the same tensor form a group, and
    # each group is calibrated on the outputs of the groups before it, already compressed
    # (o_proj sees the compressed q/k/v). Otherwise one pass gathers the whole block's stats.
    groups = forward_groups(block, inputs, by_module) if true_sequential else [list(by_module)]
    for group in groups:
        wanted = {name: gram[name] for name in group if name in gram}
        stats = collect_stats(block, inputs, wanted) if wanted else {}
        for name in group:
            for op in by_module[name]:  # a module's stages in recipe order
                layer_stats = (
                    _layer_stats(op, stats.get(name), weights)
                    if needs_calibration(op.stage)
                    else None
                )
                swapper.apply(op, layer_stats)
        del stats
    # every module of the block is final: its statistics become output errors and are freed
    swapper.settle([head + name for name in by_module])


def _block_index(prefix: str, name: str) -> int | None:
    head = prefix + "."
    if not name.startswith(head):
        return None
    index = name[len(head) :].split(".", 1)[0]
    return int(index) if index.isdigit() else None
