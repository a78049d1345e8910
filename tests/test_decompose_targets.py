"""Asymmetric calibration target T (dense outputs from compressed inputs), against lstsq and SVD."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hfcompress.decompose import dense_output_target, whitened_svd_factors
from hfcompress.errors import InvalidParameterError


def _problem(out: int, inp: int, tokens: int, noise: float, seed: int = 0):
    """W: [out, in]; dense inputs X and compressed inputs X̃ = X + noise, both [in, N], fp64."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g, dtype=torch.float64)
    X = torch.randn(inp, tokens, generator=g, dtype=torch.float64)
    Xt = X + noise * torch.randn(inp, tokens, generator=g, dtype=torch.float64)
    return W, X, Xt, Xt @ Xt.T, (X - Xt) @ Xt.T


@settings(max_examples=20, deadline=None)
@given(
    out=st.integers(1, 12),
    inp=st.integers(1, 10),
    extra=st.integers(2, 30),
    noise=st.floats(0.05, 1.0),
)
def test_undamped_target_is_the_least_squares_solution(out, inp, extra, noise):
    W, X, Xt, H, D = _problem(out, inp, inp + extra, noise)
    T = dense_output_target(W, H, D, percdamp=0.0).double()
    # independent reference: lstsq of X̃ᵀ·Tᵀ = (W·X)ᵀ
    reference = torch.linalg.lstsq(Xt.T, (W @ X).T).solution.T
    assert torch.allclose(T, reference, atol=1e-4, rtol=1e-4)


def test_objective_splits_into_residual_plus_symmetric_error():
    W, X, Xt, H, D = _problem(7, 5, 40, 0.4)
    T = dense_output_target(W, H, D, percdamp=0.0).double()
    W_hat = torch.randn(7, 5, dtype=torch.float64)
    left = (W @ X - W_hat @ Xt).square().sum()
    right = (W @ X - T @ Xt).square().sum() + ((T - W_hat) @ Xt).square().sum()
    assert torch.allclose(left, right, rtol=1e-5)


@pytest.mark.parametrize("percdamp", [0.0, 0.01, 1.0])
def test_unchanged_inputs_give_back_w(percdamp):
    W, _, _, H, _ = _problem(6, 4, 20, 0.3)
    T = dense_output_target(W, H, torch.zeros(4, 4, dtype=torch.float64), percdamp)
    assert torch.allclose(T.double(), W, atol=1e-6)


def test_damping_pulls_toward_w_and_never_fits_better_than_lstsq():
    W, X, Xt, H, D = _problem(6, 5, 30, 0.5)
    errors = []
    for percdamp in (0.0, 0.1, 10.0, 1e6):
        T = dense_output_target(W, H, D, percdamp).double()
        errors.append(float((W @ X - T @ Xt).norm()))
    assert errors == sorted(errors)
    assert errors[-1] == pytest.approx(float((W @ X - W @ Xt).norm()), rel=1e-4)


def test_whitened_factors_of_the_target_reach_the_reduced_rank_regression_optimum():
    """min over rank-r Ŵ of ‖W·X − Ŵ·X̃‖: fitted values Y = T·X̃ truncated to rank r (Eckart–Young)."""
    rank = 3
    W, X, Xt, H, D = _problem(8, 6, 60, 0.5)
    T = dense_output_target(W, H, D, percdamp=0.0)
    U, V = whitened_svd_factors(T, H.float(), rank)
    achieved = (W @ X - (U @ V).double() @ Xt).norm()
    fitted = torch.linalg.lstsq(Xt.T, (W @ X).T).solution.T @ Xt
    s = torch.linalg.svdvals(fitted)
    optimum = ((W @ X - fitted).square().sum() + s[rank:].square().sum()).sqrt()
    assert float(achieved) == pytest.approx(float(optimum), rel=1e-4)
    # and it beats the symmetric fit of W itself on the same objective
    U0, V0 = whitened_svd_factors(W.float(), H.float(), rank)
    assert achieved < (W @ X - (U0 @ V0).double() @ Xt).norm()


def test_bad_shapes_are_named():
    W = torch.randn(4, 3)
    with pytest.raises(InvalidParameterError, match=r"shift: expected \[3, 3\]"):
        dense_output_target(W, torch.eye(3), torch.zeros(2, 2))
    with pytest.raises(InvalidParameterError, match=r"H: expected \[3, 3\]"):
        dense_output_target(W, torch.eye(4), torch.zeros(3, 3))
    with pytest.raises(InvalidParameterError, match="percdamp"):
        dense_output_target(W, torch.eye(3), torch.zeros(3, 3), percdamp=-1)
    with pytest.raises(InvalidParameterError, match="not positive definite"):
        dense_output_target(W, torch.zeros(3, 3), torch.zeros(3, 3), percdamp=0.0)
