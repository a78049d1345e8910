"""LowRankLinear: Eckart–Young error, rank selection, truncation that shrinks parameters."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from conftest import linear_and_conv1d
from hfcompress import InvalidParameterError, LowRankLinear, PrunedLinear


@settings(max_examples=20, deadline=None)
@given(out_features=st.integers(2, 40), in_features=st.integers(2, 40), seed=st.integers(0, 2**16))
def test_error_is_eckart_young(out_features, in_features, seed):
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features)
    rank = max(1, min(out_features, in_features) // 2)
    layer = LowRankLinear.from_module(linear, rank=rank)
    sigma = torch.linalg.svdvals(linear.weight.detach().double())
    expected = sigma[rank:].square().sum().sqrt().item()
    err = torch.linalg.matrix_norm((linear.weight - layer.dense_weight()).double()).item()
    assert err == pytest.approx(expected, abs=1e-4)


def test_parameter_count_formula():
    linear, conv = linear_and_conv1d(30, 20)
    for source in (linear, conv):
        layer = LowRankLinear.from_module(source, rank=7)
        assert sum(p.numel() for p in layer.parameters()) == 7 * (30 + 20) + 30
        assert layer.u.weight.shape == (30, 7) and layer.v.weight.shape == (7, 20)


def test_ratio_and_energy_select_rank():
    linear = nn.Linear(768, 3072)
    assert LowRankLinear.from_module(linear, ratio=0.25).rank == 153
    layer = LowRankLinear.from_module(nn.Linear(40, 30), energy=0.8)
    s = torch.linalg.svdvals(layer.to_dense().weight.double())  # rank-r matrix
    assert layer.rank == int((s > 1e-6).sum())


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_truncate_equals_svd_of_product_and_shrinks(kind):
    linear, conv = linear_and_conv1d(40, 30)
    layer = LowRankLinear.from_module(linear if kind == "linear" else conv, rank=20)
    with torch.no_grad():  # make U, V unbalanced, as training would
        layer.u.weight.mul_(3.0)
        layer.v.weight.add_(0.1 * torch.randn_like(layer.v.weight))
    product = layer.dense_weight().detach().double()
    before = sum(p.numel() for p in layer.parameters())
    layer.truncate(8)
    assert layer.rank == 8
    assert sum(p.numel() for p in layer.parameters()) == before - 12 * (40 + 30)
    sigma = torch.linalg.svdvals(product)
    err = torch.linalg.matrix_norm(product - layer.dense_weight().double()).item()
    assert err == pytest.approx(sigma[8:].square().sum().sqrt().item(), rel=1e-4)
    assert torch.allclose(layer.u.weight.norm(dim=0), layer.v.weight.norm(dim=1), rtol=1e-4)
    assert torch.equal(layer.u.bias, linear.bias)
    layer(torch.randn(2, 30)).sum().backward()  # still trainable


def test_truncate_refuses_bad_rank_and_compressed_factors():
    layer = LowRankLinear.from_module(nn.Linear(16, 16), rank=4)
    for bad in (0, 5, 2.0):
        with pytest.raises(InvalidParameterError, match="new_rank"):
            layer.truncate(bad)
    layer.u = PrunedLinear.from_module(layer.u, sparsity=0.5)
    with pytest.raises(InvalidParameterError, match="PrunedLinear"):
        layer.truncate(2)


def test_factors_can_be_pruned_and_effective_weight_follows():
    linear = nn.Linear(32, 24)
    layer = LowRankLinear.from_module(linear, rank=8)
    layer.u = PrunedLinear.from_module(layer.u, sparsity=0.5)
    layer.v = PrunedLinear.from_module(layer.v, pattern="2:4")
    x = torch.randn(5, 32)
    W = layer.u.dense_weight() @ layer.v.dense_weight()
    assert torch.allclose(layer.dense_weight(), W)
    assert torch.allclose(layer(x), x @ W.T + linear.bias, atol=1e-5)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"rank": 0}, "rank=0"),
        ({"rank": 17}, r"rank=17: expected an integer in \[1, min\(out, in\)\] = \[1, 8\]"),
        ({"ratio": 0}, "ratio=0"),
        ({"energy": 1.2}, "energy=1.2"),
        ({"rank": 2, "energy": 0.5}, "exactly one"),
    ],
)
def test_bad_parameters(params, match):
    with pytest.raises(InvalidParameterError, match=match):
        LowRankLinear.from_module(nn.Linear(16, 8), **params)


def test_extra_repr():
    assert "rank=3" in repr(LowRankLinear.from_module(nn.Linear(16, 8), rank=3))
