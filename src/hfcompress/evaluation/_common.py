"""Helpers shared by the evaluation modules: the model's device, eval mode, optional imports."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from torch import nn

from hfcompress.errors import InvalidParameterError, MissingDependencyError

if TYPE_CHECKING:
    from datasets import Dataset


def require(package: str, feature: str) -> ModuleType:
    """Import an optional ``package`` that ``feature`` needs.

    Raises:
        MissingDependencyError: the package is not installed; the message says how to get it.
    """
    try:
        return importlib.import_module(package)
    except ImportError as error:
        raise MissingDependencyError(
            f"{feature} needs the {package!r} package, which is not installed: "
            f"pip install {package}"
        ) from error


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model with neither."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode with gradients off; restore its train/eval state afterwards.

    ``model.train(mode)`` sets every submodule to the same mode, so a model whose submodules
    were in mixed modes is restored module by module.
    """
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for module, training in modes.items():
            module.training = training


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels on an asynchronous device (CUDA); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_column(dataset: Dataset, column: str, argument: str) -> None:
    """Check that ``dataset`` is a ``datasets.Dataset`` with ``column``.

    Raises:
        InvalidParameterError: not a Dataset, or the column is missing (lists the columns).
        MissingDependencyError: ``datasets`` is not installed.
    """
    datasets = require("datasets", "evaluating on a dataset")
    if not isinstance(dataset, datasets.Dataset):
        hint = "; pick a split, e.g. dataset['test']" if isinstance(dataset, dict) else ""
        raise InvalidParameterError(
            f"dataset: expected a datasets.Dataset, got {type(dataset).__name__}{hint}"
        )
    if column not in dataset.column_names:
        raise InvalidParameterError(
            f"{argument}={column!r}: the dataset has no such column; its columns are "
            f"{dataset.column_names}"
        )
