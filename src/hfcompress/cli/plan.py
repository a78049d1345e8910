"""``hfcompress plan MODEL --keep F --targets R``: per-layer ranks / sparsities for a budget.

It measures the model on calibration data (``--calibration-text`` or ``--dataset``), writes the
recipe, and prints the ``compress`` command that applies it, with the same calibration flags:
the planned criteria are data-aware.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from rich.console import Console

from hfcompress.cli import _common as common
from hfcompress.cli._common import add_model_flags, add_tokenizer_flag, fraction
from hfcompress.cli._data import add_calibration_flags, calibration_argv, load_calibration
from hfcompress.cli._output import check_output, write_text_atomic
from hfcompress.cli._progress import ForwardPasses, Pass
from hfcompress.planner import plan_recipe


def compress_command(args: argparse.Namespace) -> list[str]:
    """The ``hfcompress compress`` command line that applies the plan, as argv."""
    output = args.output.with_name(f"{args.output.stem}-compressed")
    argv = ["hfcompress", "compress", args.model, "--recipe", str(args.output)]
    argv += ["--output", str(output), *calibration_argv(args)]
    if args.tokenizer is not None:
        argv += ["--tokenizer", args.tokenizer]
    if args.dtype != "auto":
        argv += ["--dtype", args.dtype]
    if args.model_task is not None:
        argv += ["--task", args.model_task]
    return argv


def _passes(args: argparse.Namespace) -> tuple[list[Pass], str]:
    """The passes ``plan_recipe`` makes over the data (statistics has its own bar), and what
    follows them."""
    measured = args.method == "lowrank" or args.allocation == "saliency"
    passes = [Pass("statistics", grad=False, bar=False)]
    if measured and args.weighting == "loss":
        passes.append(Pass("gradients", grad=True))
    what = "ranks" if args.method == "lowrank" else "sparsities"
    return passes, f"allocating {what} for the budget (--keep {args.keep})"


def cmd_plan(args: argparse.Namespace, console: Console) -> int:
    check_output(args.output, "--output", "file", args.overwrite)
    common.resolve_model(args.model)
    calibration = load_calibration(args, common.tokenizer_of(args, args.model))
    model = common.load_model(args.model, args.dtype, args.model_task)
    passes, then = _passes(args)
    with ForwardPasses(model, calibration.shape[0], passes, then=then):
        plan = plan_recipe(
            model,
            calibration,
            keep=args.keep,
            targets=args.targets,
            method=args.method,
            weighting=args.weighting,
            allocation=args.allocation,
        )
    console.print(plan.table())
    write_text_atomic(args.output, plan.recipe.to_yaml())
    console.print(f"recipe written to {args.output}; apply it with:", highlight=False)
    # one line, never wrapped and without markup, so that it can be copied as it is
    console.print(shlex.join(compress_command(args)), markup=False, highlight=False, soft_wrap=True)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    plan = sub.add_parser(
        "plan",
        help="allocate per-layer ranks or sparsities for a global budget, as a recipe",
        description="Measure MODEL on calibration data, allocate per-module ranks (lowrank) or "
        "sparsities (prune) so the targeted modules keep --keep of their parameters, write the "
        "recipe to --output and print the compress command that applies it.",
    )
    plan.add_argument("model", metavar="MODEL", help="local folder or hub id")
    plan.add_argument("--keep", type=fraction, required=True, help="fraction of parameters kept")
    plan.add_argument("--targets", required=True, help="regex (re.fullmatch) of modules")
    plan.add_argument("--method", choices=["lowrank", "prune"], default="lowrank")
    plan.add_argument(
        "--weighting",
        choices=["loss", "output"],
        default="loss",
        help="lowrank: compare modules by estimated loss increase, or by relative output error",
    )
    plan.add_argument(
        "--allocation",
        choices=["saliency", "owl"],
        default="saliency",
        help="prune: per-module sparsities from OBS saliencies (sparsegpt), or OWL block "
        "sparsities (wanda)",
    )
    plan.add_argument("--output", type=Path, required=True, help="recipe .yaml to write")
    plan.add_argument("--overwrite", action="store_true")
    add_calibration_flags(plan, required=True)
    add_tokenizer_flag(plan)
    add_model_flags(plan)
    plan.set_defaults(func=cmd_plan)
