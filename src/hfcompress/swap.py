"""Building and swapping modules, with an undo log: what every compression path shares.

A :class:`Swapper` asks the stage's criterion (from the registry) for the new module, swaps it
into the model and remembers the original, so that any failure, Ctrl-C included, can put every
original module back. Used by ``compress_model``'s data-free path and by the calibrated
layer-by-layer runner alike.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hfcompress.layers import count_parameters, dense_weight_of
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


@dataclass(frozen=True)
class Facts:
    """What the report needs of one replaced module, taken while its original is in memory."""

    shape: tuple[int, int]
    params_before: int
    rel_error: float
    output_error: float | None


class DiskStash:
    """The tensors of modules kept only for an undo, moved to memory-mapped temporary files.

    A compressed block's replaced originals are needed again only if the run fails or is
    interrupted. On disk, the model's memory holds the new layers alone (the originals' pages
    are file-backed and evictable); an undo reads them back to their device. The folder is
    deleted by :meth:`close`.
    """

    def __init__(self) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="hfcompress-undo-")
        self._count = 0
        # id(module) -> [(owner, attribute, is parameter, device)]: where each tensor goes back
        self._moved: dict[int, list[tuple[nn.Module, str, bool, torch.device]]] = {}

    def stash(self, module: nn.Module) -> None:
        """Move ``module``'s parameters and buffers (recursively) to files, in place."""
        moved = self._moved.setdefault(id(module), [])
        for owner in module.modules():
            for table, is_param in ((owner._parameters, True), (owner._buffers, False)):
                for attribute, tensor in list(table.items()):
                    if tensor is None or tensor.numel() == 0 or tensor.device.type == "meta":
                        continue
                    mapped = self._write(tensor.detach())
                    if is_param:
                        tensor.data = mapped
                    else:
                        table[attribute] = mapped
                    moved.append((owner, attribute, is_param, tensor.device))

    def _write(self, tensor: torch.Tensor) -> torch.Tensor:
        path = Path(self._folder.name) / f"{self._count}.bin"
        self._count += 1
        raw = tensor.cpu().contiguous().view(torch.uint8).reshape(-1)
        raw.numpy().tofile(path)
        # mode "c": copy-on-write, the file is never changed through the mapping
        mapped = torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c"))
        return mapped.view(tensor.dtype).view(tensor.shape)

    def restore(self, module: nn.Module) -> None:
        """Read a stashed module's tensors back into memory, each on its own device."""
        for owner, attribute, is_param, device in self._moved.pop(id(module), []):
            table = owner._parameters if is_param else owner._buffers
            back = table[attribute].detach().to(device, copy=True)
            if is_param:
                table[attribute].data = back
            else:
                table[attribute] = back

    def close(self) -> None:
        self._moved.clear()
        self._folder.cleanup()


class Swapper:
    """Applies operations one by one, remembering what the report and an undo need.

    Args:
        model: the model being compressed.
        swap: whether to put new modules into the model (a dry run without calibration only
            builds them).
        stash: where to keep replaced originals once their block is final (None: in memory).
    """

    def __init__(self, model: nn.Module, swap: bool = True, stash: DiskStash | None = None) -> None:
        self.model = model
        self.swap = swap
        self.stash = stash
        self.facts: dict[str, Facts] = {}
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
        """Take the report's facts of ``names`` (default: all), whose modules are final.

        Their statistics become output errors and are dropped: a module's output error needs
        its inputs' Gram matrix X·Xᵀ (fp32, in²: 127 MB for a 5632-wide down projection), so
        keeping every module's until the report would hold the whole model's statistics at
        once. The calibrated runner settles each block as soon as it is compressed.
        """
        for name in list(self.current) if names is None else names:
            if name in self.facts or name not in self.current:
                continue
            stats = self.stats.pop(name, None)
            original, new = self.originals[name], self.current[name]
            W = dense_weight_of(original)
            error = None if stats is None else output_error(W, new, stats.inputs.gram)
            if error is not None:
                self.output_errors[name] = error
            self.facts[name] = Facts(
                (W.shape[0], W.shape[1]), count_parameters(original), relative_error(W, new), error
            )

    def stash_originals(self, names: list[str]) -> None:
        """Move the (settled) originals of ``names`` to the disk stash, if there is one."""
        if self.stash is None:
            return
        for name in names:
            if name in self.originals:
                self.settle([name])
                self.stash.stash(self.originals[name])

    def undo(self) -> None:
        """Put every original module back, newest swap first."""
        for name, module in reversed(self._undo_log):
            if self.stash is not None:
                self.stash.restore(module)
            set_module(self.model, name, module)
        self._undo_log.clear()


def relative_error(original: torch.Tensor, module: nn.Module) -> float:
    """‖W − Ŵ‖_F / ‖W‖_F of the dense weight ``original`` and what ``module`` computes."""
    W = original.detach().float()
    W_hat = dense_weight_of(module).detach().float().to(W.device)
    return float(torch.linalg.matrix_norm(W - W_hat) / torch.linalg.matrix_norm(W).clamp_min(1e-30))


@torch.no_grad()
def output_error(W: torch.Tensor, module: nn.Module, gram: torch.Tensor) -> float:
    """‖(W − Ŵ)X‖_F / ‖W X‖_F from the Gram matrix G = X·Xᵀ: √tr(Δ G Δᵀ) / √tr(W G Wᵀ)."""
    W32 = W.detach().float().to(gram.device)
    delta = W32 - dense_weight_of(module).detach().float().to(gram.device)
    num = ((delta @ gram) * delta).sum().clamp_min(0).sqrt()
    den = ((W32 @ gram) * W32).sum().clamp_min(1e-30).sqrt()
    return float(num / den)
