"""Smoke test of examples/kronypt_training.py (KronyPT, seed 004) on a tiny config-built Llama."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers.pytorch_utils import Conv1D

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import kronypt_training as kt

import hfcompress
from conftest import tiny_model, word_tokenizer
from hfcompress.layers import KroneckerLinear

WORDS = [
    "the",
    "king",
    "queen",
    "of",
    "and",
    "to",
    "is",
    "a",
    "my",
    "lord",
    "in",
    "that",
    "with",
    "his",
    "not",
    "be",
    "this",
    "thou",
]


@pytest.fixture(autouse=True)
def _single_threaded(one_thread):
    """Every test here runs on one thread (see conftest.one_thread)."""


def _data(tmp_path: Path):
    tokenizer = word_tokenizer(WORDS)
    generator = torch.Generator().manual_seed(0)
    sentences = [
        " ".join(WORDS[i] for i in torch.randint(len(WORDS), (40,), generator=generator))
        for _ in range(8)
    ]
    blocks = kt.causal_lm_blocks(Dataset.from_dict({"text": sentences}), tokenizer, block_size=16)
    eval_ids = tokenizer(" ".join(sentences[:2]), return_tensors="pt").input_ids[:, :48]
    settings = kt.Settings(max_steps=2, batch_size=2, eval_window=16, output_dir=tmp_path)
    return blocks, eval_ids, settings


def _hand_count(out_f: int, in_f: int, a_shape: tuple[int, int], terms: int) -> int:
    (m1, n1), (m2, n2) = a_shape, (out_f // a_shape[0], in_f // a_shape[1])
    return terms * (m1 * n1 + m2 * n2)  # tiny Llama: no bias


def test_table_curves_and_parameter_counts(tmp_path):
    teacher = tiny_model("llama")
    blocks, eval_ids, settings = _data(tmp_path)
    rows, histories = kt.run_comparisons(teacher, blocks, eval_ids, settings)

    assert all(tuple(row) == kt.COLUMNS for row in rows)
    assert [r["comparison"] for r in rows] == ["reference"] + [
        c for c in kt.COMPARISONS for _ in range(2)
    ]
    for row in rows[1:]:
        assert row["ppl before training"] > 1 and row["ppl after"] > 1
        assert 0 < row["final train loss"] < 20
    assert set(histories) == set(kt.COMPARISONS)
    assert all(len(variants) == 2 for variants in histories.values())

    dense = rows[0]["parameters"]
    by_variant = {(r["comparison"], r["variant"]): r["parameters"] for r in rows}
    # gate/up [128, 64] and down [64, 128] in 2 layers; f = 2: B (2, 1) or, with 2 terms, (4, 1)
    mlp_dense = 2 * 3 * 128 * 64
    one = 2 * (2 * _hand_count(128, 64, (64, 64), 1) + _hand_count(64, 128, (64, 64), 1))
    two = 2 * (2 * _hand_count(128, 64, (32, 64), 2) + _hand_count(64, 128, (64, 32), 2))
    assert by_variant[("terms", "1 term")] == dense - mlp_dense + one
    assert by_variant[("terms", "2 terms")] == dense - mlp_dense + two
    # the large factors A hold exactly the same number of parameters; the totals differ only
    # by the B factors, f·(k² − 1) = 6 per matrix (exact equality has no solution here)
    assert two - one == 6 * 3 * 2
    assert abs(two - one) / one < 2e-3  # 0.15% here; 0.001% for SmolLM2's [1536, 576]
    # early and late halves compress the same number of identical matrices
    early, late = (by_variant[k] for k in by_variant if k[0] == "layers")
    assert early == late == dense - mlp_dense // 2 + one // 2

    kt.write_results(rows, tmp_path, "tiny")
    header = (tmp_path / "results.md").read_text().splitlines()[0]
    assert header == "| " + " | ".join(kt.COLUMNS) + " |"
    kt.plot_curves(histories, tmp_path / "loss_curves.png")
    assert (tmp_path / "loss_curves.png").stat().st_size > 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gate/up/down_proj; Conv1D c_fc/c_proj
def test_van_loan_init_reproduces_the_weight_better_than_random(arch):
    teacher = tiny_model(arch)
    dense = {  # W: [out, in]; GPT-2's Conv1D stores [in, out]
        n: (m.weight.T if isinstance(m, Conv1D) else m.weight).detach().clone()
        for n, m in teacher.named_modules()
        if ".mlp." in n and hasattr(m, "weight")
    }
    errors = {}
    for init in ("vanloan", "random"):
        student = tiny_model(arch)
        variant = kt.Variant(layers=(0, 1), factor=2, terms=2, init=init)
        hfcompress.compress_model(student, kt.kronecker_recipe(student, variant), progress=False)
        if init == "random":
            kt.random_init_(student, teacher, seed=0)
        for name, module in student.named_modules():
            if isinstance(module, KroneckerLinear):
                A, B = module.A.detach(), module.B.detach()
                W = sum(torch.kron(a, b) for a, b in zip(A, B, strict=True))
                errors[init, name] = float((W - dense[name]).norm() / dense[name].norm())
                if init == "random":  # the chosen scale: the product keeps ‖W‖_F (in expectation)
                    assert 0.5 < float(W.norm() / dense[name].norm()) < 2.0
    names = {name for _, name in errors}
    assert len(names) == (6 if arch == "llama" else 4)
    # Van Loan is the best 2-term fit (< 1); a random draw of the same norm is ~√2 away
    for name in names:
        assert errors["vanloan", name] < 1.0 < errors["random", name]
        assert errors["vanloan", name] < errors["random", name] - 0.3
