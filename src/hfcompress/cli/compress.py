"""``hfcompress compress MODEL --recipe R --output DIR``: apply a recipe and save the checkpoint.

The output folder holds the compressed model, the tokenizer found with MODEL (or
``--tokenizer``), ``compression_report.json`` and a model card (README.md). Data-aware criteria
take calibration data as ``plan`` does (``--calibration-text`` or ``--dataset``).
``--dry-run`` validates and counts parameters without decomposing anything;
``--estimate-errors`` adds the decompositions' errors, still changing nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from torch import nn

from hfcompress import Recipe, RecipeError, compress_model, plan_compression
from hfcompress.cli import _common as common
from hfcompress.cli._common import CliError, add_model_flags, add_tokenizer_flag, resolve_model
from hfcompress.cli._data import add_calibration_flags, has_calibration, load_calibration
from hfcompress.cli._dry_run import dry_run
from hfcompress.cli._output import atomic_output, check_output
from hfcompress.cli._progress import ForwardPasses, Pass
from hfcompress.model_card import write_model_card

CALIBRATION_FLAGS = "--calibration-text FILE… or --dataset NAME_OR_PATH (with --n-calib, --seq-len)"


def validate(
    model: nn.Module, recipe: Recipe, recipe_path: Path, calibrated: bool
) -> tuple[list[Any], list[tuple[str, str]]]:
    """``plan_compression``, with a CLI message when the recipe only lacks calibration data."""
    try:
        return plan_compression(model, recipe, calibrated=calibrated)
    except RecipeError as error:
        if calibrated:
            raise
        try:
            plan_compression(model, recipe, calibrated=True)
        except RecipeError:
            raise error from None  # wrong for other reasons too: the library's message says all
        named = re.search(r"criterion: ('\w+')", str(error))
        which = f"criterion {named.group(1)}" if named else "a data-aware criterion"
        raise CliError(
            f"--recipe {str(recipe_path)!r}: {which} needs calibration data; pass "
            f"{CALIBRATION_FLAGS}"
        ) from error


def cmd_compress(args: argparse.Namespace, console: Console) -> int:
    # Fail on a bad output, model path, recipe, tokenizer or data before loading any weights.
    if not args.dry_run:
        check_output(args.output, "--output", "folder", args.overwrite)
    resolve_model(args.model)
    recipe = Recipe.load(args.recipe)
    calibrated = has_calibration(args)
    tokenizer, missing = None, None
    if calibrated or args.tokenizer is not None:
        tokenizer = common.tokenizer_of(args, args.model)
    elif not args.dry_run:
        try:
            tokenizer = common.load_tokenizer(args.model)
        except CliError as error:  # the model is saved alone; say so at the end
            missing = error
    calibration = load_calibration(args, tokenizer) if calibrated else None
    model = common.load_model(args.model, args.dtype, args.model_task)
    ops, skipped = validate(model, recipe, args.recipe, calibrated)
    if args.dry_run and not args.estimate_errors:
        console.print(dry_run(model, ops, skipped).table())
        return 0
    sequences = 0 if calibration is None else calibration.shape[0]
    watch = (
        ForwardPasses(model, sequences, [Pass("gradients", grad=True)], repeat=True)
        if calibration is not None
        else contextlib.nullcontext()
    )
    with watch:
        report = compress_model(model, recipe, calibration=calibration, dry_run=args.dry_run)
    console.print(report.table())
    if args.dry_run:
        return 0
    with atomic_output(args.output, args.overwrite) as tmp, console.status("saving"):
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "compression_report.json").write_text(
            json.dumps(report.to_dict(), indent=1), encoding="utf-8"
        )
        hub_id = None if Path(args.model).expanduser().exists() else args.model
        write_model_card(model, tmp, report, base_model=hub_id)
    if missing is not None:
        print(
            f"hfcompress compress: note: the output has no tokenizer: {missing}",
            file=sys.stderr,
        )
    console.print(f"saved to {args.output}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    compress = sub.add_parser(
        "compress",
        help="compress a model with a recipe and save it",
        description="Compress MODEL with a recipe and save the checkpoint, its tokenizer, "
        "compression_report.json and a model card (README.md) to --output.",
    )
    compress.add_argument("model", metavar="MODEL", help="local folder or hub id")
    compress.add_argument("--recipe", required=True, type=Path, help="recipe .yaml or .json")
    compress.add_argument("--output", type=Path, help="folder for the compressed checkpoint")
    compress.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the recipe and count parameters; decompose nothing, save nothing",
    )
    compress.add_argument(
        "--estimate-errors",
        action="store_true",
        help="with --dry-run: run the decompositions too, for each module's error (slower)",
    )
    compress.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    add_calibration_flags(compress, required=False)
    add_tokenizer_flag(compress)
    add_model_flags(compress)
    compress.set_defaults(func=cmd_compress, check=_check_args)


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not args.dry_run and args.output is None:
        parser.error("compress: --output is required (or pass --dry-run)")
