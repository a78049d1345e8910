"""Building and swapping modules, with an undo log: what every compression path shares.

A :class:`Swapper` asks the stage's criterion (from the registry) for the new module, swaps it
into the model and remembers the original, so that any failure, Ctrl-C included, can put every
original module back. Used by ``compress_model``'s data-free path and by the calibrated
layer-by-layer runner alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hfcompress.layers import dense_weight_of
from hfcompress.registry import criterion_of
from hfcompress.stage import StageBase
from hfcompress.stats import LayerStats


@dataclass
class Operation:
    """One stage acting on one module, as validation planned it."""

    stage_index: int
    stage: StageBase  # with the module's overrides applied
    module_name: str
    acts_on: str  # the kind of module the stage meets: "dense" or a method's name


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule ``name`` (a qualified name) of ``model`` by ``module``."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


class Swapper:
    """Applies operations one by one, remembering what the report and an undo need.

    Args:
        model: the model being compressed.
        swap: whether to put new modules into the model (a dry run without calibration only
            builds them).
    """

    def __init__(self, model: nn.Module, swap: bool = True) -> None:
        self.model = model
        self.swap = swap
        self.current: dict[str, nn.Module] = {}  # module name -> its latest replacement
        self.originals: dict[str, nn.Module] = {}
        self.methods: dict[str, list[str]] = {}
        self.stats: dict[str, LayerStats] = {}  # until settle(): Gram matrices are large
        self.output_errors: dict[str, float] = {}
        self._undo_log: list[tuple[str, nn.Module]] = []
        self.last: Operation | None = None

    def apply(self, op: Operation, stats: LayerStats | None = None) -> nn.Module:
        """Build ``op``'s module from the current one (unchanged) and swap it in."""
        self.last = op
        module = self.current.get(op.module_name) or self.model.get_submodule(op.module_name)
        self.originals.setdefault(op.module_name, module)
        criterion = criterion_of(op.stage)
        new = criterion.build(module, op.stage, None if criterion.data_free else stats)
        if stats is not None and stats.inputs is not None and stats.inputs.gram is not None:
            self.stats[op.module_name] = stats
        self.current[op.module_name] = new
        self.methods.setdefault(op.module_name, []).append(op.stage.method_name)
        if self.swap:
            self._undo_log.append((op.module_name, module))
            set_module(self.model, op.module_name, new)
        return new

    def settle(self, names: list[str] | None = None) -> None:
        """Turn the statistics kept for ``names`` (default: all) into their output errors.

        A module's output error needs its inputs' Gram matrix X·Xᵀ (fp32, in²: 127 MB for a
        5632-wide down projection), so keeping every module's until the report would hold the
        whole model's statistics at once. The calibrated runner settles each block as soon as
        its modules are final.
        """
        for name in list(self.stats) if names is None else names:
            stats = self.stats.pop(name, None)
            if stats is not None:
                original = dense_weight_of(self.originals[name])
                self.output_errors[name] = output_error(
                    original, self.current[name], stats.inputs.gram
                )

    def undo(self) -> None:
        """Put every original module back, newest swap first."""
        for name, module in reversed(self._undo_log):
            set_module(self.model, name, module)
        self._undo_log.clear()


@torch.no_grad()
def output_error(W: torch.Tensor, module: nn.Module, gram: torch.Tensor) -> float:
    """‖(W − Ŵ)X‖_F / ‖W X‖_F from the Gram matrix G = X·Xᵀ: √tr(Δ G Δᵀ) / √tr(W G Wᵀ)."""
    W32 = W.detach().float().to(gram.device)
    delta = W32 - dense_weight_of(module).detach().float().to(gram.device)
    num = ((delta @ gram) * delta).sum().clamp_min(0).sqrt()
    den = ((W32 @ gram) * W32).sum().clamp_min(1e-30).sqrt()
    return float(num / den)
