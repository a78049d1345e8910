"""Smoke test of examples/encoder_compression.py (seed 003) on a tiny config-built BERT."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import encoder_compression as ec

from conftest import tiny_model, word_tokenizer

# Three classes, each with its own words: a task a tiny model can start to learn in a few steps.
WORDS = [f"{kind}{i}" for kind in ("love", "blood", "crown") for i in range(30)]

PLAY = """THE TEMPEST

PERSONS REPRESENTED.
Prospero, the Duke.

ACT I.

SCENE 2

[The Island. Before the cell of PROSPERO]

MIRANDA.
If by your art, my dearest father,
you have put the wild waters in this roar.

PROSPERO.
Be collected: [Aside.] no more amazement.

First Witch.
When shall we three meet again
"""


def _dataset(n: int, seed: int) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    labels = [i % 3 for i in range(n)]
    texts = [
        " ".join(WORDS[30 * y + int(j)] for j in torch.randint(0, 30, (8,), generator=g))
        for y in labels
    ]
    return Dataset.from_dict({"text": texts, "label": labels})


def test_passages_keep_spoken_text_only():
    spoken = (
        "If by your art, my dearest father, you have put the wild waters in this roar. "
        "Be collected: no more amazement. When shall we three meet again"
    )
    words = spoken.split()
    assert len(words) == 27  # 5 passages of 5 words; the last two words are dropped
    assert ec.passages(PLAY, 5) == [" ".join(words[i : i + 5]) for i in range(0, 25, 5)]


def test_genre_map_and_split_are_disjoint_by_play():
    assert len(ec.GENRE) == 37 and set(ec.GENRE.values()) == set(ec.GENRES)
    assert {ec.GENRE[p] for p in ec.TEST_PLAYS} == set(ec.GENRES)


def test_encoder_compression_table(tmp_path: Path, one_thread: None):
    model, tokenizer = tiny_model("bert"), word_tokenizer(WORDS)
    train, test = _dataset(48, 0), _dataset(24, 1)
    settings = ec.Settings(
        dense_steps=3,
        kd_steps=2,
        student_steps=2,
        batch_size=8,
        max_length=16,
        latency_batch=2,
        latency_repeats=2,
        progress=False,
        workdir=tmp_path / "work",
    )
    rows, models = ec.run_experiment(model, tokenizer, train, test, settings)
    ec.write_outputs(rows, tmp_path / "out", "tiny BERT")

    header = (tmp_path / "out" / "results.md").read_text().splitlines()[2]
    assert (
        header == "| method | accuracy | macro-F1 | parameters | size MB | latency ms | speedup |"
    )
    for name in ("scatter.png", "parallel_coordinates.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert len(rows) == 1 + len(ec.METHODS)
    by_key = dict(zip(["dense", *ec.METHODS], rows, strict=True))
    assert by_key["dense"]["speedup"] == 1.0
    assert all(r["size_mb"] > 0 and r["latency_ms"] > 0 for r in rows)

    # accuracy and macro-F1 by hand from the predictions, which are the pruned model's own
    labels = list(test["label"])
    for key in ("dense", "prune50"):
        row = by_key[key]
        enc = tokenizer(list(test["text"]), padding=True, return_tensors="pt")
        with torch.no_grad():
            own = models[key](**enc).logits.argmax(-1).tolist()
        assert row["predictions"] == own
        hand = sum(p == y for p, y in zip(own, labels, strict=True)) / len(labels)
        assert row["accuracy"] == pytest.approx(hand)
        f1s = []
        for c in sorted(set(own) | set(labels)):
            tp = sum(p == c and y == c for p, y in zip(own, labels, strict=True))
            wrong = sum((p == c) != (y == c) for p, y in zip(own, labels, strict=True))
            f1s.append(2 * tp / (2 * tp + wrong))
        assert row["macro_f1"] == pytest.approx(sum(f1s) / len(f1s))

    # pruned rows: every encoder Linear [out, in] keeps out·in/2 weights; nothing else changes
    dense_params = sum(p.numel() for p in models["dense"].parameters())
    encoder = [
        m.weight.numel()
        for n, m in models["dense"].named_modules()
        if isinstance(m, torch.nn.Linear) and re.fullmatch(ec.ENCODER, n)
    ]
    assert len(encoder) == 2 * 6  # 2 layers × (q, k, v, o, intermediate, output)
    for key in ("prune50", "prune2:4"):
        assert by_key[key]["parameters"] == dense_params - sum(n // 2 for n in encoder)
    assert by_key["int8"]["parameters"] == dense_params
    # the student keeps 1 of 2 layers: one layer's parameters fewer
    layer = sum(p.numel() for p in models["dense"].bert.encoder.layer[0].parameters())
    assert by_key["student"]["parameters"] == dense_params - layer
