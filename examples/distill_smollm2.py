"""Compress SmolLM2-135M 2× in its MLPs, then distill it back from the dense teacher.

Held-out perplexity (Shakespeare plays never trained on) before compression, right after, and
after distillation, with the time each step took. Defaults run offline on 2 CPU cores in well
under 30 minutes; the flags scale it up for a GPU.

    python examples/distill_smollm2.py                      # offline: SmolLM2 + Shakespeare
    python examples/distill_smollm2.py --method lowrank     # rank at half the MLP parameters
    python examples/distill_smollm2.py --model HuggingFaceTB/SmolLM2-135M-Instruct \\
        --max-steps 2000 --batch-size 16 --block-size 512 --bf16   # online, on a GPU

Writes ``<output>/results.md`` (the table) and the distilled checkpoint ``<output>/student``.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from datasets import Dataset
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, AutoTokenizer

import hfcompress
from hfcompress.evaluation import count_parameters, perplexity
from hfcompress.training import (
    CompressionLoggingCallback,
    DistillationArguments,
    DistillationTrainer,
    causal_lm_blocks,
)

MLP = r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj"
RECIPES = {
    # 2x fewer MLP parameters, each way
    "lowrank": {"stages": [{"method": "lowrank", "targets": MLP, "ratio": 0.5}]},
    "prune": {"stages": [{"method": "prune", "targets": MLP, "sparsity": 0.5}]},
    # (576, 768) factors of [1536, 576] and (768, 576) of [576, 1536]: 2 terms ≈ 2x fewer
    "kronecker": {
        "stages": [
            {
                "method": "kronecker",
                "targets": r".*mlp\.(gate|up)_proj",
                "a_shape": [768, 288],
                "terms": 2,
            },
            {
                "method": "kronecker",
                "targets": r".*mlp\.down_proj",
                "a_shape": [288, 768],
                "terms": 2,
            },
        ]
    },
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=None, help="folder or hub id (default: offline SmolLM2-135M)"
    )
    parser.add_argument("--method", choices=sorted(RECIPES), default="prune")
    parser.add_argument("--max-steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument(
        "--alpha", type=float, default=0.5, help="hard-label weight (1 = no teacher)"
    )
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--train-tokens", type=int, default=200_000, help="training text budget")
    parser.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens scored")
    parser.add_argument("--eval-window", type=int, default=512)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--output", type=Path, default=Path("out/distill_smollm2"))
    return parser.parse_args()


def load_texts(tokenizer, train_tokens: int) -> tuple[Dataset, str]:
    from offline_data import heldout_and_calibration_split, shakespeare_texts

    texts = shakespeare_texts()
    held_out, train_plays = heldout_and_calibration_split()
    train, budget = [], train_tokens * 4  # ~4 characters per token
    for name in train_plays:
        text = texts[name].read_text(encoding="utf-8")
        train.append(text[:budget])
        budget -= len(train[-1])
        if budget <= 0:
            break
    heldout = "\n\n".join(texts[name].read_text(encoding="utf-8") for name in held_out)
    return Dataset.from_dict({"text": train}), heldout


def held_out_ppl(model, ids: torch.Tensor, window: int) -> float:
    return perplexity(model, ids, max_length=window, stride=window // 2, progress=False).perplexity


def main() -> None:
    args = parse_args()
    console = Console(width=120)
    model_path = args.model
    if model_path is None:
        from offline_data import smollm2_dir

        model_path = smollm2_dir()
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    teacher = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()
    train_text, heldout = load_texts(tokenizer, args.train_tokens)
    eval_ids = tokenizer(heldout, return_tensors="pt").input_ids[:, : args.eval_tokens]
    if torch.cuda.is_available():
        teacher.to("cuda")

    rows: list[tuple[str, int, float, float]] = []
    start = time.perf_counter()
    rows.append(
        (
            "dense teacher",
            count_parameters(teacher).nonzero,
            held_out_ppl(teacher, eval_ids, args.eval_window),
            time.perf_counter() - start,
        )
    )

    start = time.perf_counter()
    student = copy.deepcopy(teacher)
    report = hfcompress.compress_model(student, RECIPES[args.method])
    compress_s = time.perf_counter() - start
    rows.append(
        (
            f"compressed ({args.method}, MLP 2x)",
            count_parameters(student).nonzero,
            held_out_ppl(student, eval_ids, args.eval_window),
            compress_s,
        )
    )
    console.print(f"MLP parameters: {report.params_before:,} → {report.params_after:,}")

    blocks = causal_lm_blocks(train_text, tokenizer, block_size=args.block_size)
    training = DistillationArguments(
        output_dir=str(args.output / "run"),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.max_steps // 20),
        weight_decay=0.0,
        alpha=args.alpha,
        temperature=args.temperature,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        bf16=args.bf16,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = DistillationTrainer(
        model=student,
        teacher=teacher,
        args=training,
        train_dataset=blocks,
        callbacks=[CompressionLoggingCallback()],
    )
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start
    student.eval()
    rows.append(
        (
            f"distilled ({args.max_steps} steps)",
            count_parameters(student).nonzero,
            held_out_ppl(student, eval_ids, args.eval_window),
            train_s,
        )
    )
    student.save_pretrained(args.output / "student")
    tokenizer.save_pretrained(args.output / "student")
    write_results(args, rows, console)


def write_results(
    args: argparse.Namespace, rows: list[tuple[str, int, float, float]], console: Console
) -> None:
    table = Table(title=f"SmolLM2-135M, MLP 2x by {args.method}, held-out Shakespeare perplexity")
    for column in ("model", "parameters", "held-out ppl", "time (s)"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, params, ppl, seconds in rows:
        table.add_row(name, f"{params:,}", f"{ppl:.2f}", f"{seconds:.0f}")
    console.print(table)
    lines = [
        "| model | parameters | held-out ppl | time (s) |",
        "|---|---|---|---|",
        *[f"| {n} | {p:,} | {q:.2f} | {s:.0f} |" for n, p, q, s in rows],
    ]
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
