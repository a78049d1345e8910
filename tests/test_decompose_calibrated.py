"""Calibration-aware pruning and factors against references computed here from explicit X."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import devices
from hfcompress.decompose import kronecker_sum, nearest_kronecker, nm_mask, svd_factors
from hfcompress.decompose.calibrated import (
    activation_svd_factors,
    fisher_svd_factors,
    scaled_nearest_kronecker,
    sparsegpt_prune,
    wanda_mask,
    wanda_scores,
    whitened_svd_factors,
)
from hfcompress.errors import InvalidParameterError


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def calibration_inputs(in_features: int, tokens: int, g: torch.Generator) -> torch.Tensor:
    """X: [in, N] with feature scales spanning 100x and correlated features."""
    scales = torch.logspace(-1, 1, in_features)[torch.randperm(in_features, generator=g)]
    mixing = torch.eye(in_features) + 0.5 * torch.randn(in_features, in_features, generator=g) / (
        in_features**0.5
    )
    return (scales[:, None] * mixing) @ torch.randn(in_features, tokens, generator=g)


def output_error(W: torch.Tensor, W_hat: torch.Tensor, X: torch.Tensor) -> float:
    """‖(W − Ŵ)X‖_F in float64."""
    return torch.linalg.matrix_norm((W.double() - W_hat.double()) @ X.double()).item()


def tail_norm(M: torch.Tensor, r: int) -> float:
    """Eckart–Young optimum √(Σ_{i>r} σᵢ(M)²)."""
    return torch.linalg.svdvals(M.double())[r:].square().sum().sqrt().item()


def per_row_magnitude_mask(W: torch.Tensor, n_prune: int) -> torch.Tensor:
    order = W.abs().argsort(dim=1)
    mask = torch.ones_like(W, dtype=torch.bool)
    mask.scatter_(1, order[:, :n_prune], False)
    return mask


# --- Wanda ---------------------------------------------------------------------------------------


def test_wanda_scores_are_weight_times_input_norm():
    g = gen(0)
    W, X = torch.randn(5, 7, generator=g), torch.randn(7, 30, generator=g)
    norm = X.square().sum(dim=1).sqrt()
    by_hand = torch.tensor(
        [[abs(W[i, j].item()) * norm[j].item() for j in range(7)] for i in range(5)]
    )
    torch.testing.assert_close(wanda_scores(W, norm), by_hand)


@settings(max_examples=30, deadline=None)
@given(
    out_features=st.integers(1, 12),
    in_features=st.integers(1, 24),
    sparsity=st.floats(0.0, 0.99),
    seed=st.integers(0, 2**16),
)
def test_wanda_unstructured_prunes_each_row_by_score(out_features, in_features, sparsity, seed):
    g = gen(seed)
    W = torch.randn(out_features, in_features, generator=g)
    norm = torch.rand(in_features, generator=g) * 10
    mask = wanda_mask(W, norm, sparsity)
    expected = min(round(sparsity * in_features), in_features - 1)
    assert torch.all((~mask).sum(dim=1) == expected)
    if expected:
        scores = W.abs() * norm
        kept_min = torch.where(mask, scores, torch.inf).amin(dim=1)
        pruned_max = torch.where(~mask, scores, -torch.inf).amax(dim=1)
        assert torch.all(kept_min >= pruned_max)


@pytest.mark.parametrize(("pattern", "n", "m"), [("2:4", 2, 4), ("1:4", 1, 4), ("4:8", 4, 8)])
def test_wanda_nm_keeps_n_highest_scores_per_group(pattern, n, m):
    g = gen(1)
    W, norm = torch.randn(6, 16, generator=g), torch.rand(16, generator=g)
    mask = wanda_mask(W, norm, pattern=pattern)
    assert torch.all(mask.reshape(6, -1, m).sum(-1) == n)
    assert torch.equal(mask, nm_mask(W.abs() * norm, n, m))


def test_wanda_beats_magnitude_on_scaled_inputs():
    g = gen(2)
    W, X = torch.randn(16, 64, generator=g), calibration_inputs(64, 512, g)
    wanda = output_error(W, W * wanda_mask(W, X.norm(dim=1), 0.5), X)
    magnitude = output_error(W, W * per_row_magnitude_mask(W, 32), X)
    assert wanda < 0.5 * magnitude


# --- SparseGPT -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_beats_magnitude_output_error(seed, pattern):
    g = gen(seed)
    W, X = torch.randn(16, 64, generator=g), calibration_inputs(64, 512, g)
    sparsity = 0.5 if pattern == "unstructured" else None
    W_hat, mask = sparsegpt_prune(W, X @ X.T, sparsity, pattern, blocksize=32)
    if pattern == "unstructured":
        assert torch.all((~mask).sum(dim=1) == 32)  # balance="row" (default): every row alike
        _, block_mask = sparsegpt_prune(
            W, X @ X.T, sparsity, pattern, blocksize=32, balance="block"
        )
        assert int((~block_mask).sum()) == 16 * 32  # one threshold per block
        baseline = per_row_magnitude_mask(W, 32)
    else:
        assert torch.all(mask.reshape(16, -1, 4).sum(-1) == 2)
        baseline = nm_mask(W, 2, 4)
    assert torch.all(W_hat[~mask] == 0)
    # Observed ratios: 0.18-0.24 unstructured, 0.28-0.46 for 2:4.
    assert output_error(W, W_hat, X) < 0.6 * output_error(W, W * baseline, X)


def _obs_problem(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = gen(seed)
    X = torch.randn(6, 40, generator=g, dtype=torch.float64)
    X[1] += 0.8 * X[0]  # correlated inputs, so compensation moves the other weights
    W = torch.randn(2, 6, generator=g, dtype=torch.float64)
    return W, X @ X.T, X


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparsegpt_first_column_equals_closed_form_obs(seed):
    W, H, X = _obs_problem(seed)
    W[:, 0] *= 0.01  # make column 0 every row's OBS-saliency argmin
    Hinv = torch.linalg.inv(H)
    saliency = W.square() / Hinv.diagonal()
    assert torch.all(saliency.argmin(dim=1) == 0)
    W_hat, mask = sparsegpt_prune(W.float(), H.float(), 1 / 6, percdamp=0.0)
    assert torch.equal(~mask, torch.zeros_like(mask).index_fill_(1, torch.tensor([0]), True))
    # OBS: δw = −(w_q/[H⁻¹]_qq)·H⁻¹[:, q], which zeroes w_q and re-fits every other weight.
    expected = W - (W[:, :1] / Hinv[0, 0]) * Hinv[:, 0][None, :]
    torch.testing.assert_close(W_hat.double(), expected, atol=1e-4, rtol=1e-4)
    # ... and its output error is the OBS loss w_q²/[H⁻¹]_qq.
    loss = output_error(W, W_hat, X) ** 2
    assert loss == pytest.approx(saliency[:, 0].sum().item(), rel=1e-3)


@pytest.mark.parametrize("seed", [3, 4, 5, 6])
def test_sparsegpt_step_is_obs_with_earlier_columns_frozen(seed):
    """A later column q is OBS on the trailing problem H[q:, q:]: columns < q stay put."""
    W, H, _ = _obs_problem(seed)
    W = W[:1]
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    q = int((W[0].square() / U.diagonal().square()).argmin())
    W_hat, mask = sparsegpt_prune(W.float(), H.float(), 1 / 6, percdamp=0.0)
    assert (~mask[0]).nonzero().flatten().tolist() == [q]
    trailing_inv = torch.linalg.inv(H[q:, q:])
    expected = W.clone()
    expected[:, q:] -= (W[:, q : q + 1] / trailing_inv[0, 0]) * trailing_inv[:, 0][None, :]
    torch.testing.assert_close(W_hat.double(), expected, atol=1e-4, rtol=1e-4)


def test_sparsegpt_lazy_batches_are_exact():
    g = gen(7)
    W, X = torch.randn(8, 32, generator=g), calibration_inputs(32, 128, g)
    small, small_mask = sparsegpt_prune(W, X @ X.T, pattern="2:4", blocksize=4)
    whole, whole_mask = sparsegpt_prune(W, X @ X.T, pattern="2:4", blocksize=32)
    assert torch.equal(small_mask, whole_mask)
    torch.testing.assert_close(small, whole, atol=1e-4, rtol=1e-4)


def test_sparsegpt_dead_inputs_and_zero_sparsity():
    g = gen(8)
    W, X = torch.randn(4, 8, generator=g), torch.randn(8, 20, generator=g)
    X[3] = 0.0
    H = X @ X.T
    H_before = H.clone()
    W_hat, _ = sparsegpt_prune(W, H, 0.25, blocksize=4)
    assert torch.equal(H, H_before)  # the caller's H is not modified
    assert torch.all(W_hat[:, 3] == 0) and torch.isfinite(W_hat).all()
    unchanged, all_kept = sparsegpt_prune(W, X @ X.T + torch.eye(8), 0.0)
    assert all_kept.all() and torch.equal(unchanged, W)


# --- calibrated SVD ------------------------------------------------------------------------------


@pytest.mark.parametrize(("seed", "rank"), [(0, 1), (1, 4), (2, 7)])
def test_whitened_svd_reaches_output_error_optimum(seed, rank):
    g = gen(seed)
    W, X = torch.randn(10, 12, generator=g), calibration_inputs(12, 100, g)
    H = X @ X.T
    U, V = whitened_svd_factors(W, H, rank)
    assert U.shape == (10, rank) and V.shape == (rank, 12)
    optimum = tail_norm(W.double() @ torch.linalg.cholesky(H.double()), rank)
    error = output_error(W, U @ V, X)
    assert error == pytest.approx(optimum, rel=1e-3)
    U_svd, V_svd = svd_factors(W, rank)
    assert error <= output_error(W, U_svd @ V_svd, X) + 1e-6


@pytest.mark.parametrize(("seed", "rank"), [(0, 1), (1, 4), (2, 7)])
def test_fisher_whitened_reaches_the_weighted_output_error_optimum(seed, rank):
    """min Σ_j G_j‖(W − Ŵ)_j X‖² = Σ_{i>r} σᵢ²(diag(√G)·W·L), L = chol(X·Xᵀ) (hand-computed)."""
    g = gen(seed)
    W, X = torch.randn(10, 12, generator=g), calibration_inputs(12, 100, g)
    G = torch.rand(10, generator=g).double() * 10 + 0.01
    H = X @ X.T

    def weighted_error(W_hat: torch.Tensor) -> float:
        rows = ((W.double() - W_hat.double()) @ X.double()).square().sum(dim=1)
        return (rows * G).sum().sqrt().item()

    U, V = whitened_svd_factors(W, H, rank, row_importance=G)
    scaled = G.sqrt()[:, None] * W.double() @ torch.linalg.cholesky(H.double())
    assert weighted_error(U @ V) == pytest.approx(tail_norm(scaled, rank), rel=1e-3)
    U0, V0 = whitened_svd_factors(W, H, rank)  # unweighted: optimal for another objective
    assert weighted_error(U @ V) <= weighted_error(U0 @ V0) + 1e-6
    # equal weights change nothing
    U1, V1 = whitened_svd_factors(W, H, rank, row_importance=torch.full((10,), 3.0))
    assert torch.allclose(U1 @ V1, U0 @ V0, atol=1e-4)


def test_whitened_svd_dampens_singular_h_with_warning():
    g = gen(3)
    W, X = torch.randn(6, 12, generator=g), torch.randn(12, 5, generator=g)  # rank(H) = 5
    with pytest.warns(UserWarning, match="not positive definite"):
        U, V = whitened_svd_factors(W, X @ X.T, 4)
    assert torch.isfinite(U).all() and torch.isfinite(V).all()
    # The best rank-4 output is the top-4 SVD of W·X; dampening leaves it near-optimal.
    assert output_error(W, U @ V, X) == pytest.approx(tail_norm(W @ X, 4), rel=1e-3)


def test_asvd_alpha_zero_is_plain_svd():
    g = gen(4)
    W = torch.randn(9, 14, generator=g)
    U, V = activation_svd_factors(W, torch.rand(14, generator=g), 3, alpha=0.0)
    U_svd, V_svd = svd_factors(W, 3)
    torch.testing.assert_close(U @ V, U_svd @ V_svd, atol=1e-5, rtol=1e-5)


def test_asvd_is_unscaled_truncated_svd_of_scaled_weight():
    g = gen(5)
    W, scale = torch.randn(9, 14, generator=g), torch.rand(14, generator=g) + 0.1
    s = scale.double().sqrt()
    Us, Ss, Vhs = torch.linalg.svd(W.double() * s, full_matrices=False)
    by_hand = (Us[:, :4] * Ss[:4]) @ Vhs[:4] / s
    U, V = activation_svd_factors(W, scale, 4, alpha=0.5)
    torch.testing.assert_close((U @ V).double(), by_hand, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_asvd_beats_plain_svd_on_scaled_inputs(seed):
    g = gen(seed)
    W = torch.randn(16, 24, generator=g)
    scales = torch.logspace(-1.5, 1.5, 24)[torch.randperm(24, generator=g)]
    X = scales[:, None] * torch.randn(24, 400, generator=g)
    U_svd, V_svd = svd_factors(W, 6)
    plain = output_error(W, U_svd @ V_svd, X)
    for alpha in (0.5, 1.0):
        U, V = activation_svd_factors(W, X.abs().mean(dim=1), 6, alpha=alpha)
        assert output_error(W, U @ V, X) < plain


def test_asvd_zero_scale_stays_finite():
    W, scale = torch.randn(5, 6), torch.tensor([0.0, 1.0, 2.0, 0.0, 3.0, 1.0])
    U, V = activation_svd_factors(W, scale, 2)
    assert torch.isfinite(U).all() and torch.isfinite(V).all()


@pytest.mark.parametrize(("seed", "rank"), [(0, 1), (1, 3), (2, 5)])
def test_fwsvd_weighted_error_is_eckart_young(seed, rank):
    g = gen(seed)
    W, importance = torch.randn(8, 11, generator=g), torch.rand(8, generator=g) * 5 + 0.01
    U, V = fisher_svd_factors(W, importance, rank)
    weighted = ((W - U @ V).double().square().sum(dim=1) * importance.double()).sum().sqrt()
    optimum = tail_norm(importance.double().sqrt()[:, None] * W.double(), rank)
    assert weighted.item() == pytest.approx(optimum, rel=1e-4)


# --- activation-scaled Kronecker -----------------------------------------------------------------


def hand_rearrangement(W: torch.Tensor, m1: int, n1: int, m2: int, n2: int) -> torch.Tensor:
    """Van Loan's R(W), one block at a time: row (i1, j1) is vec of block W[i1, j1]."""
    blocks = [
        W[i1 * m2 : (i1 + 1) * m2, j1 * n2 : (j1 + 1) * n2].reshape(-1)
        for i1 in range(m1)
        for j1 in range(n1)
    ]
    return torch.stack(blocks)


@pytest.mark.parametrize(("seed", "terms"), [(0, 1), (1, 2), (2, 3)])
def test_scaled_kronecker_is_optimal_for_separable_scale(seed, terms):
    g = gen(seed)
    (m1, n1), (m2, n2) = (3, 4), (2, 3)
    W = torch.randn(m1 * m2, n1 * n2, generator=g)
    d = torch.kron(torch.rand(n1, generator=g) * 4 + 0.1, torch.rand(n2, generator=g) * 4 + 0.1)
    A, B = scaled_nearest_kronecker(W, (m1, n1), terms, d)
    assert A.shape == (terms, m1, n1) and B.shape == (terms, m2, n2)
    D = torch.diag(d.double())
    scaled_error = torch.linalg.matrix_norm((W.double() - kronecker_sum(A, B).double()) @ D)
    optimum = tail_norm(hand_rearrangement(W.double() @ D, m1, n1, m2, n2), terms)
    assert scaled_error.item() == pytest.approx(optimum, rel=1e-4, abs=1e-5)
    A0, B0 = nearest_kronecker(W, (m1, n1), terms)
    plain = torch.linalg.matrix_norm((W.double() - kronecker_sum(A0, B0).double()) @ D)
    assert scaled_error.item() <= plain.item() + 1e-6


def test_scaled_kronecker_uniform_scale_is_van_loan():
    W = torch.randn(6, 8)
    A, B = scaled_nearest_kronecker(W, (2, 4), 2, torch.full((8,), 3.0))
    A0, B0 = nearest_kronecker(W, (2, 4), 2)
    torch.testing.assert_close(kronecker_sum(A, B), kronecker_sum(A0, B0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(A.flatten(1).norm(dim=1), B.flatten(1).norm(dim=1))


# --- dtypes, devices, errors ---------------------------------------------------------------------


def _run_all(
    W: torch.Tensor, H: torch.Tensor, v_in: torch.Tensor, v_out: torch.Tensor
) -> dict[str, tuple[torch.Tensor, ...]]:
    """Every float output of every method, by name."""
    return {
        "wanda_scores": (wanda_scores(W, v_in),),
        "sparsegpt": sparsegpt_prune(W, H, 0.5, blocksize=4)[:1],
        "sparsegpt_nm": sparsegpt_prune(W, H, pattern="2:4")[:1],
        "whitened": whitened_svd_factors(W, H, 3),
        "asvd": activation_svd_factors(W, v_in, 3),
        "fwsvd": fisher_svd_factors(W, v_out, 3),
        "kron": scaled_nearest_kronecker(W, (2, 2), 2, v_in),
    }


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_inputs_computed_in_fp32_returned_in_input_dtype(dtype):
    g = gen(9)
    W = torch.randn(6, 8, generator=g).to(dtype)
    X = torch.randn(8, 30, generator=g)
    v_in, v_out = X.norm(dim=1).to(dtype), torch.rand(6, generator=g).to(dtype)
    half = _run_all(W, (X @ X.T).to(dtype), v_in, v_out)
    # The fp32 computation on the exactly upcast inputs, then cast: what the half run must equal.
    full = _run_all(W.float(), (X @ X.T).to(dtype).float(), v_in.float(), v_out.float())
    for name, results in half.items():
        for got, ref in zip(results, full[name], strict=True):
            assert got.dtype == dtype, name
            assert torch.equal(got, ref.to(dtype)), name


@pytest.mark.parametrize("device", devices())
def test_results_stay_on_device(device):
    W = torch.randn(6, 8, device=device)
    X = torch.randn(8, 30, device=device)
    for name, results in _run_all(W, X @ X.T, X.norm(dim=1), W.norm(dim=1)).items():
        for t in results:
            assert t.device == W.device and t.dtype == W.dtype, name


W8 = torch.randn(4, 8, generator=gen(10))
H8 = torch.eye(8)
V8 = torch.ones(8)

BAD_ARGUMENTS = [
    (lambda: wanda_mask(W8, V8, 1.0), r"sparsity=1\.0"),
    (lambda: wanda_mask(W8, V8, -0.1), r"sparsity=-0\.1"),
    (lambda: wanda_mask(W8, V8), r"sparsity=None"),
    (lambda: wanda_mask(W8, V8, 0.3, "2:4"), r"sparsity=0\.3.*1 − N/M"),
    (lambda: wanda_mask(W8, V8, pattern="4:4"), r"pattern='4:4'"),
    (lambda: wanda_mask(W8, V8, pattern="3:2"), r"pattern='3:2'"),
    (lambda: wanda_mask(W8, torch.ones(7), 0.5), r"input_norm.*length in = 8.*\(7,\)"),
    (lambda: wanda_scores(W8, -V8), r"input_norm.*nonnegative"),
    (lambda: sparsegpt_prune(W8, torch.eye(7), 0.5), r"H: expected.*\[8, 8\].*\(7, 7\)"),
    (lambda: sparsegpt_prune(W8, H8, 1.5), r"sparsity=1\.5"),
    (lambda: sparsegpt_prune(W8, H8, pattern="2:4", blocksize=6), r"blocksize=6.*M = 4"),
    (lambda: sparsegpt_prune(W8, H8, 0.5, blocksize=0), r"blocksize=0"),
    (lambda: sparsegpt_prune(W8, H8, 0.5, percdamp=-1.0), r"percdamp=-1\.0"),
    (lambda: sparsegpt_prune(W8, -H8, 0.5), r"H: not positive definite"),
    (lambda: whitened_svd_factors(W8, torch.eye(4), 2), r"H: expected.*\[8, 8\]"),
    (lambda: whitened_svd_factors(W8, H8, 5), r"rank=5.*\[1, 4\]"),
    (lambda: whitened_svd_factors(W8, H8, 2, ratio=0.5), r"exactly one"),
    (
        lambda: whitened_svd_factors(W8, H8, 2, row_importance=torch.ones(8)),
        r"row_importance.*length out = 4.*\(8,\)",
    ),
    (lambda: whitened_svd_factors(W8, H8, 2, row_importance=-V8[:4]), r"row_importance.*nonneg"),
    (lambda: activation_svd_factors(W8, V8, 0), r"rank=0"),
    (lambda: activation_svd_factors(W8, torch.ones(4), 2), r"input_scale.*length in = 8"),
    (lambda: activation_svd_factors(W8, V8, 2, alpha=-1.0), r"alpha=-1\.0"),
    (lambda: fisher_svd_factors(W8, V8, 2), r"row_importance.*length out = 4.*\(8,\)"),
    (lambda: fisher_svd_factors(W8, torch.ones(4), 9), r"rank=9"),
    (lambda: scaled_nearest_kronecker(W8, (3, 2), 1, V8), r"a_shape=\(3, 2\)"),
    (lambda: scaled_nearest_kronecker(W8, (2, 2), 9, V8), r"terms=9"),
    (lambda: scaled_nearest_kronecker(W8, (2, 2), 1, torch.ones(4)), r"input_scale"),
    (lambda: wanda_scores(torch.randn(8), V8), r"W: expected a 2-D weight"),
]


@pytest.mark.parametrize(
    ("call", "match"), BAD_ARGUMENTS, ids=[match for _, match in BAD_ARGUMENTS]
)
def test_bad_arguments_raise_naming_the_argument(call, match):
    with pytest.raises(InvalidParameterError, match=match):
        call()
