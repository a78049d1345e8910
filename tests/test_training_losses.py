"""The distillation loss against a hand computation on fixed logits."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import HfArgumentParser

from hfcompress.errors import InvalidParameterError
from hfcompress.training import (
    DistillationArguments,
    distillation_loss,
    hidden_state_loss,
    parse_layer_map,
)


def hand_kd(student, teacher, labels, alpha, T):
    """Token by token, with plain Python sums: CE, KL(p_t ‖ p_s) at temperature T, padding skipped."""
    ce_sum, kl_sum, count = 0.0, 0.0, 0
    for s_row, t_row, label in zip(
        student.tolist(), teacher.tolist(), labels.tolist(), strict=True
    ):
        if label == -100:
            continue
        count += 1
        log_z = math.log(sum(math.exp(v) for v in s_row))
        ce_sum += log_z - s_row[label]
        zs = sum(math.exp(v / T) for v in s_row)
        zt = sum(math.exp(v / T) for v in t_row)
        ps = [math.exp(v / T) / zs for v in s_row]
        pt = [math.exp(v / T) / zt for v in t_row]
        kl_sum += sum(p * math.log(p / q) for p, q in zip(pt, ps, strict=True))
    ce, kd = ce_sum / count, T * T * kl_sum / count
    return alpha * ce + (1 - alpha) * kd, ce, kd


@pytest.mark.parametrize(("alpha", "T"), [(0.5, 2.0), (0.0, 1.0), (1.0, 3.0), (0.3, 4.0)])
def test_causal_lm_loss_matches_hand_computation(alpha, T):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 7, generator=g)
    teacher = torch.randn(2, 5, 7, generator=g)
    labels = torch.tensor([[1, 2, 3, -100, -100], [4, 5, 6, 0, 1]])
    loss, ce, kd = distillation_loss(
        student, teacher, labels, alpha=alpha, temperature=T, causal=True
    )
    # causal shift: logits at t are scored against the label at t + 1
    expected = hand_kd(
        student[:, :-1].reshape(-1, 7),
        teacher[:, :-1].reshape(-1, 7),
        labels[:, 1:].reshape(-1),
        alpha,
        T,
    )
    assert loss.item() == pytest.approx(expected[0], rel=1e-5)
    assert ce.item() == pytest.approx(expected[1], rel=1e-5)
    assert kd.item() == pytest.approx(expected[2], rel=1e-5)


def test_classification_loss_matches_hand_computation():
    student, teacher = torch.randn(4, 3), torch.randn(4, 3)
    labels = torch.tensor([0, 2, 1, 1])
    loss, _, _ = distillation_loss(
        student, teacher, labels, alpha=0.25, temperature=2.0, causal=False
    )
    assert loss.item() == pytest.approx(hand_kd(student, teacher, labels, 0.25, 2.0)[0], rel=1e-5)


def test_identical_logits_give_zero_kd_and_bf16_is_computed_in_fp32():
    logits = torch.randn(2, 4, 5).bfloat16()
    labels = torch.randint(0, 5, (2, 4))
    loss, _, kd = distillation_loss(logits, logits, labels, alpha=0.0, temperature=2.0, causal=True)
    assert kd.item() == pytest.approx(0.0, abs=1e-6) and loss.dtype == torch.float32


def test_hidden_state_loss_masks_padding():
    s = (torch.zeros(1, 3, 4), torch.ones(1, 3, 4))
    t = (torch.zeros(1, 3, 4), torch.tensor([[[1.0] * 4, [1.0] * 4, [5.0] * 4]]))
    mask = torch.tensor([[1, 1, 0]])
    assert hidden_state_loss(s, t, {1: 1}, mask).item() == pytest.approx(0.0)
    assert hidden_state_loss(s, t, {1: 1}).item() == pytest.approx(16.0 / 3)
    with pytest.raises(InvalidParameterError, match="layer_map 5:1"):
        hidden_state_loss(s, t, {5: 1})


def test_arguments_from_command_line(tmp_path):
    (args,) = HfArgumentParser(DistillationArguments).parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--alpha",
            "0.3",
            "--temperature",
            "4",
            "--hidden_weight",
            "0.1",
            "--layer_map",
            "2:4,4:8",
        ]
    )
    assert (args.alpha, args.temperature, args.hidden_weight) == (0.3, 4.0, 0.1)
    assert parse_layer_map(args.layer_map) == {2: 4, 4: 8}
    assert args.to_dict()["alpha"] == 0.3  # saved with the run


@pytest.mark.parametrize(
    ("field", "value"),
    [("alpha", 1.5), ("temperature", 0.0), ("hidden_weight", -1.0), ("layer_map", "2-4")],
)
def test_bad_arguments_name_the_field(tmp_path, field, value):
    with pytest.raises(InvalidParameterError, match=field):
        DistillationArguments(output_dir=str(tmp_path), **{field: value})
