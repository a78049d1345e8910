"""``hfcompress analyze MODEL``: rank, stable rank, energy and per-method errors of each matrix.

By default only the cheap analyses run (one ``svdvals`` per matrix: ranks, energy, the low-rank
and magnitude-pruning errors); ``--kronecker-candidates N`` adds the Kronecker search, one more
SVD per factor shape tried.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console

from hfcompress.analysis import analyze_model, plot_energy, plot_spectra
from hfcompress.cli import _common as common
from hfcompress.cli._common import add_model_flags, fraction
from hfcompress.cli._output import atomic_output, check_output, write_text_atomic


def cmd_analyze(args: argparse.Namespace, console: Console) -> int:
    if args.plots:
        check_output(args.plots, "--plots", "folder", args.overwrite)
    if args.json:
        check_output(args.json, "--json", "file", overwrite=True)  # --json always replaces
    model = common.load_model(args.model, args.dtype, args.model_task)
    analysis = analyze_model(
        model,
        targets=args.targets,
        budget=args.budget,
        kronecker_candidates=args.kronecker_candidates,
    )
    console.print(analysis.table())
    if args.json:
        write_text_atomic(args.json, json.dumps(analysis.to_dict(), indent=1))
    if args.plots:
        with (
            atomic_output(args.plots, args.overwrite, "--plots") as tmp,
            console.status("plotting"),
        ):
            plot_spectra(analysis, tmp / "spectra.png")
            plot_energy(analysis, tmp / "energy.png")
        console.print(f"plots written to {args.plots}")
    return 0


def _candidates(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {value}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    analyze = sub.add_parser(
        "analyze",
        help="ranks, stable ranks, energy and per-method errors of each matrix",
        description="Rank, stable rank, energy, sparsity, and the low-rank and pruning errors "
        "at --budget of every Linear/Conv1D matrix (one SVD each, with a progress bar per "
        "module). The Kronecker search is opt-in: --kronecker-candidates N tries N factor "
        "shapes per matrix, one SVD each.",
    )
    analyze.add_argument("model", metavar="MODEL", help="local folder or hub id")
    analyze.add_argument("--targets", help="regex (re.fullmatch) of modules to analyze")
    analyze.add_argument(
        "--budget", type=fraction, default=0.5, help="fraction of parameters kept (default 0.5)"
    )
    analyze.add_argument(
        "--kronecker-candidates",
        type=_candidates,
        default=0,
        metavar="N",
        help="Kronecker factor shapes tried per matrix, one SVD each (default 0: no search)",
    )
    analyze.add_argument("--plots", type=Path, help="folder for spectra.png and energy.png")
    analyze.add_argument("--json", type=Path, help="write the analysis as JSON")
    analyze.add_argument("--overwrite", action="store_true", help="replace a non-empty --plots")
    add_model_flags(analyze)
    analyze.set_defaults(func=cmd_analyze)
