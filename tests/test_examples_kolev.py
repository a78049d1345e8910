"""Smoke test of examples/kolev_combined.py (seed 000, Table 2) on a tiny config-built Llama.

Parameter counts are checked against a hand computation from the shapes, and the sparsity of the
pruned weights against the zeros actually stored in them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from datasets import Dataset
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import kolev_combined

from conftest import tiny_model, word_tokenizer
from hfcompress.layers import LowRankLinear, PrunedLinear

WORDS = [
    "to",
    "be",
    "or",
    "not",
    "that",
    "is",
    "the",
    "question",
    "whether",
    "tis",
    "nobler",
    "in",
    "mind",
    "suffer",
]
MLP = r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj"
# tiny Llama (tests/conftest.py): hidden 64, MLP 128, 2 layers, 4 heads of 16, 2 KV heads, vocab 128
HIDDEN, FFN, LAYERS, KV, VOCAB = 64, 128, 2, 32, 128


def dense_params() -> int:
    attention = 2 * HIDDEN * HIDDEN + 2 * KV * HIDDEN  # q, o [64, 64]; k, v [32, 64]; no bias
    mlp = 3 * FFN * HIDDEN
    block = attention + mlp + 2 * HIDDEN  # two RMSNorm weights
    return VOCAB * HIDDEN + LAYERS * block + HIDDEN  # tied lm_head counted once, final norm


def test_kolev_table_on_tiny_llama(tmp_path: Path, one_thread: None) -> None:
    teacher = tiny_model("llama")
    tokenizer = word_tokenizer(WORDS)
    generator = torch.Generator().manual_seed(0)
    text = [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (400,), generator=generator))]
    blocks = kolev_combined.causal_lm_blocks(Dataset.from_dict({"text": text}), tokenizer, 16)
    eval_ids = tokenizer(" ".join(reversed(WORDS * 4)), return_tensors="pt").input_ids
    settings = kolev_combined.Settings(
        targets=MLP, max_steps=6, batch_size=2, block_size=16, eval_window=16, output=tmp_path
    )
    assert kolev_combined.default_targets(teacher) == MLP

    rows, histories = kolev_combined.run_experiment(
        teacher, blocks, eval_ids, settings, Console(quiet=True), keep_students=True
    )

    table = kolev_combined.markdown_table(rows)
    header = table.splitlines()[0]
    assert [c.strip() for c in header.strip("|").split("|")] == list(kolev_combined.COLUMNS)
    assert [r["method"] for r in rows] == [
        "dense teacher",
        "pruning",
        "low rank",
        "pruning + low rank",
    ]
    for row in rows:
        assert set(kolev_combined.COLUMNS) <= set(row)
        assert 1.0 < row["held-out perplexity"] < 10 * VOCAB
    dense, pruned, lowrank, combined = rows
    mlp = LAYERS * 3 * FFN * HIDDEN  # targeted weights, 49,152
    assert dense["parameters (non-zero)"] == dense_params()

    # (a) 50% of every MLP weight, pattern-locked: sparsity from the stored zeros
    assert pruned["parameters (non-zero)"] == dense_params() - mlp // 2
    weights = [m.weight for m in pruned["student"].modules() if isinstance(m, PrunedLinear)]
    assert len(weights) == 3 * LAYERS
    assert sum(int((w == 0).sum()) for w in weights) == mlp // 2
    assert pruned["targeted sparsity"] == 0.5

    # (b) rank ⌊0.5·128·64/192⌋ = 21 after the progressive reduction from full rank 64
    ranks = [m.rank for m in lowrank["student"].modules() if isinstance(m, LowRankLinear)]
    assert ranks == [21] * (3 * LAYERS)
    assert lowrank["parameters (non-zero)"] == dense_params() - mlp + 6 * 21 * (FFN + HIDDEN)

    # (c) rank ⌊0.8·128·64/192⌋ = 34, then U [128, 34] and V [34, 64] pruned 37.5% each
    student = combined["student"]
    factors = [m for m in student.modules() if isinstance(m, LowRankLinear)]
    assert [m.rank for m in factors] == [34] * (3 * LAYERS)
    assert all(isinstance(m.u, PrunedLinear) and isinstance(m.v, PrunedLinear) for m in factors)
    kept_u, kept_v = 34 * FFN - 1632, 34 * HIDDEN - 816  # round(0.375·4352), round(0.375·2176)
    assert combined["parameters (non-zero)"] == dense_params() - mlp + 6 * (kept_u + kept_v)
    zeros = sum(int((f.weight == 0).sum()) for m in factors for f in (m.u, m.v))
    assert zeros == 6 * (1632 + 816)
    assert combined["targeted sparsity"] == 0.375

    assert combined["compression ratio"] == dense_params() / combined["parameters (non-zero)"]
    # the combined run's two KD phases (3 + 3 steps, a log every 2) are one curve
    assert [r["step"] for r in histories["pruning + low rank"] if "loss" in r] == [2, 5]
    path = kolev_combined.plot_losses(histories, tmp_path / "loss_curves.png", switch=3)
    assert path.stat().st_size > 0
