"""Trainer callbacks that compress during training and log the compression.

* :class:`GradualPruningCallback` — the cubic sparsity schedule of Zhu & Gupta (2017), then the
  pattern lock of Prune Once For All (Zafrir et al., 2021).
* :class:`ProgressiveRankCallback` — progressive low-rank decomposition (Hajimolahoseini et al.,
  seed 000 §4): lower the ranks in steps and let training recover in between.
* :class:`CompressionLoggingCallback` — sparsity, ranks, parameters and compression ratio in the
  Trainer's logs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from hfcompress.errors import HfCompressError, InvalidParameterError
from hfcompress.layers import CompressedLayer, KroneckerLinear, LowRankLinear, PrunedLinear
from hfcompress.surgery import record_compression
from hfcompress.training.distributed import (
    apply_mask_,
    check_supported,
    drop_zero_directions_,
    effective_rank,
    is_sharded,
    local_part,
    local_tensor,
    next_mask,
    pop_optimizer_state,
    register_active_rank,
    restore_optimizer_state,
    set_mask_,
    truncate_in_place_,
)


def cubic_sparsity(step: int, initial: float, final: float, start: int, end: int) -> float:
    """Zhu & Gupta's schedule: s_t = s_f + (s_i − s_f)·(1 − (t − t₀)/(t_end − t₀))³, clamped."""
    if step <= start:
        return initial
    if step >= end:
        return final
    progress = (step - start) / (end - start)
    return final + (initial - final) * (1.0 - progress) ** 3


def _layers(model: nn.Module, kind: type) -> dict[str, Any]:
    return {name: m for name, m in model.named_modules() if isinstance(m, kind)}


class GradualPruningCallback(TrainerCallback):
    """Raise every ``PrunedLinear``'s sparsity on a cubic schedule, then lock the pattern.

    Every ``update_every`` steps between ``start_step`` and ``end_step`` the masks are recomputed
    by magnitude at the scheduled sparsity (N:M layers keep their pattern). After ``end_step`` the
    masks are frozen. After every optimizer step the masked weights are set back to exactly 0, so
    no optimizer state (momentum from before a mask change, weight decay) can revive them. The
    schedule is a function of the global step, so resuming a checkpoint resumes it; the masks
    come back with the checkpoint.

    The model must already hold ``PrunedLinear`` layers: compress it first with a prune stage
    (``sparsity: 0.0`` or the initial sparsity).

    Under DDP every rank computes the same masks from its identical weights. Under FSDP2 each
    threshold is taken over the gathered weight, one layer at a time, so the masks are those of
    the unsharded run; the masks (buffers) stay whole on every rank and each rank zeroes its own
    rows. FSDP1 and DeepSpeed are refused.

    Example:
        >>> prune = GradualPruningCallback(0.0, 0.5, start_step=0, end_step=1000, update_every=100)
    """

    def __init__(
        self,
        initial_sparsity: float = 0.0,
        final_sparsity: float = 0.5,
        start_step: int = 0,
        end_step: int = 1000,
        update_every: int = 100,
    ) -> None:
        if not 0.0 <= initial_sparsity <= final_sparsity < 1.0:
            raise InvalidParameterError(
                f"initial_sparsity={initial_sparsity}, final_sparsity={final_sparsity}: expected "
                "0 ≤ initial ≤ final < 1"
            )
        if not 0 <= start_step <= end_step:
            raise InvalidParameterError(
                f"start_step={start_step}, end_step={end_step}: expected 0 ≤ start_step ≤ end_step"
            )
        if update_every < 1:
            raise InvalidParameterError(f"update_every={update_every}: expected ≥ 1")
        self.initial_sparsity = initial_sparsity
        self.final_sparsity = final_sparsity
        self.start_step = start_step
        self.end_step = end_step
        self.update_every = update_every

    def sparsity_at(self, step: int) -> float:
        return cubic_sparsity(
            step, self.initial_sparsity, self.final_sparsity, self.start_step, self.end_step
        )

    def is_update_step(self, step: int) -> bool:
        in_window = self.start_step <= step <= self.end_step
        return in_window and (
            (step - self.start_step) % self.update_every == 0 or step == self.end_step
        )

    def locked(self, step: int) -> bool:
        """True once the final masks are set: from then on they never change."""
        return step > self.end_step

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        check_supported(args, kwargs["model"], "GradualPruningCallback")
        if not _layers(kwargs["model"], PrunedLinear):
            raise HfCompressError(
                "GradualPruningCallback: the model has no PrunedLinear layers; compress it first "
                "with a prune stage, e.g. {method: prune, targets: ..., sparsity: 0.0}"
            )

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        model = kwargs["model"]
        layers = _layers(model, PrunedLinear).values()
        step = state.global_step
        if self.is_update_step(step):
            sparsity = self.sparsity_at(step)
            with _UndoOnInterrupt() as undo:
                undo.add(lambda: record_compression(model))  # runs last: the restored structure
                for layer in layers:
                    _update_mask_undoably(layer, sparsity, undo)
                record_compression(model)
        else:
            for layer in layers:
                apply_mask_(layer)


class ProgressiveRankCallback(TrainerCallback):
    """Lower every ``LowRankLinear``'s rank by ``factor`` every ``every`` steps, down to a floor.

    Each reduction calls ``truncate`` (the best lower-rank approximation of the current U·V), so
    the parameter count really drops; training in between recovers the loss. The optimizer is
    remapped in place: the new factors take the old ones' places in their parameter groups (so
    learning rates, weight decay and the LR scheduler carry on), and the factors' optimizer
    state starts afresh, since the old moments live in the old basis.

    Args:
        every: steps between reductions.
        factor: new rank = ⌊rank·factor⌋, factor in (0, 1).
        min_rank: the floor, as a rank.
        min_ratio: the floor as a fraction of each layer's full rank min(out, in).
        start_step: first reduction (default: ``every``).
        end_step: no reduction after this step (default: none).

    Under DDP and FSDP2 the wrapper holds on to the parameter objects, so the rank is lowered in
    place instead: the factors keep their shapes, the dropped directions (columns of U, rows of
    V) become exact zeros, which get exactly zero gradient and stay zero, and the factors'
    optimizer state restarts. The truncated SVD is taken on the gathered factors and rank 0's
    result is written on every rank. When training ends an unsharded model's factors shrink to
    the scheduled ranks; a sharded one shrinks in the checkpoint ``DistillationTrainer.save_model``
    gathers. Trainer checkpoints (``checkpoint-N``) keep the training shapes, so that resuming
    finds the optimizer state it saved; the zeros tell the ranks.
    """

    def __init__(
        self,
        every: int,
        factor: float = 0.8,
        min_rank: int = 1,
        min_ratio: float | None = None,
        start_step: int | None = None,
        end_step: int | None = None,
    ) -> None:
        if every < 1:
            raise InvalidParameterError(f"every={every}: expected ≥ 1")
        if not 0.0 < factor < 1.0:
            raise InvalidParameterError(f"factor={factor}: expected a fraction in (0, 1)")
        if min_rank < 1:
            raise InvalidParameterError(f"min_rank={min_rank}: expected ≥ 1")
        if min_ratio is not None and not 0.0 < min_ratio <= 1.0:
            raise InvalidParameterError(f"min_ratio={min_ratio}: expected a fraction in (0, 1]")
        self.every = every
        self.factor = factor
        self.min_rank = min_rank
        self.min_ratio = min_ratio
        self.start_step = every if start_step is None else start_step
        self.end_step = end_step
        self._in_place = False  # set at train begin: lower ranks in place (DDP, FSDP)

    def floor(self, layer: LowRankLinear) -> int:
        full = min(layer.in_features, layer.out_features)
        ratio_floor = math.ceil(self.min_ratio * full) if self.min_ratio else 1
        return max(self.min_rank, ratio_floor)

    def is_reduction_step(self, step: int) -> bool:
        if step < self.start_step or (self.end_step is not None and step > self.end_step):
            return False
        return (step - self.start_step) % self.every == 0

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        model = kwargs["model"]
        check_supported(args, model, "ProgressiveRankCallback")
        layers = _layers(model, LowRankLinear)
        if not layers:
            raise HfCompressError(
                "ProgressiveRankCallback: the model has no LowRankLinear layers; compress it "
                "first with a lowrank stage"
            )
        self._in_place = args.world_size > 1 or is_sharded(model)
        if self._in_place:
            for layer in layers.values():  # a resumed run's factors may carry zeros already
                register_active_rank(layer)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not self.is_reduction_step(state.global_step):
            return
        model, optimizer = kwargs["model"], kwargs.get("optimizer")
        if self._in_place:
            self._reduce_in_place(model, optimizer)
            return
        replaced: dict[nn.Parameter, nn.Parameter] = {}
        with _UndoOnInterrupt() as undo:
            undo.add(lambda: record_compression(model))  # runs last: the restored structure
            for layer in _layers(model, LowRankLinear).values():
                new_rank = max(self.floor(layer), int(layer.rank * self.factor))
                if new_rank >= layer.rank:
                    continue
                old = _factor_params(layer)
                # truncate puts new factor modules in place: the old ones are the undo
                undo.add(_factor_restorer(layer, layer.u, layer.v))
                layer.truncate(new_rank)
                replaced.update(zip(old, _factor_params(layer), strict=True))
            if replaced:
                if optimizer is not None:
                    undo.add(
                        lambda: remap_optimizer(optimizer, {v: k for k, v in replaced.items()})
                    )
                    remap_optimizer(optimizer, replaced)
                record_compression(model)

    def _reduce_in_place(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        with _UndoOnInterrupt() as undo:
            for layer in _layers(model, LowRankLinear).values():
                rank = effective_rank(layer)
                new_rank = max(self.floor(layer), int(rank * self.factor))
                if new_rank >= rank:
                    continue
                params = [layer.u.weight, layer.v.weight]
                undo.add(_local_restorer(layer, params, rank))
                truncate_in_place_(layer, new_rank)
                popped = pop_optimizer_state(optimizer, params)
                undo.add(lambda o=optimizer, s=popped: restore_optimizer_state(o, s))

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        model = kwargs["model"]
        if not self._in_place or is_sharded(model):
            return  # a sharded model is shrunk when gathered for saving
        for layer in _layers(model, LowRankLinear).values():
            drop_zero_directions_(layer)
        record_compression(model)


class _UndoOnInterrupt:
    """Undo steps for in-place changes to a model, run in reverse if the block is left by any
    exception (Ctrl-C included), so a callback's change is all or nothing."""

    def __init__(self) -> None:
        self._steps: list[Callable[[], None]] = []

    def add(self, step: Callable[[], None]) -> None:
        self._steps.append(step)

    def __enter__(self) -> _UndoOnInterrupt:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> bool:
        if exc_type is not None:
            with torch.no_grad():
                for step in reversed(self._steps):
                    step()
        return False


def _update_mask_undoably(layer: PrunedLinear, sparsity: float, undo: _UndoOnInterrupt) -> None:
    new_sparsity, mask = next_mask(layer, sparsity)
    old_sparsity, old_mask = layer.sparsity, layer.mask.clone()
    weight = local_tensor(layer.weight)  # this rank's rows when sharded
    removed = local_part(old_mask & ~mask, layer.weight)
    values = weight[removed].clone()  # only what this update zeroes

    def restore() -> None:
        layer.sparsity = old_sparsity
        layer.mask.copy_(old_mask)
        weight[removed] = values

    undo.add(restore)
    set_mask_(layer, new_sparsity, mask)


def _local_restorer(
    layer: LowRankLinear, params: list[torch.Tensor], rank: int
) -> Callable[[], None]:
    """Undo an in-place truncation from this rank's own parts (no collective call)."""
    saved = [local_tensor(p).clone() for p in params]

    def restore() -> None:
        for param, values in zip(params, saved, strict=True):
            local_tensor(param).copy_(values)
        register_active_rank(layer, rank)

    return restore


def _factor_restorer(layer: LowRankLinear, u: nn.Module, v: nn.Module) -> Callable[[], None]:
    def restore() -> None:
        layer.u, layer.v = u, v

    return restore


def _factor_params(layer: LowRankLinear) -> list[nn.Parameter]:
    params = [layer.u.weight, layer.v.weight]
    if layer.u.bias is not None:
        params.append(layer.u.bias)
    return params


def remap_optimizer(
    optimizer: torch.optim.Optimizer, replaced: dict[nn.Parameter, nn.Parameter]
) -> None:
    """Put new parameters in the old ones' places; keep state only where the shape is unchanged."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
    for group in inner.param_groups:
        group["params"] = [replaced.get(p, p) for p in group["params"]]
    for old, new in replaced.items():
        state = inner.state.pop(old, None)
        if state and old.shape == new.shape:
            inner.state[new] = state


def compression_metrics(model: nn.Module) -> dict[str, float]:
    """Sparsity, ranks, parameter counts and compression ratio of a model's hfcompress layers."""
    pruned = list(_layers(model, PrunedLinear).values())
    lowrank = list(_layers(model, LowRankLinear).values())
    top = [m for m in model.modules() if isinstance(m, CompressedLayer)]
    stored = sum(p.numel() for p in model.parameters())
    masked = sum(m.mask.numel() - int(m.mask.sum()) for m in pruned)
    # factors lowered in place (DDP, FSDP) keep their shapes: their zeroed directions are no params
    dropped = sum((m.rank - effective_rank(m)) * (m.in_features + m.out_features) for m in lowrank)
    nonzero = stored - masked - dropped
    inside = {id(p) for m in top for p in m.parameters()}
    dense_equivalent = sum(p.numel() for p in model.parameters() if id(p) not in inside)
    dense_equivalent += sum(m.dense_param_count() for m in top if not _is_factor(m, lowrank))
    metrics = {
        "compression/params": float(nonzero),
        "compression/dense_params": float(dense_equivalent),
        "compression/ratio": dense_equivalent / max(nonzero, 1),
    }
    if pruned:
        total = sum(m.mask.numel() for m in pruned)
        metrics["compression/sparsity"] = masked / total
    if lowrank:
        metrics["compression/mean_rank"] = sum(effective_rank(m) for m in lowrank) / len(lowrank)
    kron = _layers(model, KroneckerLinear)
    if kron:
        metrics["compression/kronecker_terms"] = float(sum(m.terms for m in kron.values()))
    return metrics


def _is_factor(module: nn.Module, lowrank: list[LowRankLinear]) -> bool:
    return any(module is f.u or module is f.v for f in lowrank)


class CompressionLoggingCallback(TrainerCallback):
    """Add :func:`compression_metrics` to every training log (TensorBoard, W&B, log_history).

    ``DistillationTrainer`` runs it before the reporting integrations so they see the metrics;
    with a plain ``Trainer``, they appear in ``trainer.state.log_history`` and in integrations
    that run after it.
    """

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if logs is None or "model" not in kwargs:
            return
        metrics = compression_metrics(kwargs["model"])
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)
