"""Calibration data for ``plan`` and ``compress``: text files or a ``datasets`` dataset, tokenized
with the model's tokenizer into ``--n-calib`` sequences of ``--seq-len`` tokens.

One implementation for both subcommands: ``add_calibration_flags`` declares the flags,
``load_calibration`` reads them, and ``calibration_argv`` writes them back out (``plan`` prints
the ``compress`` command that applies its recipe).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from hfcompress.cli._common import CliError, first_line, positive_int, read_texts

# data-file suffix -> the datasets builder that reads it
DATA_FILE_BUILDERS = {
    "txt": "text",
    "text": "text",
    "csv": "csv",
    "json": "json",
    "jsonl": "json",
    "parquet": "parquet",
}
# files ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` write
_SAVED_DATASET_FILES = ("dataset_dict.json", "state.json", "dataset_info.json")


def add_calibration_flags(parser: argparse.ArgumentParser, required: bool) -> None:
    """``--calibration-text FILE…`` or ``--dataset NAME_OR_PATH``, and how much of it to use."""
    group = parser.add_argument_group(
        "calibration data",
        "text files or a datasets dataset, tokenized with the model's tokenizer"
        + ("" if required else "; needed by data-aware criteria (wanda, sparsegpt, whitened, ...)"),
    )
    source = group.add_mutually_exclusive_group(required=required)
    source.add_argument("--calibration-text", type=Path, nargs="+", metavar="FILE")
    source.add_argument(
        "--dataset",
        metavar="NAME_OR_PATH",
        help="a hub dataset name, a local data file (.txt, .csv, .json, .jsonl, .parquet) or a "
        "folder (data files, or a dataset saved with save_to_disk)",
    )
    group.add_argument("--dataset-config", metavar="NAME", help="the dataset's configuration")
    group.add_argument("--dataset-split", default="train", help="split to read (default train)")
    group.add_argument(
        "--dataset-column", default="text", help="column holding the text (default text)"
    )
    group.add_argument(
        "--n-calib", type=positive_int, default=32, help="calibration sequences (default 32)"
    )
    group.add_argument(
        "--seq-len", type=positive_int, default=256, help="tokens per sequence (default 256)"
    )


def has_calibration(args: argparse.Namespace) -> bool:
    return bool(args.calibration_text) or args.dataset is not None


def calibration_argv(args: argparse.Namespace) -> list[str]:
    """The calibration flags of ``args`` as a command line, for a command to print."""
    if args.calibration_text:
        argv = ["--calibration-text", *map(str, args.calibration_text)]
    elif args.dataset is not None:
        argv = ["--dataset", args.dataset]
        if args.dataset_config is not None:
            argv += ["--dataset-config", args.dataset_config]
        argv += ["--dataset-split", args.dataset_split, "--dataset-column", args.dataset_column]
    else:
        return []
    return [*argv, "--n-calib", str(args.n_calib), "--seq-len", str(args.seq_len)]


def load_calibration(
    args: argparse.Namespace, tokenizer: PreTrainedTokenizerBase
) -> torch.Tensor | None:
    """Token ids [n, seq_len] with n ≤ ``--n-calib``, or None when no data was given.

    The documents (the text files joined, or the dataset's rows) are tokenized in order and
    concatenated until there are enough tokens, then cut into sequences.

    Raises:
        CliError: unreadable data, a missing column, or less than one sequence of tokens.
    """
    if args.calibration_text:
        where = "--calibration-text"
        documents: Iterator[str] = iter([read_texts(args.calibration_text, where)])
    elif args.dataset is not None:
        where = f"--dataset {args.dataset!r}"
        documents = dataset_texts(args)
    else:
        return None
    wanted = args.n_calib * args.seq_len
    ids: list[int] = []
    for document in documents:
        if document:
            ids.extend(tokenizer(document).input_ids)
        if len(ids) >= wanted:
            break
    usable = min(len(ids) // args.seq_len * args.seq_len, wanted)
    if usable == 0:
        raise CliError(
            f"{where}: shorter than one sequence of --seq-len {args.seq_len} tokens "
            f"({len(ids)} tokens)"
        )
    return torch.tensor(ids[:usable], dtype=torch.long).view(-1, args.seq_len)


def dataset_texts(args: argparse.Namespace) -> Iterator[str]:
    """The ``--dataset-column`` values of ``--dataset``'s ``--dataset-split``, row by row.

    A hub dataset is streamed (only the rows used are downloaded); local files and folders are
    read with the matching ``datasets`` builder, and a folder written by ``save_to_disk`` with
    ``load_from_disk``.
    """
    name, split, column = args.dataset, args.dataset_split, args.dataset_column
    where = f"--dataset {name!r}"
    path = Path(name).expanduser()
    looks_local = name.startswith(("/", ".", "~")) or name.count("/") > 1 or path.suffix != ""
    if not path.exists() and looks_local:
        raise CliError(f"{where}: no such file or folder (and not a hub name such as 'owner/name')")
    try:
        if path.is_file():
            builder = DATA_FILE_BUILDERS.get(path.suffix.lower().lstrip("."))
            if builder is None:
                raise CliError(
                    f"{where}: expected a data file ending in "
                    f"{', '.join('.' + s for s in DATA_FILE_BUILDERS)}, or a folder or hub name"
                )
            table = datasets.load_dataset(builder, data_files={split: str(path)}, split=split)
        elif path.is_dir() and any((path / f).is_file() for f in _SAVED_DATASET_FILES):
            table = datasets.load_from_disk(str(path))
            if isinstance(table, datasets.DatasetDict):
                if split not in table:
                    raise CliError(
                        f"--dataset-split {split!r}: {name!r} has the splits {sorted(table)}"
                    )
                table = table[split]
        else:
            table = datasets.load_dataset(
                str(path) if path.is_dir() else name,
                args.dataset_config,
                split=split,
                streaming=not path.is_dir(),
            )
        rows = iter(table)
        for row in rows:
            if column not in row:
                raise CliError(
                    f"--dataset-column {column!r}: not a column of {name!r}; it has {sorted(row)}"
                )
            value = row[column]
            if not isinstance(value, str):
                raise CliError(
                    f"--dataset-column {column!r}: expected text, got {type(value).__name__} "
                    f"in {name!r}"
                )
            yield value
    except CliError:
        raise
    except (OSError, ValueError, KeyError, ImportError) as error:
        # datasets reports a missing dataset, config or split as FileNotFoundError/ValueError
        raise CliError(f"{where}: cannot read it ({first_line(error)})") from error
