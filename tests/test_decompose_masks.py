"""Magnitude and N:M masks: exact counts, largest magnitudes kept, group constraints."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hfcompress.decompose import magnitude_mask, nm_mask, parse_nm_pattern
from hfcompress.errors import InvalidParameterError


@settings(max_examples=40, deadline=None)
@given(
    out_features=st.integers(1, 30),
    in_features=st.integers(1, 30),
    sparsity=st.floats(0.0, 0.99),
    seed=st.integers(0, 2**16),
)
def test_magnitude_mask_exact_sparsity_and_largest_kept(out_features, in_features, sparsity, seed):
    W = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))
    mask = magnitude_mask(W, sparsity)
    numel = W.numel()
    expected_pruned = min(round(sparsity * numel), numel - 1)
    assert mask.dtype == torch.bool and mask.shape == W.shape
    assert int((~mask).sum()) == expected_pruned
    if expected_pruned:
        assert W.abs()[mask].min() >= W.abs()[~mask].max()


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 12),
    groups=st.integers(1, 6),
    nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (4, 8), (2, 8)]),
    seed=st.integers(0, 2**16),
)
def test_nm_mask_groups(rows, groups, nm, seed):
    n, m = nm
    W = torch.randn(rows, groups * m, generator=torch.Generator().manual_seed(seed))
    mask = nm_mask(W, n, m)
    per_group = mask.reshape(rows, groups, m)
    assert torch.all(per_group.sum(-1) == n)
    # Within each group, every kept magnitude ≥ every dropped one.
    mags = W.abs().reshape(rows, groups, m)
    kept_min = torch.where(per_group, mags, torch.inf).amin(-1)
    dropped_max = torch.where(~per_group, mags, -torch.inf).amax(-1)
    assert torch.all(kept_min >= dropped_max)
    assert 1 - mask.float().mean().item() == pytest.approx(1 - n / m)


def test_nm_groups_run_along_input_dimension():
    W = torch.tensor([[1.0, 4.0, 2.0, 3.0, 9.0, 0.1, 0.2, 8.0]])
    assert nm_mask(W, 2, 4).tolist() == [[False, True, False, True, True, False, False, True]]


@pytest.mark.parametrize("pattern", ["2:4", " 1 : 8 ", "3:4"])
def test_parse_pattern(pattern):
    n, m = parse_nm_pattern(pattern)
    assert 1 <= n < m


@pytest.mark.parametrize("pattern", ["4:4", "5:4", "0:4", "2-4", "two:four"])
def test_bad_pattern(pattern):
    with pytest.raises(InvalidParameterError, match=r"pattern|N:M"):
        parse_nm_pattern(pattern)


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5])
def test_bad_sparsity(sparsity):
    with pytest.raises(InvalidParameterError, match="sparsity"):
        magnitude_mask(torch.randn(4, 4), sparsity)


def test_nm_needs_divisible_input():
    with pytest.raises(InvalidParameterError, match="divisible by 4"):
        nm_mask(torch.randn(3, 6), 2, 4)
