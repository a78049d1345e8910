"""Distillation losses (Hinton et al., 2015; TinyBERT's hidden-state MSE, Jiao et al., 2020).

Pure functions of logits and labels, so they can be checked against a hand computation and
reused outside the Trainer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hfcompress.errors import InvalidParameterError

IGNORE_INDEX = -100


def _flatten_for_causal_lm(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # position t predicts token t + 1: drop the last logit and the first label
    vocab = student.shape[-1]
    return (
        student[:, :-1].reshape(-1, vocab),
        teacher[:, :-1].reshape(-1, vocab),
        labels[:, 1:].reshape(-1),
    )


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """α·CE(student, labels) + (1 − α)·T²·KL(softmax(t/T) ‖ softmax(s/T)).

    Args:
        student_logits: [B, S, V] for a causal LM, [B, C] for classification.
        teacher_logits: same shape as ``student_logits``.
        labels: [B, S] token ids (``-100`` marks padding / ignored positions) or [B] classes.
        alpha: weight of the hard-label cross-entropy, in [0, 1]; 1 is plain supervised training.
        temperature: T > 0; the T² factor keeps the soft-target gradients' scale independent of T.
        causal: shift so that position t is scored against label t + 1 (causal LM).

    Returns:
        ``(loss, ce, kd)``, each the mean over positions whose label is not ``-100``. Computed in
        fp32 whatever the logits' dtype.
    """
    if not 0.0 <= alpha <= 1.0:
        raise InvalidParameterError(f"alpha={alpha!r}: expected a weight in [0, 1]")
    if temperature <= 0:
        raise InvalidParameterError(f"temperature={temperature!r}: expected T > 0")
    if student_logits.shape != teacher_logits.shape:
        raise InvalidParameterError(
            f"teacher logits {tuple(teacher_logits.shape)} do not match the student's "
            f"{tuple(student_logits.shape)}: teacher and student need the same vocabulary/labels"
        )
    student, teacher = student_logits.float(), teacher_logits.float()
    if causal:
        student, teacher, labels = _flatten_for_causal_lm(student, teacher, labels)
    valid = labels != IGNORE_INDEX
    count = valid.sum().clamp_min(1)
    ce = F.cross_entropy(student, labels.clamp_min(0), reduction="none")
    ce = (ce * valid).sum() / count
    log_p_student = F.log_softmax(student / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher / temperature, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
    kd = (kl * valid).sum() / count * temperature**2
    return alpha * ce + (1 - alpha) * kd, ce, kd


def hidden_state_loss(
    student_hidden: tuple[torch.Tensor, ...],
    teacher_hidden: tuple[torch.Tensor, ...],
    layer_map: dict[int, int],
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over mapped layers of the MSE between hidden states [B, S, H] (TinyBERT).

    ``layer_map`` maps a student hidden-state index to a teacher one (index 0 is the embedding
    output, as in ``output_hidden_states``). Padding positions (``attention_mask == 0``) are
    excluded.
    """
    losses = []
    for s_index, t_index in layer_map.items():
        if not (0 <= s_index < len(student_hidden) and 0 <= t_index < len(teacher_hidden)):
            raise InvalidParameterError(
                f"layer_map {s_index}:{t_index}: the student has {len(student_hidden)} hidden "
                f"states and the teacher {len(teacher_hidden)} (index 0 is the embeddings)"
            )
        s, t = student_hidden[s_index].float(), teacher_hidden[t_index].float()
        if s.shape != t.shape:
            raise InvalidParameterError(
                f"layer_map {s_index}:{t_index}: hidden sizes differ ({tuple(s.shape)} vs "
                f"{tuple(t.shape)}); map layers of equal width"
            )
        squared = (s - t).square().mean(-1)  # [B, S]
        if attention_mask is not None:
            weights = attention_mask.to(squared.dtype)
            losses.append((squared * weights).sum() / weights.sum().clamp_min(1))
        else:
            losses.append(squared.mean())
    return torch.stack(losses).mean()
