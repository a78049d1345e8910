"""Progress for the passes over calibration data that the library runs without a bar of its own.

``plan_recipe``'s gradient pass and its allocation, and ``compress_model``'s gradient passes
(``fisher``, ``fisher_whitened``), show nothing while they run; the statistics, block-by-block,
decomposition and analysis passes have their own tqdm bars. ``ForwardPasses`` watches the
model's top-level forward calls and counts the sequences each pass has seen, telling a pass by
its grad mode (statistics run under ``torch.no_grad``, gradients under ``torch.enable_grad``).

This belongs in the library (a ``progress`` callback on ``plan_recipe`` / ``compress_model``);
until then the CLI watches from outside.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm


@dataclass(frozen=True)
class Pass:
    """A pass over every calibration sequence, under one grad mode.

    Attributes:
        label: shown as ``hfcompress: <label>``.
        grad: whether its forward calls run with gradients enabled.
        bar: whether to show a bar (False when the library shows its own).
    """

    label: str
    grad: bool
    bar: bool = True


class ForwardPasses:
    """Count the sequences each of ``passes`` sees, in order, with a tqdm bar per pass.

    Args:
        model: the model whose top-level forward calls are counted.
        sequences: calibration sequences per pass.
        passes: the passes expected, in order; a forward call in the other grad mode than the
            current pass expects is not counted.
        repeat: after the last pass, count further passes like it (``compress_model`` runs one
            gradient pass per gradient-based criterion in the recipe).
        then: a status line printed when the last pass is done (the work that follows it).
    """

    def __init__(
        self,
        model: nn.Module,
        sequences: int,
        passes: Sequence[Pass],
        *,
        repeat: bool = False,
        then: str | None = None,
    ) -> None:
        self.model = model
        self.sequences = max(sequences, 1)
        self.passes = list(passes)
        self.repeat = repeat
        self.then = then
        self.index = 0
        self.seen = 0
        self.bar: tqdm | None = None
        self.handle: Any = None

    def __enter__(self) -> ForwardPasses:
        self.handle = self.model.register_forward_pre_hook(self._count, with_kwargs=True)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.handle.remove()
        if self.bar is not None:
            self.bar.close()

    def _count(self, _module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if self.index >= len(self.passes):
            if not self.repeat or not self.passes:
                return
            self.index = len(self.passes) - 1
        current = self.passes[self.index]
        if torch.is_grad_enabled() != current.grad:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        rows = int(ids.shape[0]) if isinstance(ids, torch.Tensor) and ids.ndim == 2 else 1
        if current.bar and self.bar is None:
            self.bar = tqdm(
                total=self.sequences, desc=f"hfcompress: {current.label}", unit="seq", leave=True
            )
        self.seen += rows
        if self.bar is not None:
            self.bar.update(rows)
        if self.seen >= self.sequences:
            if self.bar is not None:
                self.bar.close()
                self.bar = None
            self.index += 1
            self.seen = 0
            if self.index == len(self.passes) and self.then is not None:
                print(f"hfcompress: {self.then}", file=sys.stderr, flush=True)
