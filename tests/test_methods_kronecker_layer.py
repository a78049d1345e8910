"""KroneckerLinear: exact recovery, forward against an explicit torch.kron matrix, costs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from conftest import linear_and_conv1d
from hfcompress import InvalidParameterError, KroneckerLinear
from hfcompress.methods.kronecker.layer import contraction_costs

dims = st.integers(1, 5)


def explicit(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    return sum(torch.kron(A[k], B[k]) for k in range(A.shape[0]))


def linear_from(W: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    linear = nn.Linear(W.shape[1], W.shape[0], bias=bias is not None, dtype=W.dtype)
    with torch.no_grad():
        linear.weight.copy_(W)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


@settings(max_examples=40, deadline=None)
@given(
    m1=dims,
    n1=dims,
    m2=dims,
    n2=dims,
    terms=st.integers(1, 3),
    batch=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_forward_matches_explicit_kron_for_any_shape_and_terms(m1, n1, m2, n2, terms, batch, seed):
    terms = min(terms, m1 * n1, m2 * n2)
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(terms, m1, n1, generator=g, dtype=torch.float64)
    B = torch.randn(terms, m2, n2, generator=g, dtype=torch.float64)
    bias = torch.randn(m1 * m2, generator=g, dtype=torch.float64)
    W = explicit(A, B)
    layer = KroneckerLinear.from_module(linear_from(W, bias), a_shape=(m1, n1), terms=terms)
    # exact recovery of a sum of `terms` Kronecker products (to fp32, where the SVD runs)
    assert torch.allclose(explicit(layer.A, layer.B), W, atol=1e-5 * max(1.0, W.abs().max()))
    x = torch.randn(batch, 3, n1 * n2, generator=g, dtype=torch.float64)
    assert torch.allclose(layer(x), x @ W.T + bias, atol=1e-5 * max(1.0, W.abs().max()))
    # both contraction orders agree with the reference, whichever forward chose
    for order in ("a_first", "b_first"):
        layer.order = order
        assert torch.allclose(layer(x), x @ W.T + bias, atol=1e-5 * max(1.0, W.abs().max()))


def test_forward_with_trained_factors_matches_kron():
    layer = KroneckerLinear.from_module(nn.Linear(12, 6), a_shape=(3, 4), terms=2)
    with torch.no_grad():
        layer.A.normal_()
        layer.B.normal_()
    x = torch.randn(5, 12)
    assert torch.allclose(layer(x), x @ explicit(layer.A, layer.B).T + layer.bias, atol=1e-5)


def test_parameter_count_formula():
    _, conv = linear_and_conv1d(3072 // 16, 768 // 16)  # [192, 48]
    layer = KroneckerLinear.from_module(conv, a_shape=(48, 12), terms=3)
    assert layer.b_shape == (4, 4)
    assert sum(p.numel() for p in layer.parameters()) == 3 * (48 * 12 + 4 * 4) + 192


def test_contraction_order_follows_cost():
    # GPT-2 c_fc [3072, 768] with A = (768, 768), B = (4, 1): A first is 4x cheaper than dense.
    costs = contraction_costs((768, 768), (4, 1), 1)
    assert costs["a_first"] == 768 * 1 * (768 + 4)
    assert costs["b_first"] == 768 * 4 * (1 + 768)
    layer = KroneckerLinear(768, 3072, (768, 768))
    assert layer.order == "a_first"
    assert KroneckerLinear(3072, 768, (768, 768)).order == "b_first"  # B = (1, 4)


def test_forward_never_builds_the_dense_weight(monkeypatch):
    import hfcompress.methods.kronecker.layer as module

    def forbidden(*args, **kwargs):
        raise AssertionError("forward must not materialize W")

    layer = KroneckerLinear.from_module(nn.Linear(16, 12), a_shape=(3, 4), terms=2)
    x = torch.randn(2, 16)
    expected = x @ explicit(layer.A, layer.B).T + layer.bias  # before the trap is set
    monkeypatch.setattr(module, "kronecker_sum", forbidden)
    monkeypatch.setattr(torch, "kron", forbidden)
    y = layer(x)
    y.sum().backward()
    assert torch.allclose(y, expected, atol=1e-5)
    assert layer.A.grad is not None and layer.B.grad is not None


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"a_shape": (5, 4)}, r"a_shape=\(5, 4\): expected two positive integers"),
        ({"a_shape": (3, 0)}, "a_shape"),
        ({"a_shape": (3, 4), "terms": 0}, "terms=0"),
        ({"a_shape": (3, 4), "terms": 13}, r"terms=13: expected an integer in \[1, min"),
    ],
)
def test_bad_parameters(params, match):
    with pytest.raises(InvalidParameterError, match=match):
        KroneckerLinear.from_module(nn.Linear(16, 12), **params)


def test_extra_repr():
    text = repr(KroneckerLinear.from_module(nn.Linear(16, 12), a_shape=(3, 4), terms=2))
    assert "a_shape=(3, 4)" in text and "b_shape=(4, 4)" in text and "terms=2" in text
