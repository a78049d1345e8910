"""Running a model's blocks one at a time on calibration data.

The primitives every data-aware pass shares (the per-Linear criteria in
``hfcompress.calibration`` and the structured methods alike): calibration data normalized to
batches, the stack of blocks that holds given modules, the first block's inputs captured once,
a block run on its inputs to make the next block's, and forward pre-hooks that accumulate a
module's input statistics. No method is named here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from hfcompress.errors import CalibrationError, InvalidParameterError
from hfcompress.stats import InputStats

Batch = dict[str, torch.Tensor]


def calibration_batches(calibration: Any, batch_size: int = 8) -> list[Batch]:
    """Normalize calibration data to a list of ``{"input_ids": [b, seq], ...}`` batches.

    Accepts a LongTensor [n, seq], a list of tokenized examples (dicts with ``input_ids``, or
    lists/tensors of ids), a ``datasets.Dataset`` with an ``input_ids`` column, or any iterable
    of batches (a ``DataLoader``).

    Raises:
        InvalidParameterError: anything else, or no data.
    """
    batches: list[Batch] = []
    if isinstance(calibration, (str, bytes)):
        raise InvalidParameterError(
            f"calibration: got a {type(calibration).__name__} ({str(calibration)[:40]!r}...); "
            "pass token ids, e.g. tokenizer(texts, return_tensors='pt').input_ids "
            "(a LongTensor [n, seq]), or a datasets.Dataset with input_ids"
        )
    if isinstance(calibration, torch.Tensor):
        if calibration.dtype != torch.long or calibration.ndim != 2:
            raise InvalidParameterError(
                f"calibration: expected a LongTensor [n, seq], got {calibration.dtype} "
                f"{list(calibration.shape)}"
            )
        batches = [{"input_ids": chunk} for chunk in calibration.split(batch_size)]
    elif hasattr(calibration, "column_names"):  # a datasets.Dataset
        if "input_ids" not in calibration.column_names:
            raise InvalidParameterError(
                "calibration: the dataset has no 'input_ids' column; "
                f"it has {calibration.column_names}"
            )
        batches = [_as_batch(row) for row in calibration]
    elif isinstance(calibration, Iterable):
        batches = [_as_batch(item) for item in calibration]
    else:
        raise InvalidParameterError(
            f"calibration: expected a LongTensor [n, seq], a list of tokenized examples, a "
            f"datasets.Dataset with input_ids, or a DataLoader; got {type(calibration).__name__}"
        )
    if not batches:
        raise InvalidParameterError("calibration: no examples")
    return batches


def _as_batch(item: Any) -> Batch:
    if isinstance(item, dict) or hasattr(item, "keys"):
        if "input_ids" not in item:
            raise InvalidParameterError(
                f"calibration: an example has no 'input_ids'; keys: {sorted(item.keys())}"
            )
        ids = torch.as_tensor(item["input_ids"])
        batch = {"input_ids": ids if ids.ndim == 2 else ids.unsqueeze(0)}
        if "attention_mask" in item:
            mask = torch.as_tensor(item["attention_mask"])
            batch["attention_mask"] = mask if mask.ndim == 2 else mask.unsqueeze(0)
        return batch
    ids = torch.as_tensor(item)
    if ids.dtype not in (torch.long, torch.int, torch.int32):
        raise InvalidParameterError(f"calibration: expected token ids, got {ids.dtype}")
    return {"input_ids": (ids if ids.ndim == 2 else ids.unsqueeze(0)).long()}


def layer_stack(model: nn.Module, module_names: Iterable[str]) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` of blocks holding all of ``module_names`` (e.g. ``model.layers``).

    Raises:
        HfCompressError: no single layer stack holds them all.
    """
    names = list(module_names)
    best: tuple[str, nn.ModuleList] | None = None
    for prefix, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            inside = all(n.startswith(prefix + ".") for n in names)
            if inside and (best is None or len(prefix) > len(best[0])):
                best = (prefix, module)
    if best is None:
        raise CalibrationError(
            f"calibration: data-aware criteria need their modules inside one stack of layers "
            f"(an nn.ModuleList such as model.layers); these are not: {names[:4]}"
        )
    return best


class _StopForwardSignal(Exception):  # noqa: N818 (control flow, not an error)
    """Raised by the capture hook: the rest of the model need not run."""


def capture_inputs(model: nn.Module, first: nn.Module, batches: list[Batch]) -> list[tuple]:
    captured: list[tuple] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((args, kwargs))
        raise _StopForwardSignal

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for batch in batches:
            with torch.no_grad(), contextlib.suppress(_StopForwardSignal):
                model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)
    finally:
        handle.remove()
    return captured


def next_inputs(block: nn.Module, inputs: list[tuple]) -> list[tuple]:
    outputs = []
    with torch.no_grad():
        for args, kwargs in inputs:
            out = block(*args, **kwargs)
            hidden = out[0] if isinstance(out, (tuple, list)) else out
            if args:
                outputs.append(((hidden, *args[1:]), kwargs))
            else:
                outputs.append(((), {**kwargs, "hidden_states": hidden}))
    return outputs


def collect_stats(
    block: nn.Module, inputs: list[tuple], wanted: dict[str, bool]
) -> dict[str, InputStats]:
    """Run ``block`` on its inputs and gather :class:`InputStats` for the modules in ``wanted``.

    Args:
        block: one block of the layer stack.
        inputs: (args, kwargs) pairs, one per calibration batch.
        wanted: {module name relative to the block: whether the Gram matrix X·Xᵀ is needed}.
    """
    with recording_inputs(block, wanted) as stats, torch.no_grad():
        for args, kwargs in inputs:
            block(*args, **kwargs)
    return stats


@contextlib.contextmanager
def recording_inputs(root: nn.Module, wanted: dict[str, bool]) -> Iterator[dict[str, InputStats]]:
    """Forward pre-hooks on ``root``'s submodules ``wanted`` (name -> Gram needed) that
    accumulate their inputs' :class:`InputStats` while the context is open."""
    stats = {name: InputStats(want_gram=gram) for name, gram in wanted.items()}
    handles = [
        root.get_submodule(name).register_forward_pre_hook(
            lambda _module, args, s=stats[name]: s.add(args[0])
        )
        for name in wanted
    ]
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()


def run_layerwise(
    model: nn.Module,
    batches: list[Batch],
    stack: nn.ModuleList,
    compress_block: Callable[[int, nn.Module, list[tuple]], None],
    progress: bool = True,
    device: torch.device | str | None = None,
) -> None:
    """Run ``stack`` block by block on calibration data, each block seeing compressed inputs.

    ``compress_block(index, block, inputs)`` gathers what it needs (see :func:`collect_stats`)
    and changes the block in place; its outputs then feed the next block.

    With a compute ``device`` other than the model's (the model in CPU memory, ``device`` a
    GPU), only the block being compressed is moved there, with its inputs and statistics, and
    moved back once compressed: the device holds one block and its calibration activations,
    never the model. The embeddings run where the model is.
    """
    home = _device_of(stack[0])
    compute = home if device is None else torch.device(device)
    offload = compute != home
    was_training = model.training
    model.eval()
    try:
        inputs = capture_inputs(model, stack[0], batches)
        if offload:
            inputs = to_device(inputs, compute)
        for index, block in enumerate(_iterate(stack, progress)):
            if offload:
                block.to(compute)
            try:
                compress_block(index, block, inputs)
                if index + 1 < len(stack):
                    inputs = next_inputs(block, inputs)
            finally:
                if offload:
                    block.to(home)
    finally:
        model.train(was_training)


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` (tensors nested in tuples, lists and dicts) with every tensor on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def _device_of(module: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def _iterate(stack: nn.ModuleList, progress: bool) -> Iterator[nn.Module]:
    return iter(tqdm(stack, desc="hfcompress: calibrating", unit="block", disable=not progress))
