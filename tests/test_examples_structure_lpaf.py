"""Smoke test of examples/structure_lpaf.py (seed 001) on a tiny config-built Llama."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import structure_lpaf

from conftest import tiny_model
from hfcompress.layers import LowRankLinear, PrunedLinear

MLP = r"model\.layers\.\d+\.mlp\.\w+_proj"


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(3)
    calibration = torch.randint(0, 128, (8, 48), generator=g)  # 384 tokens > 128 inputs
    eval_ids = torch.randint(0, 128, (1, 96), generator=g)
    return model, calibration, eval_ids


def _by_hand(model) -> int:
    """Non-zero-able MLP weight entries, read off masks and factor shapes."""
    total = 0
    for name, module in model.named_modules():
        if not name.endswith(("gate_proj", "up_proj", "down_proj")):
            continue
        if isinstance(module, PrunedLinear):
            total += int(torch.count_nonzero(module.mask))
        elif isinstance(module, LowRankLinear):
            for factor in (module.u, module.v):
                is_pruned = isinstance(factor, PrunedLinear)
                total += int(factor.mask.sum()) if is_pruned else factor.weight.numel()
        else:
            total += module.weight.numel()
    return total


def test_structure_stable_rank_and_whitened_columns(setup, tmp_path):
    model, calibration, _ = setup
    analysis, rows = structure_lpaf.structure_rows(model, calibration, MLP)
    assert len(rows) == 6  # 2 layers x gate/up/down
    for row in rows:
        W = model.get_submodule(row["name"]).weight.detach().double()
        expected = torch.linalg.matrix_norm(W, "fro") ** 2 / torch.linalg.matrix_norm(W, 2) ** 2
        assert row["stable_rank"] == pytest.approx(float(expected), rel=1e-4)
        assert 1 <= row["r90"] <= row["r99"] <= min(row["out"], row["in"])
        assert row["wl_stable_rank"] >= 1.0 and row["wl_r99"] >= 1
    agg = structure_lpaf.aggregate(rows)
    assert [a["matrix"] for a in agg] == ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    down = [r["stable_rank"] for r in rows if r["type"] == "mlp.down_proj"]
    assert agg[2]["stable rank"] == pytest.approx(sum(down) / 2)
    measures = ["stable rank", "r90%", "r99%", "eff. rank"]
    assert list(agg[0]) == [
        *["matrix", "shape [out, in]", "layers", "numerical rank"],
        *measures,
        *[f"{m} W·L" for m in measures],
    ]
    text = structure_lpaf.write_outputs(tmp_path, analysis, rows, [{"a": 1}], "header")
    for name in ("structure.csv", "spectra.png", "energy.png", "stable_rank.png", "results.md"):
        assert (tmp_path / name).stat().st_size > 0
    assert "mlp.down_proj" in text


def test_equal_parameter_counts(setup):
    model, calibration, eval_ids = setup
    counted: list[int] = []
    rows = structure_lpaf.compare(
        model, eval_ids, calibration, window=32, log=lambda _: None,
        on_variant=lambda _row, variant: counted.append(_by_hand(variant)),
    )  # fmt: skip
    assert [list(r) for r in rows] == [structure_lpaf.COLUMNS] * 9
    assert [r["method"] for r in rows[1:]] == list(structure_lpaf.METHODS) * 2
    assert rows[5]["criterion"] == "sparsegpt" and rows[8]["criterion"] == "whitened → wanda"
    # By hand: gate/up [128, 64] at 50%: ⌊0.5·8192/192⌋ = 21, aligned to r = 20 (r·64 ≡ 0 mod
    # 128), B = 20·192 = 3840; down [64, 128]: r = 21, B = 4032. Two layers.
    budget = 2 * (2 * 3840 + 4032)
    dense_mlp = 2 * 3 * 128 * 64
    dense_total = sum(p.numel() for p in model.parameters())  # tied lm_head counted once
    assert rows[0]["MLP params kept"] == dense_mlp
    assert rows[0]["total non-zero params"] == dense_total
    # the compressed models themselves, counted from their masks and factor shapes
    assert counted == [budget] * 8
    for r in rows[1:]:
        assert r["MLP params kept"] == budget, r
        assert r["total non-zero params"] == dense_total - dense_mlp + budget, r
        assert r["held-out ppl"] > 1.0


def test_training_column(setup):
    from datasets import Dataset

    model, calibration, eval_ids = setup
    blocks = Dataset.from_dict({"input_ids": calibration.tolist(), "labels": calibration.tolist()})
    rows = structure_lpaf.compare(
        model, eval_ids, None, window=32, methods=("prune",), train_blocks=blocks, train_steps=2,
        log=lambda _: None,
    )  # fmt: skip
    assert [list(r) for r in rows] == [[*structure_lpaf.COLUMNS, structure_lpaf.TRAINED]] * 2
    assert rows[0][structure_lpaf.TRAINED] is None and rows[1][structure_lpaf.TRAINED] > 1.0
