"""``DistillationTrainer``: ``transformers.Trainer`` whose loss distills a frozen teacher."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import Trainer

from hfcompress.training.arguments import DistillationArguments, parse_layer_map
from hfcompress.training.callbacks import CompressionLoggingCallback
from hfcompress.training.losses import distillation_loss, hidden_state_loss


class DistillationTrainer(Trainer):
    """A Trainer whose loss is α·CE + (1 − α)·T²·KL(teacher ‖ student) [+ hidden-state MSE].

    Hinton et al. (2015) for the soft targets; TinyBERT (Jiao et al., 2020) for the hidden
    states. Only ``compute_loss`` (and ``log``, to report the loss parts) are overridden, so
    everything else — devices, DDP through accelerate, checkpoints, callbacks — is the Trainer's.

    Args:
        teacher: the frozen teacher. It is put in eval mode, its parameters stop requiring
            gradients, and it follows the student to its device on first use; it never enters the
            optimizer. ``None`` trains on the labels alone.
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

    def _setting(self, name: str) -> Any:
        # plain TrainingArguments: DistillationArguments' own defaults (one place for them)
        if hasattr(self.args, name):
            return getattr(self.args, name)
        return DistillationArguments.__dataclass_fields__[name].default

    def _teacher_outputs(self, inputs: dict[str, Any], device: torch.device, hidden: bool) -> Any:
        teacher = self.teacher
        if next(teacher.parameters()).device != device:
            teacher.to(device)
        teacher_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        with torch.no_grad():
            return teacher(**teacher_inputs, output_hidden_states=hidden)

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
