"""Nearest Kronecker sums against torch.kron and a hand-written rearrangement + SVD."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hfcompress.decompose import (
    kron_rearrange,
    kronecker_error,
    kronecker_shapes,
    kronecker_sum,
    nearest_kronecker,
)
from hfcompress.errors import InvalidParameterError

dims = st.integers(1, 5)


def explicit_kron_sum(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    return sum(torch.kron(A[k], B[k]) for k in range(A.shape[0]))


def hand_rearrangement(W: torch.Tensor, m1: int, n1: int, m2: int, n2: int) -> torch.Tensor:
    """Van Loan's R(W), one block at a time: row (i1, j1) is vec of block W[i1, j1]."""
    rows = []
    for i1 in range(m1):
        for j1 in range(n1):
            block = W[i1 * m2 : (i1 + 1) * m2, j1 * n2 : (j1 + 1) * n2]
            rows.append(block.reshape(-1))
    return torch.stack(rows)


@settings(max_examples=30, deadline=None)
@given(m1=dims, n1=dims, m2=dims, n2=dims, terms=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_sum_of_kron_products_is_recovered_exactly(m1, n1, m2, n2, terms, seed):
    terms = min(terms, m1 * n1, m2 * n2)
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(terms, m1, n1, generator=g, dtype=torch.float64)
    B = torch.randn(terms, m2, n2, generator=g, dtype=torch.float64)
    W = explicit_kron_sum(A, B)
    A_hat, B_hat = nearest_kronecker(W, (m1, n1), terms)
    assert A_hat.shape == (terms, m1, n1) and B_hat.shape == (terms, m2, n2)
    assert torch.allclose(explicit_kron_sum(A_hat, B_hat), W, atol=1e-5 * max(1.0, W.abs().max()))


@settings(max_examples=30, deadline=None)
@given(m1=dims, n1=dims, m2=dims, n2=dims, terms=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_random_matrix_error_matches_hand_rearrangement_svd(m1, n1, m2, n2, terms, seed):
    terms = min(terms, m1 * n1, m2 * n2)
    W = torch.randn(
        m1 * m2, n1 * n2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    R = hand_rearrangement(W, m1, n1, m2, n2)
    assert torch.equal(kron_rearrange(W, (m1, n1)), R)
    sigma = torch.linalg.svdvals(R)
    expected = sigma[terms:].square().sum().sqrt().item()
    A, B = nearest_kronecker(W, (m1, n1), terms)
    err = torch.linalg.matrix_norm(W - explicit_kron_sum(A, B)).item()
    assert err == pytest.approx(expected, abs=1e-4)
    assert kronecker_error(W, (m1, n1), terms) == pytest.approx(expected, abs=1e-4)


def test_kronecker_sum_matches_torch_kron():
    A, B = torch.randn(3, 2, 5), torch.randn(3, 4, 3)
    assert torch.allclose(kronecker_sum(A, B), explicit_kron_sum(A, B), atol=1e-6)


def test_seed_004_table_rows():
    shapes = {s.a_shape: s for s in kronecker_shapes(3072, 768)}
    # KronyPT Table 2: per-layer parameters of A ⊗ B for GPT-2's c_fc [3072, 768].
    expected = {
        (64, 32): 3200,
        (768, 768): 589828,
        (1536, 384): 589828,
        (1536, 768): 1179650,
        (1024, 256): 262153,
        (3072, 768): 2359297,
    }
    for a_shape, params in expected.items():
        assert shapes[a_shape].params == params
    assert shapes[(768, 768)].b_shape == (4, 1)
    assert shapes[(768, 768)].max_rank == 768
    assert shapes[(1536, 384)].max_rank == 384 * 2
    # one entry per divisor pair: 3072 = 2¹⁰·3 has 22 divisors, 768 = 2⁸·3 has 18
    assert len(shapes) == 22 * 18
    assert all(3072 % a[0] == 0 and 768 % a[1] == 0 for a in shapes)


def test_shapes_sorted_by_params():
    params = [s.params for s in kronecker_shapes(12, 8)]
    assert params == sorted(params)


@pytest.mark.parametrize(
    ("a_shape", "terms", "match"),
    [((5, 4), 1, "a_shape"), ((0, 4), 1, "a_shape"), ((3, 4), 0, "terms"), ((3, 4), 7, "terms")],
)
def test_bad_arguments_name_the_parameter(a_shape, terms, match):
    with pytest.raises(InvalidParameterError, match=match):
        nearest_kronecker(torch.randn(6, 8), a_shape, terms)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_returns_input_dtype(dtype):
    A, B = torch.randn(1, 4, 4), torch.randn(1, 2, 3)
    W = explicit_kron_sum(A, B).to(dtype)
    A_hat, B_hat = nearest_kronecker(W, (4, 4))
    assert A_hat.dtype == dtype and B_hat.dtype == dtype
    rel = (explicit_kron_sum(A_hat.float(), B_hat.float()) - W.float()).norm() / W.float().norm()
    assert rel < 2e-2
