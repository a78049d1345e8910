"""Truncated SVD factors against Eckart–Young and a hand-computed SVD."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hfcompress.decompose import (
    low_rank_error,
    rank_for_energy,
    rank_for_ratio,
    resolve_rank,
    svd_factors,
)
from hfcompress.errors import InvalidParameterError


@settings(max_examples=25, deadline=None)
@given(
    out_features=st.integers(1, 40),
    in_features=st.integers(1, 40),
    rank_fraction=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_error_equals_eckart_young(out_features, in_features, rank_fraction, seed):
    W = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))
    max_rank = min(out_features, in_features)
    rank = max(1, round(rank_fraction * max_rank))
    U, V = svd_factors(W, rank)
    assert U.shape == (out_features, rank) and V.shape == (rank, in_features)
    sigma = torch.linalg.svdvals(W.double())
    expected = sigma[rank:].square().sum().sqrt().item()
    assert torch.linalg.matrix_norm((W - U @ V).double()).item() == pytest.approx(
        expected, abs=1e-4
    )
    assert low_rank_error(W, rank) == pytest.approx(expected, abs=1e-4)


def test_factors_are_balanced_split_of_svd():
    W = torch.randn(30, 20, dtype=torch.float64)
    U_full, S, Vh = torch.linalg.svd(W, full_matrices=False)
    U, V = svd_factors(W, 5)
    # Singular vectors are defined up to sign; U·diag(1/√σ) must be ±the left vectors.
    signs = torch.sign((U / S[:5].sqrt()) * U_full[:, :5]).sum(0).sign()
    assert torch.allclose(U, U_full[:, :5] * S[:5].sqrt() * signs, atol=1e-5)
    assert torch.allclose(V, (S[:5].sqrt()[:, None] * Vh[:5]) * signs[:, None], atol=1e-5)
    # Balanced: both factors carry √Σ, so their column/row norms are equal.
    assert torch.allclose(U.norm(dim=0), V.norm(dim=1), atol=1e-5)


def test_full_rank_is_exact():
    W = torch.randn(8, 5)
    U, V = svd_factors(W, 5)
    assert torch.allclose(U @ V, W, atol=1e-5)


def test_rank_for_ratio_counts_parameters():
    # r·(out + in) ≤ ratio·out·in
    assert rank_for_ratio(3072, 768, 0.25) == math.floor(0.25 * 3072 * 768 / 3840)
    assert rank_for_ratio(10, 10, 1.0) == 5
    assert rank_for_ratio(10, 10, 0.001) == 1


def test_rank_for_energy_is_smallest_rank_reaching_energy():
    s = torch.tensor([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14
    assert rank_for_energy(s, 9 / 14) == 1
    assert rank_for_energy(s, 9 / 14 + 1e-6) == 2
    assert rank_for_energy(s, 13 / 14) == 2
    assert rank_for_energy(s, 1.0) == 3


def test_energy_selection_keeps_requested_energy():
    W = torch.randn(40, 30)
    U, _ = svd_factors(W, energy=0.9)
    s = torch.linalg.svdvals(W.double())
    r = U.shape[1]
    kept = s[:r].square().sum() / s.square().sum()
    kept_one_less = s[: r - 1].square().sum() / s.square().sum()
    assert kept >= 0.9 - 1e-9 and kept_one_less < 0.9


def test_randomized_is_close_on_low_rank_matrix():
    W = torch.randn(300, 8) @ torch.randn(8, 200)
    U, V = svd_factors(W, 8, method="randomized")
    assert torch.linalg.matrix_norm(W - U @ V) / torch.linalg.matrix_norm(W) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_runs_in_fp32_and_returns_input_dtype(dtype):
    W32 = torch.randn(24, 16)
    U, V = svd_factors(W32.to(dtype), 4)
    assert U.dtype == dtype and V.dtype == dtype
    U_ref, V_ref = svd_factors(W32.to(dtype).float(), 4)
    assert torch.allclose((U.float() @ V.float()), U_ref @ V_ref, atol=5e-2)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"rank": 0}, "rank=0"),
        ({"rank": 9}, "rank=9"),
        ({"rank": 2.5}, "rank=2.5"),
        ({"ratio": 0.0}, "ratio=0.0"),
        ({"ratio": 1.5}, "ratio=1.5"),
        ({"energy": 0.0}, "energy=0.0"),
        ({}, "exactly one"),
        ({"rank": 2, "ratio": 0.5}, "exactly one"),
    ],
)
def test_bad_rank_selection_names_the_parameter(kwargs, field):
    with pytest.raises(InvalidParameterError, match=field):
        resolve_rank(torch.randn(8, 12), **kwargs)
