"""hfcompress checkpoints of FSDP2-sharded models: gathered to one file set, and loaded back.

Every function here is a collective call: all ranks must call it, in the same order.

* :func:`gather_full_model` gathers the whole state (``get_model_state_dict`` with
  ``full_state_dict=True, cpu_offload=True``) and rebuilds, on rank 0 and on the CPU, an
  unsharded model of the same architecture and hfcompress structure holding it; saving that
  model is an ordinary hfcompress checkpoint (``from_pretrained`` reloads it, in one process).
* :func:`load_into_sharded` reads such a checkpoint on rank 0 (``from_pretrained``) and sends
  each tensor to every rank, which keeps its own rows: the masks, ranks and weights come back.
* :func:`save_optimizer` / :func:`load_optimizer` do the same for the optimizer state, keyed by
  parameter name (``get_optimizer_state_dict`` / ``set_optimizer_state_dict``).
"""

from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from hfcompress.errors import HfCompressError
from hfcompress.layers import CompressedLayer, LowRankLinear, layer_from_spec
from hfcompress.surgery import record_compression
from hfcompress.training.distributed import drop_zero_directions_, local_part, local_tensor

_FULL_TO_CPU = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def unsharded_class(model: nn.Module) -> type[nn.Module]:
    """The model's own class: ``fully_shard`` swaps in a subclass of it and ``FSDPModule``."""
    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def _skeleton(model: nn.Module) -> nn.Module:
    """A meta-device model of ``model``'s architecture holding the same hfcompress layers."""
    with torch.device("meta"):
        plain = unsharded_class(model)(copy.deepcopy(model.config))
    inside: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, CompressedLayer) and not any(
            name.startswith(p + ".") for p in inside
        ):
            inside.add(name)
            plain.set_submodule(name, layer_from_spec(module.to_spec(), device="meta"))
    return plain


def gather_full_model(model: nn.Module, *, drop_zero_directions: bool = True) -> nn.Module | None:
    """An unsharded CPU copy of a (FSDP2-)sharded model on rank 0; ``None`` on the other ranks.

    Collective: every rank must call it. Rank 0 holds the whole state on the CPU (the other
    ranks hold nothing extra). With ``drop_zero_directions`` the low-rank factors lose the
    directions a distributed ``ProgressiveRankCallback`` zeroed, so the copy has the scheduled
    ranks; its outputs are identical either way.

    Raises:
        HfCompressError: the model's state does not fill the rebuilt structure.

    Example:
        >>> full = gather_full_model(student)
        >>> if full is not None:
        ...     full.save_pretrained("student")
    """
    state = get_model_state_dict(model, options=_FULL_TO_CPU)
    if _rank() != 0:
        return None
    plain = _skeleton(model)
    plain.load_state_dict(state, assign=True)
    # non-persistent buffers (rotary frequencies, ...) are whole on every rank
    for name, buffer in model.named_buffers():
        if name not in state:
            owner, _, leaf = name.rpartition(".")
            module = plain.get_submodule(owner) if owner else plain
            module.register_buffer(leaf, buffer.detach().cpu().clone(), persistent=False)
    if hasattr(plain, "tie_weights"):
        plain.tie_weights()
    left = [n for n, t in [*plain.named_parameters(), *plain.named_buffers()] if t.is_meta]
    if left:
        raise HfCompressError(f"gather_full_model: no gathered value for {left[:5]}")
    if drop_zero_directions:
        for layer in plain.modules():
            if isinstance(layer, LowRankLinear):
                drop_zero_directions_(layer)
    record_compression(plain)
    return plain.train(model.training)


def save_full_checkpoint(
    model: nn.Module, output_dir: str, *, drop_zero_directions: bool = True
) -> nn.Module | None:
    """Gather ``model`` and save it on rank 0 as an hfcompress checkpoint; collective.

    Returns the gathered copy on rank 0 (``None`` elsewhere).
    """
    plain = gather_full_model(model, drop_zero_directions=drop_zero_directions)
    if plain is not None:
        plain.save_pretrained(output_dir)
    if dist.is_initialized():
        dist.barrier()
    return plain


def _comm_device(tensor: torch.Tensor) -> torch.device:
    if isinstance(tensor, DTensor):
        return torch.device(tensor.device_mesh.device_type)
    return tensor.device


@torch.no_grad()
def load_into_sharded(model: nn.Module, checkpoint_dir: str) -> None:
    """Load an hfcompress checkpoint into a sharded model of the same structure; collective.

    Rank 0 reads it with ``from_pretrained`` (the on-disk forms decoded, the digests checked);
    each tensor is then broadcast, one at a time, and every rank writes the part it holds.

    Raises:
        HfCompressError: on every rank, if a tensor is missing or has another shape.
    """
    live = model.state_dict()
    full: dict[str, torch.Tensor] = {}
    problem = None
    if _rank() == 0:
        loaded = unsharded_class(model).from_pretrained(checkpoint_dir, dtype="auto")
        full = loaded.state_dict()
        for name, target in live.items():
            if name not in full:
                problem = f"{checkpoint_dir}: no tensor {name!r}"
            elif tuple(full[name].shape) != tuple(target.shape):
                problem = (
                    f"{checkpoint_dir}: {name!r} is {list(full[name].shape)}, the model's "
                    f"{list(target.shape)}; resume with the structure the run was saved with"
                )
            if problem:
                break
    message = [problem]
    if dist.is_initialized():
        dist.broadcast_object_list(message, src=0)
    if message[0]:
        raise HfCompressError(f"load_into_sharded: {message[0]}")
    for name, target in live.items():
        device = _comm_device(target)
        if _rank() == 0:
            value = full[name].to(device=device, dtype=target.dtype).contiguous()
        else:
            value = torch.empty(target.shape, dtype=target.dtype, device=device)
        if dist.is_initialized():
            dist.broadcast(value, src=0)
        local_tensor(target).copy_(local_part(value, target))


def _inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer


def save_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, path: str) -> None:
    """Save the whole optimizer state (keyed by parameter name) on rank 0; collective."""
    state = get_optimizer_state_dict(model, _inner(optimizer), options=_FULL_TO_CPU)
    if _rank() == 0:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        torch.save(state, path)


def load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, path: str) -> None:
    """Load :func:`save_optimizer`'s file: read on rank 0, sent to every rank's shards."""
    state = torch.load(path, map_location="cpu", weights_only=True) if _rank() == 0 else {}
    set_optimizer_state_dict(
        model,
        _inner(optimizer),
        state,
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
    )
