"""Compression in data-parallel training: DDP and FSDP2 (``torch.distributed.fsdp.fully_shard``).

Under FSDP2 every parameter is a ``DTensor`` of which each rank holds some rows (``Shard(0)``),
while buffers — a ``PrunedLinear``'s bool mask among them — stay whole on every rank. The callbacks
act on such layers through these helpers, with the result of a single-process run:

* a decision that needs a whole matrix (a magnitude threshold, an SVD) is taken on the gathered
  tensor (``DTensor.full_tensor()``), one layer at a time, identically on every rank;
* the change is written into each rank's own rows of the parameter (rank 0's result, scattered);
* a ``LowRankLinear``'s rank is lowered *in place*: DDP's buckets and FSDP's shards hold on to the
  parameter objects, so the factors keep their shapes and the dropped directions of U (columns) and
  V (rows) become exact zeros, which get exactly zero gradient and so stay zero. The zeros are cut
  out when training ends (unsharded models) or when the model is gathered for saving.

Unsharded tensors (single process, DDP) go through the same functions unchanged.
"""

from __future__ import annotations

import weakref

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from transformers import TrainingArguments

from hfcompress.decompose.patterns import UNSTRUCTURED, resolve_sparsity
from hfcompress.errors import HfCompressError
from hfcompress.layers import LowRankLinear, PrunedLinear
from hfcompress.methods.prune.layer import compute_mask

# ---- sharding ------------------------------------------------------------------------------------


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a DTensor (FSDP2, or a sharded/replicated mesh)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def shard_model(model: nn.Module, **fully_shard_kwargs: object) -> nn.Module:
    """``fully_shard`` every transformer block of a HF model, then the model itself (FSDP2).

    The blocks are the modules whose class is in ``model._no_split_modules`` (``GPT2Block``,
    ``LlamaDecoderLayer``, ...); each becomes one all-gather unit, and the root holds the rest
    (embeddings, final norm, head). Compress before sharding: ``compress_model`` needs whole
    weights. Works the same for a frozen teacher.

    Args:
        model: the model, on the device it trains on (``torch.distributed`` initialized).
        **fully_shard_kwargs: passed to every ``fully_shard`` call (``mesh``, ``mp_policy``,
            ``reshard_after_forward``, ...).

    Returns:
        ``model``, sharded in place.

    Example:
        >>> compress_model(student, recipe)
        >>> shard_model(student)
        >>> shard_model(teacher)  # or keep a whole teacher on every rank
    """
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in list(model.modules()):
        if module is not model and type(module).__name__ in blocks:
            fully_shard(module, **fully_shard_kwargs)
    fully_shard(model, **fully_shard_kwargs)
    return model


def check_supported(args: TrainingArguments, model: nn.Module, name: str) -> None:
    """Refuse the setups whose weights the callbacks cannot act on: FSDP1 and DeepSpeed.

    Raises:
        HfCompressError: naming the setup and what to use instead.
    """
    if getattr(args, "deepspeed", None):
        raise HfCompressError(
            f"{name}: DeepSpeed is not supported (ZeRO-3 flattens each weight into partitions, "
            "and ZeRO-1/2 keep fp32 master weights that overwrite a mask's zeros at the next "
            "step); "
            "use DDP, or FSDP2: fsdp='full_shard' (fsdp_config version 2) or "
            "hfcompress.training.shard_model"
        )
    fsdp_version = int((getattr(args, "fsdp_config", None) or {}).get("version", 2))
    if getattr(args, "fsdp", None) and fsdp_version != 2:
        raise HfCompressError(
            f"{name}: FSDP version {fsdp_version} is not supported (its flat parameters hide "
            "the weight matrices); use fsdp_config={'version': 2}"
        )
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise HfCompressError(
            f"{name}: FullyShardedDataParallel (FSDP1) is not supported; shard with "
            "torch.distributed.fsdp.fully_shard (FSDP2) or hfcompress.training.shard_model"
        )


def fsdp_modules(model: nn.Module) -> list[FSDPModule]:
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


# ---- whole tensors and each rank's part ----------------------------------------------------------


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (gathered from the shards: a collective call for a DTensor)."""
    tensor = tensor.detach()
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``tensor``: a view, so writing into it writes the parameter."""
    tensor = tensor.detach()
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def local_part(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The entries of ``full`` (the whole of a tensor shaped like ``like``) this rank holds."""
    if not isinstance(like, DTensor):
        return full
    part = distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)
    return part.to_local().to(like.to_local().device)


@torch.no_grad()
def write_full_(param: torch.Tensor, full: torch.Tensor) -> None:
    """Set ``param`` to ``full`` (its whole value), rank 0's ``full`` on every rank.

    A DTensor receives its rows of rank 0's tensor; a replicated tensor under DDP receives rank
    0's by broadcast, so every rank ends bit-identical even if the computation was not.
    """
    if isinstance(param, DTensor):
        local = param.to_local()
        full = full.to(device=local.device, dtype=local.dtype)
        part = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=0)
        local.copy_(part.to_local())
        return
    full = full.to(device=param.device, dtype=param.dtype).contiguous()
    if world_size() > 1:
        dist.broadcast(full, src=0)
    param.detach().copy_(full)


# ---- pruning -------------------------------------------------------------------------------------


@torch.no_grad()
def next_mask(layer: PrunedLinear, sparsity: float) -> tuple[float, torch.Tensor]:
    """``layer.next_mask(sparsity)`` computed on the whole weight: the same mask on every rank.

    The magnitude threshold (or the N:M choice) is taken over the gathered W: [out, in], so a
    sharded layer gets exactly the mask the unsharded run computes.
    """
    if not isinstance(layer.weight, DTensor):
        return layer.next_mask(sparsity)
    if layer.pattern == UNSTRUCTURED and sparsity is not None:
        sparsity = resolve_sparsity(layer.pattern, sparsity)
    else:
        sparsity = layer.sparsity
    weight = full_tensor(layer.weight)
    return sparsity, compute_mask(weight * layer.mask.to(weight.device), layer.pattern, sparsity)


@torch.no_grad()
def set_mask_(layer: PrunedLinear, sparsity: float, mask: torch.Tensor) -> None:
    """``layer.set_mask_`` for a sharded layer too: install the (whole) mask, zero what it drops."""
    if not isinstance(layer.weight, DTensor):
        layer.set_mask_(sparsity, mask)
        return
    layer.sparsity = sparsity
    layer.mask.copy_(mask)
    apply_mask_(layer)


@torch.no_grad()
def apply_mask_(layer: PrunedLinear) -> None:
    """Zero the masked weights, each rank in its own rows (``layer.apply_mask_`` when unsharded)."""
    if not isinstance(layer.weight, DTensor):
        layer.apply_mask_()
        return
    local_tensor(layer.weight).mul_(local_part(layer.mask, layer.weight))


# ---- low rank ------------------------------------------------------------------------------------

# The rank each LowRankLinear trains at when its factors carry zero directions (distributed runs).
_ACTIVE_RANKS: weakref.WeakKeyDictionary[LowRankLinear, int] = weakref.WeakKeyDictionary()


def effective_rank(layer: LowRankLinear) -> int:
    """The rank a layer computes with: its factors' size, less the zeroed directions."""
    return min(layer.rank, _ACTIVE_RANKS.get(layer, layer.rank))


def _live(U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """bool [r]: direction i of U: [out, r], V: [r, in] contributes U[:, i]·V[i, :] ≠ 0."""
    live = (U != 0).any(0) & (V != 0).any(1)
    live[0] |= not live.any()  # a rank of at least 1
    return live


def register_active_rank(layer: LowRankLinear, rank: int | None = None) -> int:
    """Remember the rank ``layer`` trains at; by default count its live directions (a collective
    call if sharded), as after resuming from a checkpoint whose factors carry zeros."""
    if rank is None:
        rank = int(_live(full_tensor(layer.u.weight), full_tensor(layer.v.weight)).sum())
    _ACTIVE_RANKS[layer] = rank
    return rank


def _check_plain_factors(layer: LowRankLinear) -> None:
    if not (type(layer.u) is nn.Linear and type(layer.v) is nn.Linear):
        raise HfCompressError(
            f"rank reduction: the factors are {type(layer.u).__name__}/"
            f"{type(layer.v).__name__}; only plain nn.Linear factors can be re-factored"
        )


@torch.no_grad()
def truncate_in_place_(layer: LowRankLinear, new_rank: int) -> None:
    """Lower ``layer``'s rank to ``new_rank``, keeping its parameter objects and shapes.

    The best rank-``new_rank`` approximation of the current U·V (``LowRankLinear.truncate`` of
    the gathered live directions) fills the first ``new_rank`` columns of U: [out, r] and rows of
    V: [r, in]; the rest become exact zeros. Rank 0's result is written on every rank.
    """
    _check_plain_factors(layer)
    U, V = full_tensor(layer.u.weight), full_tensor(layer.v.weight)
    live = _live(U, V)
    current = LowRankLinear.from_factors(U[:, live].float(), V[live].float(), None)
    current.truncate(min(new_rank, current.rank))
    rank = current.rank
    new_u, new_v = torch.zeros_like(U), torch.zeros_like(V)
    new_u[:, :rank] = current.u.weight
    new_v[:rank] = current.v.weight
    write_full_(layer.u.weight, new_u)
    write_full_(layer.v.weight, new_v)
    _ACTIVE_RANKS[layer] = rank


@torch.no_grad()
def drop_zero_directions_(layer: LowRankLinear) -> None:
    """Cut the zero directions out of an unsharded layer's factors: same product, fewer params.

    The factors are replaced by smaller ones (``resize_rank_``) holding exactly the live columns
    of U and rows of V, so outputs are bit-identical. For when training is over: an optimizer or
    a DDP wrapper holding the old parameters is not updated.
    """
    if isinstance(layer.u.weight, DTensor):
        raise HfCompressError(
            "drop_zero_directions_: the layer is sharded; gather the model first "
            "(hfcompress.training.gather_full_model)"
        )
    _ACTIVE_RANKS.pop(layer, None)
    if type(layer.u) is not nn.Linear or type(layer.v) is not nn.Linear:
        return  # compressed factors are never truncated in place, so they carry no zeros
    old_u, old_v = layer.u, layer.v
    live = _live(old_u.weight, old_v.weight)
    if bool(live.all()):
        return
    layer.resize_rank_(int(live.sum()))
    layer.u.weight.copy_(old_u.weight[:, live])
    layer.v.weight.copy_(old_v.weight[live])
    if old_u.bias is not None:
        layer.u.bias.copy_(old_u.bias)
    layer.u.requires_grad_(old_u.weight.requires_grad)
    layer.v.requires_grad_(old_v.weight.requires_grad)


def pop_optimizer_state(
    optimizer: torch.optim.Optimizer | None, params: list[torch.Tensor]
) -> dict[torch.Tensor, dict]:
    """Forget the optimizer state of ``params`` (it restarts at the next step, as for new
    parameters); returns what was removed, for an undo."""
    if optimizer is None:
        return {}
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
    return {p: inner.state.pop(p) for p in params if p in inner.state}


def restore_optimizer_state(
    optimizer: torch.optim.Optimizer | None, states: dict[torch.Tensor, dict]
) -> None:
    if optimizer is not None:
        getattr(optimizer, "optimizer", optimizer).state.update(states)
