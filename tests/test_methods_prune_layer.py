"""PrunedLinear: exact sparsity, largest weights kept, zeros that no optimizer revives."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import linear_and_conv1d
from hfcompress import InvalidParameterError, PrunedLinear


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_unstructured_exact_sparsity_and_largest_kept(kind):
    linear, conv = linear_and_conv1d(48, 64)
    layer = PrunedLinear.from_module(linear if kind == "linear" else conv, sparsity=0.7)
    W = linear.weight
    assert int((~layer.mask).sum()) == round(0.7 * W.numel())
    assert W.abs()[layer.mask].min() >= W.abs()[~layer.mask].max()
    assert torch.equal(layer.weight[~layer.mask], torch.zeros(int((~layer.mask).sum())))
    assert torch.equal(layer.weight[layer.mask], W[layer.mask])


@pytest.mark.parametrize(("pattern", "n", "m"), [("2:4", 2, 4), ("1:4", 1, 4), ("4:8", 4, 8)])
def test_nm_pattern_groups_along_input(pattern, n, m):
    linear, _ = linear_and_conv1d(16, 64)
    layer = PrunedLinear.from_module(linear, pattern=pattern)
    assert layer.sparsity == pytest.approx(1 - n / m)
    groups = (layer.dense_weight() != 0).reshape(16, 64 // m, m).sum(-1)
    assert torch.all(groups <= n)
    assert torch.all(layer.mask.reshape(16, -1, m).sum(-1) == n)


def test_mask_is_a_persistent_bool_buffer():
    linear, _ = linear_and_conv1d(8, 8)
    layer = PrunedLinear.from_module(linear, sparsity=0.5)
    state = layer.state_dict()
    assert set(state) == {"weight", "bias", "mask"}
    assert state["mask"].dtype == torch.bool
    assert sum(p.numel() for p in layer.parameters()) == 8 * 8 + 8
    assert layer.nonzero_param_count() == 32 + 8


def test_zeros_survive_adamw_with_weight_decay():
    linear, _ = linear_and_conv1d(32, 32)
    layer = PrunedLinear.from_module(linear, sparsity=0.5)
    pruned = ~layer.mask.clone()
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(200):
        optimizer.zero_grad()
        loss = (layer(torch.randn(16, 32)) - torch.randn(16, 32)).square().mean()
        loss.backward()
        assert torch.all(layer.weight.grad[pruned] == 0)
        optimizer.step()
    assert torch.all(layer.weight[pruned] == 0)
    assert torch.all(layer.dense_weight()[pruned] == 0)
    assert not torch.equal(layer.weight[~pruned], linear.weight[~pruned])  # the rest trained


def test_update_mask_raises_sparsity_and_keeps_pattern():
    linear, _ = linear_and_conv1d(16, 16)
    layer = PrunedLinear.from_module(linear, sparsity=0.25)
    first = layer.mask.clone()
    layer.update_mask(0.75)
    assert int((~layer.mask).sum()) == round(0.75 * 256)
    assert torch.all(~layer.mask[~first])  # nothing pruned earlier comes back
    assert torch.all(layer.weight[~layer.mask] == 0)
    nm = PrunedLinear.from_module(linear, pattern="2:4")
    nm.update_mask(0.9)
    assert nm.sparsity == 0.5 and torch.all(nm.mask.reshape(16, 4, 4).sum(-1) == 2)


def test_zero_sparsity_keeps_everything():
    linear, _ = linear_and_conv1d(8, 8)
    layer = PrunedLinear.from_module(linear, sparsity=0.0)
    assert bool(layer.mask.all())
    assert torch.equal(layer.dense_weight(), linear.weight)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"sparsity": 1.0}, "sparsity=1.0"),
        ({"sparsity": -0.1}, "sparsity=-0.1"),
        ({}, "sparsity: required"),
        ({"pattern": "4:4"}, "N < M"),
        ({"pattern": "5:4"}, "N < M"),
        ({"pattern": "2:4", "sparsity": 0.3}, "implies sparsity 0.5"),
        ({"pattern": "2:3"}, "divisible by 3"),
        ({"pattern": "blocky"}, "pattern='blocky'"),
    ],
)
def test_bad_parameters_name_parameter_value_and_expectation(params, match):
    with pytest.raises(InvalidParameterError, match=match):
        PrunedLinear.from_module(nn.Linear(16, 8), **params)


def test_nm_with_matching_sparsity_is_accepted():
    layer = PrunedLinear.from_module(nn.Linear(16, 8), pattern="2:4", sparsity=0.5)
    assert layer.pattern == "2:4"


def test_extra_repr_shows_pattern_and_sparsity():
    text = repr(PrunedLinear.from_module(nn.Linear(16, 8), pattern="2:4"))
    assert "pattern=2:4" in text and "sparsity=0.5000" in text and "in_features=16" in text
