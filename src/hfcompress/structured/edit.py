"""Smaller copies of dense Linear / GPT-2 Conv1D modules: kept output rows or input columns.

Every function returns a new plain module (never a view of the old one's storage), on the old
module's device and dtype, with ``requires_grad`` as before. ``W`` is always the logical
weight [out, in] (a Conv1D stores its transpose).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from hfcompress.errors import InvalidParameterError

Dense = nn.Linear | Conv1D


def is_dense(module: nn.Module) -> bool:
    """A plain ``nn.Linear`` or GPT-2 ``Conv1D`` (not an hfcompress layer)."""
    return type(module) in (nn.Linear, Conv1D) or (
        isinstance(module, (nn.Linear, Conv1D)) and not hasattr(module, "to_spec")
    )


def dense_weight(module: Dense) -> torch.Tensor:
    """The logical weight W [out, in] (a view)."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def new_dense_like(
    module: Dense, weight: torch.Tensor, bias: torch.Tensor | None
) -> nn.Linear | Conv1D:
    """A module of ``module``'s class holding ``weight`` [out, in] and ``bias`` [out] (copied)."""
    out_features, in_features = weight.shape
    old = module.weight
    if isinstance(module, Conv1D):
        new: nn.Module = Conv1D(nf=out_features, nx=in_features)
        new = new.to(device=old.device, dtype=old.dtype)
        with torch.no_grad():
            new.weight.copy_(weight.T)
            if bias is None:
                new.bias.zero_()
            else:
                new.bias.copy_(bias)
    else:
        new = nn.Linear(
            in_features, out_features, bias=bias is not None, device=old.device, dtype=old.dtype
        )
        with torch.no_grad():
            new.weight.copy_(weight)
            if bias is not None:
                new.bias.copy_(bias)
    new.train(module.training)
    for parameter in new.parameters():
        parameter.requires_grad_(old.requires_grad)
    return new


def _check_index(index: torch.Tensor, size: int, what: str) -> torch.Tensor:
    index = torch.as_tensor(index, dtype=torch.long).flatten()
    if index.numel() == 0:
        raise InvalidParameterError(f"{what}: keeps nothing")
    if int(index.min()) < 0 or int(index.max()) >= size:
        raise InvalidParameterError(f"{what}: index out of range [0, {size})")
    return index


def select_outputs(module: Dense, index: torch.Tensor) -> nn.Linear | Conv1D:
    """A copy keeping only output features ``index`` (rows of W, entries of the bias)."""
    W = dense_weight(module)
    index = _check_index(index, W.shape[0], "select_outputs").to(W.device)
    bias = None if module.bias is None else module.bias.detach()[index]
    return new_dense_like(module, W.detach()[index], bias)


def select_inputs(
    module: Dense, index: torch.Tensor, weight: torch.Tensor | None = None
) -> nn.Linear | Conv1D:
    """A copy keeping only input features ``index`` (columns of W); the bias is kept.

    Args:
        weight: the new W [out, len(index)] instead of ``W[:, index]`` (a refit).
    """
    W = dense_weight(module)
    index = _check_index(index, W.shape[1], "select_inputs").to(W.device)
    new_weight = W.detach()[:, index] if weight is None else weight.to(W.dtype)
    bias = None if module.bias is None else module.bias.detach()
    return new_dense_like(module, new_weight, bias)
