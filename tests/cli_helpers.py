"""Shared by the ``tests/test_cli*.py`` files: a tiny checkpoint with a tokenizer, and
``main()`` run in this process (a user's command line, without a new interpreter per test)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import transformers

from conftest import tiny_model, word_tokenizer
from hfcompress import cli

WORDS = "the a of and to in is you that it he was for on are as with his they at".split()  # noqa: SIM905

RECIPE = (
    "stages:\n"
    "  - method: lowrank\n    targets: '.*mlp\\.(gate|up)_proj'\n    rank: 8\n"
    "  - method: prune\n    targets: '.*self_attn\\..*'\n    pattern: '2:4'\n"
)


def run_main(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    """``hfcompress ARGS`` as ``main(args)`` in this process: (exit code, stdout, stderr)."""
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as exit_:  # argparse: --help, bad flags
        code = exit_.code if isinstance(exit_.code, int) else 2
    out, err = capsys.readouterr()
    return code, out, err


def run_cli(*args: str, module: str = "hfcompress") -> subprocess.CompletedProcess[str]:
    """``python -m MODULE ARGS`` in a new interpreter, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def table_value(out: str, metric: str) -> str:
    """The value cell of ``metric``'s row in a two-column rich table."""
    match = re.search(rf"{re.escape(metric)}\s*│\s*([^│]+?)\s*│", out)
    assert match, f"no row {metric!r} in:\n{out}"
    return match.group(1)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with a word-level tokenizer, saved like a hub checkpoint, plus a text and a
    recipe. Read-only for the tests: they write under their own ``tmp_path``."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    word_tokenizer(WORDS).save_pretrained(folder)
    tiny_model("llama").save_pretrained(folder)
    (folder / "text.txt").write_text(" ".join(WORDS * 30))
    (folder / "recipe.yaml").write_text(RECIPE)
    return folder


@pytest.fixture(autouse=True)
def _no_library_bars():
    """transformers' and datasets' bars go to stderr, where these tests count lines."""
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()
    transformers.utils.logging.enable_progress_bar()
