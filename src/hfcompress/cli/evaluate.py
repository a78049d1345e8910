"""``hfcompress eval MODEL``: perplexity, classification accuracy/F1, size, latency and speedup."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from datasets import Dataset, load_dataset
from rich.console import Console
from rich.table import Table

from hfcompress.cli import _common as common
from hfcompress.cli._common import (
    CliError,
    add_model_flags,
    add_tokenizer_flag,
    positive_int,
    read_texts,
)
from hfcompress.evaluation import (
    checkpoint_size_mb,
    compare_speed,
    count_parameters,
    evaluate_classification,
    measure_generation,
    measure_latency,
    perplexity_of_text,
)
from hfcompress.evaluation.efficiency import SpeedComparison
from hfcompress.inference import model_bytes


def load_table(path: Path) -> Dataset:
    suffix = path.suffix.lower().lstrip(".")
    builder = {"csv": "csv", "json": "json", "jsonl": "json", "parquet": "parquet"}.get(suffix)
    if builder is None or not path.is_file():
        raise CliError(
            f"--task {str(path)!r}: expected an existing .csv, .json, .jsonl or .parquet file"
        )
    return load_dataset(builder, data_files=str(path), split="train")


def cmd_eval(args: argparse.Namespace, console: Console) -> int:
    if not (args.perplexity or args.task or args.speed):
        raise CliError("eval: choose at least one of --perplexity, --task, --speed")
    if args.perplexity and not args.text:
        raise CliError("--perplexity: needs --text FILE (the text to score)")
    tokenizer = None
    if args.perplexity or args.task:  # before the model loads: a missing tokenizer fails fast
        tokenizer = common.tokenizer_of(args, args.model)
    model = common.load_model(args.model, args.dtype, args.model_task)
    table = Table(title=f"hfcompress eval: {args.model}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    params = count_parameters(model)
    table.add_row("parameters (stored)", f"{params.total:,}")
    table.add_row("parameters (non-zero)", f"{params.nonzero:,}")
    if Path(args.model).is_dir():
        table.add_row("checkpoint size (MB)", f"{checkpoint_size_mb(Path(args.model)):.2f}")
    if args.perplexity:
        result = perplexity_of_text(
            model, tokenizer, read_texts(args.text), args.max_length, args.stride
        )
        table.add_row("perplexity", f"{result.perplexity:.3f}")
        table.add_row("tokens scored / windows", f"{result.tokens:,} / {result.windows}")
    if args.task:
        metrics = evaluate_classification(
            model,
            load_table(args.task),
            tokenizer,
            text_column=args.text_column,
            label_column=args.label_column,
        )
        for name, value in metrics.items():
            table.add_row(name, f"{value:.4f}")
    if args.speed:
        reference = (
            common.load_model(args.reference, args.dtype, args.model_task)
            if args.reference
            else None
        )
        add_speed_rows(table, model, reference, args)
    console.print(table)
    return 0


def _can_generate(model: torch.nn.Module) -> bool:
    can = getattr(model, "can_generate", None)
    is_decoder_only = not getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    return callable(can) and bool(can()) and is_decoder_only


def add_speed_rows(
    table: Table,
    model: torch.nn.Module,
    reference: torch.nn.Module | None,
    args: argparse.Namespace,
) -> None:
    """Memory, forward throughput and (for a causal LM) generation tokens/s, beside the reference.

    Timings of the two models alternate in one run, so their ratio is meaningful on a busy
    machine; absolute numbers are not.
    """
    label = " vs reference"
    if reference is not None:
        table.add_row("reference", str(args.reference))
    size = model_bytes(model)
    table.add_row("model memory (MB)", f"{size / 1e6:,.1f}")
    if reference is not None:
        table.add_row(f"model memory{label}", f"{size / model_bytes(reference):.2f}x")
    vocab = getattr(model.config, "vocab_size", 1000)
    ids = torch.randint(
        0, vocab, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(0)
    )
    inputs = {"input_ids": ids.to(next(model.parameters()).device)}
    if reference is not None:
        comparison = compare_speed(model, reference, inputs, repeats=args.repeats)
        latency = comparison.model
        table.add_row(f"forward speedup{label}", f"{comparison.speedup:.2f}x")
    else:
        latency = measure_latency(model, inputs, repeats=args.repeats)
    table.add_row(
        "forward latency median / p10 / p90 (ms)",
        f"{latency.median_s * 1e3:.1f} / {latency.p10_s * 1e3:.1f} / {latency.p90_s * 1e3:.1f}",
    )
    table.add_row("forward throughput (tokens/s)", f"{latency.tokens_per_s:,.0f}")
    if not (_can_generate(model) and (reference is None or _can_generate(reference))):
        return
    prompt = ids[:, : min(args.seq_len, 16)]
    result = measure_generation(
        model, prompt, args.new_tokens, reference, repeats=max(1, min(args.repeats, 5))
    )
    generated = result.model if isinstance(result, SpeedComparison) else result
    table.add_row(
        f"generation tokens/s ({args.new_tokens} new, batch {args.batch_size})",
        f"{generated.tokens_per_s:,.1f}",
    )
    if isinstance(result, SpeedComparison):
        table.add_row(f"generation speedup{label}", f"{result.speedup:.2f}x")


def register(sub: argparse._SubParsersAction) -> None:
    evaluate = sub.add_parser("eval", help="perplexity, task accuracy, size and speed of a model")
    evaluate.add_argument("model", metavar="MODEL", help="local folder or hub id")
    evaluate.add_argument("--perplexity", action="store_true", help="sliding-window perplexity")
    evaluate.add_argument("--text", type=Path, nargs="+", help="text file(s) for --perplexity")
    evaluate.add_argument("--max-length", type=positive_int, default=None, help="window (tokens)")
    evaluate.add_argument("--stride", type=positive_int, default=None, help="window step (tokens)")
    evaluate.add_argument(
        "--task", type=Path, help="classification data: .csv/.json/.jsonl/.parquet"
    )
    evaluate.add_argument("--text-column", default="text")
    evaluate.add_argument("--label-column", default="label")
    evaluate.add_argument(
        "--speed", action="store_true", help="memory, forward and generation speed"
    )
    evaluate.add_argument("--reference", help="a model to measure speedup against (with --speed)")
    evaluate.add_argument("--batch-size", type=positive_int, default=1)
    evaluate.add_argument("--seq-len", type=positive_int, default=128)
    evaluate.add_argument("--repeats", type=positive_int, default=10)
    evaluate.add_argument(
        "--new-tokens",
        type=positive_int,
        default=32,
        help="tokens generated per timed call of a causal LM, after a 16-token prompt (--speed)",
    )
    add_tokenizer_flag(evaluate)
    add_model_flags(evaluate, "--model-task")  # --task is the classification data
    evaluate.set_defaults(func=cmd_eval)
