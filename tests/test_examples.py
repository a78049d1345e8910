"""Smoke tests of the examples that need no real model (tiny or meta-device settings)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import kronypt_gpt2


def test_kronypt_table2_parameter_counts_are_exact():
    # KronyPT (seed 004) Table 2, from GPT2Config() with Kronecker c_fc / c_proj
    assert kronypt_gpt2.model_size((768, 768)) == 81_972_576
    assert kronypt_gpt2.model_size((64, 32)) == 67_893_504
    assert kronypt_gpt2.model_size((1536, 768)) == 96_128_304
    rows = kronypt_gpt2.table2()
    assert all(r["model_size"] == r["paper"] for r in rows)
    assert {"a_shape", "b_shape", "params_per_term", "max_rank", "model_size", "paper"} <= set(
        rows[0]
    )


def test_lora_trainable_counts_of_seed_002_are_exact():
    import pytest

    pytest.importorskip("peft")
    import lora_on_compressed

    # seed 002 Table 2, GPT-2 small, r = 4: attention only, then with one MLP matrix
    assert lora_on_compressed.lora_trainable_params(4, ["c_attn"]) == 147_456
    assert lora_on_compressed.lora_trainable_params(4, ["c_attn", "c_fc"]) == 331_776
    # all-linear reaches the Kronecker mlp.c_proj too: 12 · 4 · (3072 + 768 + 768 + 768 +
    # 768 + 3072 + 3072 + 768)
    assert lora_on_compressed.lora_trainable_params(4, "all-linear") == 589_824


def test_lora_fine_tune_of_seed_002_covers_the_compressed_layers():
    import pytest

    pytest.importorskip("peft")
    import lora_on_compressed

    base = lora_on_compressed.compressed_student(None)
    ids = torch.randint(0, 256, (4 * 32,), generator=torch.Generator().manual_seed(0))
    before, after, merged, trainable = lora_on_compressed.fine_tune(base, "all-linear", ids, 2, 32)
    # 4 blocks · 4 · (c_attn 256 + 768, attn.c_proj 2 · 256, c_fc 256 + 1024, mlp.c_proj 1280)
    assert trainable == 4 * 4 * (1024 + 512 + 1280 + 1280)
    assert after < before
    assert merged == pytest.approx(after, abs=0.05)  # pruned merges keep the mask: close, not equal
