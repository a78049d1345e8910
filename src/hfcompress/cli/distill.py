"""``hfcompress distill TEACHER --recipe R --train-text F --output DIR``: compress a copy of the
teacher and distill it on text; the student is saved with the tokenizer and a model card."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

from datasets import Dataset
from rich.console import Console
from transformers import HfArgumentParser

from hfcompress import Recipe, compress_model
from hfcompress.cli import _common as common
from hfcompress.cli._common import (
    CliError,
    add_model_flags,
    add_tokenizer_flag,
    positive_int,
    read_texts,
)
from hfcompress.cli._output import atomic_output, check_output
from hfcompress.model_card import write_model_card
from hfcompress.training import (
    CompressionLoggingCallback,
    DistillationArguments,
    DistillationTrainer,
    causal_lm_blocks,
)


def cmd_distill(args: argparse.Namespace, console: Console) -> int:
    check_output(args.output, "--output", "folder", overwrite=True)  # run/ may be there already
    check_output(args.output / "student", "--output", "folder", args.overwrite)
    recipe = Recipe.load(args.recipe)
    text = read_texts(args.train_text, "--train-text")
    try:
        (training,) = HfArgumentParser(DistillationArguments).parse_args_into_dataclasses(
            args=[*args.training_args, "--output_dir", str(args.output / "run")]
        )
    except (SystemExit, ValueError) as error:  # malformed flags exit; unknown ones raise
        raise CliError(
            f"distill: bad training flags {args.training_args} (DistillationArguments / "
            "TrainingArguments fields, e.g. --max_steps 100)"
        ) from error
    common.resolve_model(args.teacher)
    tokenizer = common.tokenizer_of(args, args.teacher)
    teacher = common.load_model(args.teacher, args.dtype, args.model_task)
    student = copy.deepcopy(teacher)
    report = compress_model(student, recipe)
    console.print(report.table())
    blocks = causal_lm_blocks(Dataset.from_dict({"text": [text]}), tokenizer, args.block_size)
    if len(blocks) == 0:
        raise CliError(f"--train-text: shorter than one block of {args.block_size} tokens")
    trainer = DistillationTrainer(
        model=student,
        teacher=teacher,
        args=training,
        train_dataset=blocks,
        callbacks=[CompressionLoggingCallback()],
    )
    trainer.train()
    with atomic_output(args.output / "student", args.overwrite) as tmp:
        student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        hub_id = None if Path(args.teacher).expanduser().exists() else args.teacher
        write_model_card(student, tmp, base_model=hub_id)
    console.print(f"distilled student saved to {args.output / 'student'}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    distill = sub.add_parser(
        "distill",
        help="compress a teacher with a recipe and distill the student on text",
        description="Unrecognized --flags are DistillationArguments / TrainingArguments "
        "(e.g. --max_steps 100 --alpha 0.5 --temperature 2 --learning_rate 1e-4).",
    )
    distill.add_argument("teacher", metavar="TEACHER", help="local folder or hub id")
    distill.add_argument("--recipe", required=True, type=Path)
    distill.add_argument("--train-text", required=True, type=Path, nargs="+")
    distill.add_argument("--output", required=True, type=Path)
    distill.add_argument("--block-size", type=positive_int, default=128)
    distill.add_argument("--overwrite", action="store_true")
    add_tokenizer_flag(distill)
    add_model_flags(distill)
    distill.set_defaults(func=cmd_distill, extra_flags="training_args")
