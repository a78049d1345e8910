"""``DistillationTrainer``: ``transformers.Trainer`` whose loss distills a frozen teacher."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINING_ARGS_NAME

from hfcompress.training.arguments import DistillationArguments, parse_layer_map
from hfcompress.training.callbacks import CompressionLoggingCallback
from hfcompress.training.distributed import fsdp_modules, is_sharded
from hfcompress.training.losses import distillation_loss, hidden_state_loss
from hfcompress.training.sharded_checkpoint import (
    load_into_sharded,
    load_optimizer,
    save_full_checkpoint,
    save_optimizer,
)


class DistillationTrainer(Trainer):
    """A Trainer whose loss is α·CE + (1 − α)·T²·KL(teacher ‖ student) [+ hidden-state MSE].

    Hinton et al. (2015) for the soft targets; TinyBERT (Jiao et al., 2020) for the hidden
    states. ``compute_loss`` (and ``log``, to report the loss parts) are overridden, so
    everything else — devices, DDP through accelerate, checkpoints, callbacks — is the Trainer's.

    A student sharded before the Trainer sees it (FSDP2: ``shard_model`` or ``fully_shard``)
    trains as it is: accelerate does not wrap it in DDP, and the checkpoint methods
    (``save_model``, the optimizer state, resuming) gather and scatter its state, so that a saved
    checkpoint is an ordinary hfcompress one (see :mod:`hfcompress.training.sharded_checkpoint`).

    Args:
        teacher: the frozen teacher. It is put in eval mode, its parameters stop requiring
            gradients, and it follows the student to its device on first use; it never enters the
            optimizer. It may be whole on every rank or sharded (``shard_model``), whatever the
            student. ``None`` trains on the labels alone.
        *args, **kwargs: as for ``transformers.Trainer``. The distillation settings come from
            ``args`` when it is a :class:`DistillationArguments` (defaults otherwise).

    Example:
        >>> args = DistillationArguments(output_dir="out", alpha=0.5, temperature=2.0)
        >>> trainer = DistillationTrainer(
        ...     model=student, teacher=teacher, args=args, train_dataset=blocks)
        >>> trainer.train()
    """

    def __init__(self, *args: Any, teacher: nn.Module | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # compute_loss returns a per-batch mean: the Trainer divides it for gradient accumulation
        self.loss_is_scaled_for_ga = False
        self.teacher = teacher
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)
        self._parts: dict[str, list[float]] = {"ce": [], "kd": [], "hidden": []}
        _compression_logging_first(self)
        # Sharded before the Trainer: it reduces its own gradients. The Trainer's path for models
        # sharded at load time keeps accelerate from wrapping it in DDP.
        if is_sharded(self.model):
            self.is_distributed_loading_by_transformers = True

    def _setting(self, name: str) -> Any:
        # plain TrainingArguments: DistillationArguments' own defaults (one place for them)
        if hasattr(self.args, name):
            return getattr(self.args, name)
        return DistillationArguments.__dataclass_fields__[name].default

    def _teacher_outputs(self, inputs: dict[str, Any], device: torch.device, hidden: bool) -> Any:
        teacher = self.teacher
        sharded = is_sharded(teacher)
        if not sharded and next(teacher.parameters()).device != device:
            teacher.to(device)
        teacher_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        with torch.no_grad():
            outputs = teacher(**teacher_inputs, output_hidden_states=hidden)
        if sharded:
            # FSDP2 keeps the root's parameters gathered after forward, for a backward that a
            # frozen teacher never runs: free them
            for module in fsdp_modules(teacher):
                module.reshard()
        return outputs

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """The distillation loss of one batch (a mean over its non-padding tokens)."""
        alpha, hidden_weight = self._setting("alpha"), self._setting("hidden_weight")
        use_teacher = self.teacher is not None and (alpha < 1.0 or hidden_weight > 0)
        want_hidden = use_teacher and hidden_weight > 0
        outputs = model(**inputs, output_hidden_states=want_hidden)
        labels = inputs["labels"]
        logits = outputs.logits
        if use_teacher:
            teacher_out = self._teacher_outputs(inputs, logits.device, want_hidden)
            teacher_logits = teacher_out.logits
        else:
            teacher_logits, alpha = logits.detach(), 1.0
        loss, ce, kd = distillation_loss(
            logits,
            teacher_logits,
            labels,
            alpha=alpha,
            temperature=self._setting("temperature"),
            causal=logits.ndim == 3,
        )
        hidden = torch.zeros((), device=loss.device)
        if want_hidden:
            student_h, teacher_h = outputs.hidden_states, teacher_out.hidden_states
            layer_map = parse_layer_map(self._setting("layer_map")) or {
                len(student_h) - 1: len(teacher_h) - 1
            }
            hidden = hidden_state_loss(
                student_h, teacher_h, layer_map, inputs.get("attention_mask")
            )
            loss = loss + hidden_weight * hidden
        for name, value in (("ce", ce), ("kd", kd), ("hidden", hidden)):
            self._parts[name].append(float(value.detach()))
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the mean CE / KD / hidden-state parts since the last log to training logs."""
        if "loss" in logs:
            for name, values in self._parts.items():
                if values:
                    logs[f"loss_{name}"] = sum(values) / len(values)
                values.clear()
        super().log(logs, start_time)

    # ---- a sharded student: gathered checkpoints ----------------------------------------------

    def _move_model_to_device(self, model: nn.Module, device: torch.device) -> None:
        if not is_sharded(model):  # FSDP2 placed the shards
            super()._move_model_to_device(model, device)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save an hfcompress checkpoint; a sharded student is gathered first (all ranks call).

        The user's ``save_model`` drops the directions a distributed ``ProgressiveRankCallback``
        zeroed, so the checkpoint has the scheduled ranks; Trainer checkpoints keep the training
        shapes, which the saved optimizer state matches.
        """
        if not is_sharded(self.model):  # sharded: by the user (shard_model) or accelerate (fsdp=)
            super().save_model(output_dir, _internal_call)
            return
        output_dir = self.args.output_dir if output_dir is None else output_dir
        save_full_checkpoint(self.model, output_dir, drop_zero_directions=not _internal_call)
        if self.args.should_save:
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if self.is_fsdp_enabled or not is_sharded(self.model):  # accelerate's FSDP saves its own
            super()._save_optimizer_and_scheduler(output_dir)
            return
        save_optimizer(self.model, self.optimizer, os.path.join(output_dir, OPTIMIZER_NAME))
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or self.is_fsdp_enabled or not is_sharded(self.model):
            super()._load_optimizer_and_scheduler(checkpoint)
            return
        optimizer = os.path.join(checkpoint, OPTIMIZER_NAME)
        scheduler = os.path.join(checkpoint, SCHEDULER_NAME)
        if os.path.isfile(optimizer) and os.path.isfile(scheduler):
            load_optimizer(self.model, self.optimizer, optimizer)
            self.lr_scheduler.load_state_dict(torch.load(scheduler, weights_only=True))

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: nn.Module | None = None
    ) -> None:
        target = self.model if model is None else model
        if is_sharded(target):
            load_into_sharded(target, resume_from_checkpoint)
        else:
            super()._load_from_checkpoint(resume_from_checkpoint, model)


def _compression_logging_first(trainer: Trainer) -> None:
    """Move CompressionLoggingCallback ahead of the reporting integrations.

    The Trainer runs its own callbacks (TensorBoard, W&B, ...) before user ones; the metrics a
    CompressionLoggingCallback adds in ``on_log`` reach them only if it runs first.
    """
    callbacks = trainer.callback_handler.callbacks
    ours = [c for c in callbacks if isinstance(c, CompressionLoggingCallback)]
    for callback in ours:
        callbacks.remove(callback)
    callbacks[:0] = ours
