"""Structure analysis against references computed here by hand, and the PNG plots."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import tiny_model
from hfcompress.analysis import (
    MissingDependencyError,
    analyze_model,
    analyze_module,
    kronecker_candidates_for,
    plot_energy,
    plot_spectra,
    plot_tradeoff,
)
from hfcompress.decompose import kronecker_error, rank_for_ratio
from hfcompress.errors import InvalidParameterError
from hfcompress.surgery import compress_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

GPT2_MODULES = [
    f"transformer.h.{i}.{m}"
    for i in range(2)
    for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
]
LLAMA_MODULES = [
    f"model.layers.{i}.{m}"
    for i in range(2)
    for m in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
]


def with_spectrum(
    singular_values: list[float], out_features: int, in_features: int
) -> torch.Tensor:
    """U·diag(s)·Vᵀ with random orthonormal U: [out, p], V: [in, p]."""
    p = len(singular_values)
    U, _ = torch.linalg.qr(torch.randn(out_features, p, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(in_features, p, dtype=torch.float64))
    return (U * torch.tensor(singular_values, dtype=torch.float64)) @ V.T


# --- analyze_module: one weight --------------------------------------------------------------


def test_stable_rank_is_frobenius_over_spectral_norm_squared():
    W = with_spectrum([5.0, 3.0, 2.0, 1.0, 0.5], 24, 16).float()
    a = analyze_module(W)
    assert a.stable_rank == pytest.approx((25 + 9 + 4 + 1 + 0.25) / 25, rel=1e-5)
    by_norms = (
        torch.linalg.matrix_norm(W.double()) ** 2 / torch.linalg.matrix_norm(W.double(), 2) ** 2
    )
    assert a.stable_rank == pytest.approx(float(by_norms), rel=1e-5)
    assert a.stable_rank <= a.rank == 5
    assert a.shape == (24, 16)


@pytest.mark.parametrize("k", [1, 5, 17])
def test_numerical_rank_of_a_rank_k_product_is_k(k):
    W = torch.randn(64, k) @ torch.randn(k, 48)
    assert analyze_module(W).rank == k
    assert analyze_module(torch.randn(64, 48)).rank == 48


def test_rank_tolerance_defaults_to_matrix_rank_rule_and_is_configurable():
    W = with_spectrum([1.0, 1e-3, 1e-7], 32, 16).float()
    a = analyze_module(W)
    s_max = float(torch.linalg.svdvals(W)[0])
    assert a.rank_tol == pytest.approx(32 * torch.finfo(torch.float32).eps * s_max)
    assert a.rank == 2  # 1e-7 is below 32·eps·σ₁ ≈ 3.8e-6
    W = with_spectrum([1.0, 1e-2, 1e-4], 32, 16).float()
    assert analyze_module(W).rank == 3
    assert analyze_module(W, rtol=1e-3).rank == 2
    assert analyze_module(W, rtol=1e-1).rank == 1


def test_energy_at_ratios_matches_hand_cumsum():
    W = torch.randn(48, 32)
    ratios = (0.1, 0.3, 0.7, 1.0)
    a = analyze_module(W, ratios=ratios)
    sq = torch.linalg.svdvals(W.double()) ** 2
    cumulative = torch.cumsum(sq, 0) / sq.sum()
    assert [e.ratio for e in a.energy] == list(ratios)
    for e in a.energy:
        r = max(1, math.floor(e.ratio * 48 * 32 / (48 + 32)))  # the largest rank that fits
        assert e.rank == r
        assert e.energy == pytest.approx(float(cumulative[r - 1]), rel=1e-5)
    assert torch.allclose(a.cumulative_energy(), cumulative, rtol=1e-5)


def test_lowrank_error_is_eckart_young():
    W = torch.randn(40, 56)
    a = analyze_module(W, budget=0.3)
    r = rank_for_ratio(40, 56, 0.3)
    s = torch.linalg.svdvals(W.double())
    expected = float(s[r:].square().sum().sqrt() / s.square().sum().sqrt())
    assert a.lowrank_rank == r
    assert a.lowrank_error == pytest.approx(expected, rel=1e-5)
    # ... which is what the truncated SVD actually reconstructs
    U, S, Vh = torch.linalg.svd(W.double())
    W_r = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
    actual = torch.linalg.matrix_norm(W.double() - W_r) / torch.linalg.matrix_norm(W.double())
    assert a.lowrank_error == pytest.approx(float(actual), rel=1e-5)


def test_prune_error_is_norm_of_the_smallest_entries():
    W = torch.randn(40, 30)
    budget = 0.35
    a = analyze_module(W, budget=budget)
    n_drop = round((1 - budget) * W.numel())
    smallest = W.double().abs().flatten().sort().values[:n_drop]
    expected = float(smallest.square().sum().sqrt() / torch.linalg.matrix_norm(W.double()))
    assert a.prune_kept == W.numel() - n_drop
    assert a.prune_error == pytest.approx(expected, rel=1e-5)


def test_kronecker_product_is_recovered_with_its_own_shape():
    A, B = torch.randn(8, 4), torch.randn(4, 8)
    W = torch.kron(A, B)  # [32, 32]
    # 64 of 1024 parameters: one term of any shape with m1·n1 = 32 fits, and only (8, 4) is exact
    a = analyze_module(W, budget=64 / 1024)
    assert a.kronecker is not None
    assert (a.kronecker.a_shape, a.kronecker.b_shape, a.kronecker.terms) == ((8, 4), (4, 8), 1)
    assert a.kronecker.params == 64
    assert a.kronecker.error < 1e-5
    assert a.lowrank_error is not None and a.lowrank_error > 0.1
    assert a.prune_error > 0.1
    assert a.best == "kronecker"
    # a larger budget still finds an exact sum
    assert analyze_module(W, budget=0.5).kronecker.error < 1e-5


def test_kronecker_fit_is_within_budget_and_consistent_with_decompose():
    W = torch.randn(64, 96)
    budget = 0.25
    candidates = kronecker_candidates_for(64, 96, budget)
    assert 0 < len(candidates) <= 12
    for (m1, n1), terms in candidates:
        m2, n2 = 64 // m1, 96 // n1
        assert min(m1, n1, m2, n2) >= 2
        assert 1 <= terms <= min(m1 * n1, m2 * n2)
        assert terms * (m1 * n1 + m2 * n2) <= budget * 64 * 96
    fit = analyze_module(W, budget=budget).kronecker
    norm = float(torch.linalg.matrix_norm(W.double()))
    errors = {c: kronecker_error(W, c[0], c[1]) / norm for c in candidates}
    assert fit.error == pytest.approx(min(errors.values()), rel=1e-5)
    assert fit.error == pytest.approx(errors[(fit.a_shape, fit.terms)], rel=1e-5)
    assert fit.params <= budget * 64 * 96


def test_sparsity_counts_exact_zeros():
    W = torch.randn(20, 10)
    W[:5] = 0.0
    assert analyze_module(W).sparsity == pytest.approx(0.25)


def test_methods_that_do_not_fit_the_budget_report_none():
    a = analyze_module(torch.randn(4, 4), budget=0.1)  # 1.6 parameters: no rank-1 factors, no A ⊗ B
    assert a.lowrank_error is None and a.kronecker is None
    assert a.best == "prune"
    assert analyze_module(torch.randn(8, 8), kronecker_candidates=0).kronecker is None


def test_all_zero_weight():
    a = analyze_module(torch.zeros(8, 6))
    assert (a.rank, a.stable_rank, a.sparsity) == (0, 0.0, 1.0)
    assert a.errors == {"lowrank": 0.0, "prune": 0.0, "kronecker": 0.0}
    assert all(e.energy == 1.0 for e in a.energy)


@pytest.mark.parametrize(
    ("W", "kwargs"),
    [
        (torch.randn(8), {}),
        (torch.randn(8, 8), {"budget": 0.0}),
        (torch.randn(8, 8), {"budget": 1.5}),
        (torch.randn(8, 8), {"ratios": (0.5, 2.0)}),
        (torch.randn(8, 8), {"rtol": -1.0}),
        (torch.randn(8, 8), {"kronecker_candidates": -1}),
        (torch.full((8, 8), float("nan")), {}),
    ],
    ids=["1d", "budget-0", "budget-1.5", "ratio-2", "rtol-negative", "candidates-negative", "nan"],
)
def test_invalid_input_raises(W, kwargs):
    with pytest.raises(InvalidParameterError):
        analyze_module(W, **kwargs)


def test_bf16_weight_is_analyzed_in_fp32():
    W = torch.randn(32, 16)
    a, b = analyze_module(W.bfloat16()), analyze_module(W.bfloat16().float())
    assert a.singular_values.dtype == torch.float32
    assert torch.equal(a.singular_values, b.singular_values)


# --- analyze_model ----------------------------------------------------------------------------


def test_analyze_model_gpt2_reads_conv1d_as_out_in_and_skips_tied_head():
    model = tiny_model("gpt2")
    analysis = analyze_model(model, kronecker_candidates=2, progress=False)
    assert [row.name for row in analysis.rows] == GPT2_MODULES
    shapes = {row.name.split(".", 3)[-1]: row.shape for row in analysis.rows}
    assert shapes == {
        "attn.c_attn": (192, 64),
        "attn.c_proj": (64, 64),
        "mlp.c_fc": (256, 64),
        "mlp.c_proj": (64, 256),
    }
    c_fc = analysis["transformer.h.0.mlp.c_fc"]
    weight = model.transformer.h[0].mlp.c_fc.weight  # Conv1D stores [in, out]
    assert torch.allclose(c_fc.singular_values, torch.linalg.svdvals(weight.detach()))
    assert [name for name, _ in analysis.skipped] == ["lm_head"]
    text = str(analysis)
    for name in [*GPT2_MODULES, "lm_head"]:
        assert name in text
    assert "tied" in text


def test_analyze_model_llama_covers_every_projection():
    model = tiny_model("llama")
    analysis = analyze_model(model, kronecker_candidates=2, progress=False)
    assert [row.name for row in analysis.rows] == LLAMA_MODULES
    assert analysis["model.layers.0.self_attn.k_proj"].shape == (32, 64)  # 2 KV heads of 16
    assert [name for name, _ in analysis.skipped] == ["lm_head"]
    assert sum(analysis.best_counts().values()) == len(LLAMA_MODULES)

    mlp = analyze_model(model, targets=r".*\.mlp\.(up|down)_proj", progress=False)
    assert [row.name for row in mlp.rows] == [
        n for n in LLAMA_MODULES if "up_" in n or "down_" in n
    ]
    assert mlp.skipped == []


def test_analyze_model_reads_compressed_layers():
    model = tiny_model("llama")
    target = "model.layers.0.mlp.up_proj"
    recipe = {"stages": [{"method": "lowrank", "targets": target, "rank": 4}]}
    compress_model(model, recipe, progress=False)
    row = analyze_model(model, targets=target, progress=False).rows[0]
    assert row.name == target and row.shape == (128, 64)
    assert row.rank == 4


def test_analyze_model_target_errors():
    model = tiny_model("llama")
    with pytest.raises(InvalidParameterError, match="fully matches no"):
        analyze_model(model, targets=r"q_proj", progress=False)  # fullmatch, not search
    with pytest.raises(InvalidParameterError, match="fully matches no"):
        analyze_model(model, targets=r"lm_head", progress=False)  # only a tied module
    with pytest.raises(InvalidParameterError, match="not a valid regular expression"):
        analyze_model(model, targets=r"(", progress=False)


def test_to_dict_is_json_compatible():
    analysis = analyze_model(tiny_model("gpt2"), kronecker_candidates=1, progress=False)
    data = json.loads(json.dumps(analysis.to_dict()))
    assert [m["name"] for m in data["modules"]] == GPT2_MODULES
    assert "singular_values" not in data["modules"][0]
    assert data["skipped"][0]["module"] == "lm_head"
    with_spectra = analysis.to_dict(include_spectra=True)
    assert len(with_spectra["modules"][0]["singular_values"]) == 64


# --- plots ------------------------------------------------------------------------------------


def assert_png(path):
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_plots_write_png_files(tmp_path):
    pytest.importorskip("matplotlib")
    model = tiny_model("llama")
    analysis = analyze_model(model, kronecker_candidates=0, progress=False)  # 14 modules: grid
    assert_png(plot_spectra(analysis, tmp_path / "nested" / "spectra.png"))
    assert_png(plot_energy(analysis, tmp_path / "energy.png"))
    # a model is analyzed first; three modules share one axes
    few = r"model\.layers\.0\.mlp\..*"
    assert_png(plot_spectra(model, tmp_path / "few_spectra.png", targets=few))
    assert_png(plot_energy(model, str(tmp_path / "few_energy.png"), targets=few))
    points = [("llama", 1.2e6, 20.5), ("lowrank 50%", 0.8e6, 24.0), ("prune 50%", 0.7e6, 26.1)]
    assert_png(plot_tradeoff(points, tmp_path / "tradeoff.png", log_x=True))
    assert_png(plot_tradeoff(points[:1], tmp_path / "one.png"))


def test_plot_arguments_are_checked(tmp_path):
    pytest.importorskip("matplotlib")
    analysis = analyze_model(tiny_model("gpt2"), kronecker_candidates=0, progress=False)
    with pytest.raises(InvalidParameterError, match=r"\.png"):
        plot_spectra(analysis, tmp_path / "spectra.pdf")
    with pytest.raises(InvalidParameterError, match="at least one"):
        plot_tradeoff([], tmp_path / "t.png")
    with pytest.raises(InvalidParameterError, match=r"points\[0\]"):
        plot_tradeoff([("a", 0, 10.0)], tmp_path / "t.png")
    with pytest.raises(InvalidParameterError, match=r"points\[1\]"):
        plot_tradeoff([("a", 1e6, 10.0), ("b", 1e6)], tmp_path / "t.png")
    assert not list(tmp_path.iterdir())


def test_missing_matplotlib_names_the_extra(monkeypatch, tmp_path):
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingDependencyError, match=r'pip install "hfcompress\[plots\]"') as info:
        plot_tradeoff([("a", 1e6, 10.0)], tmp_path / "t.png")
    assert isinstance(info.value, ImportError)


def test_importing_analysis_does_not_import_matplotlib():
    code = "import sys, hfcompress.analysis; assert 'matplotlib' not in sys.modules; print('ok')"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr
