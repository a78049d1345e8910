"""What the structured methods share to compensate a removal: least-squares refits of the
consuming Linear, their output error, and loss gradients for first-order (Taylor) importance.

FLAP (An et al. 2024) and ZipLM (Kurtic et al. 2023): after removing inputs of a Linear (MLP
channels for ``width``, attention heads for ``heads``), refit it on the kept inputs'
calibration statistics, W' = argmin ‖W x + b − (W' x_K + b')‖² — a ridge-regularized normal
equation solved by Cholesky.
"""

from __future__ import annotations

import torch
from torch import nn

from hfcompress.errors import InvalidParameterError
from hfcompress.stats import InputStats
from hfcompress.structured.edit import Dense, dense_weight, select_inputs
from hfcompress.structured.model import model_batches

__all__ = [
    "loss_gradients",
    "refit_consumer",
    "refit_output_error",
    "ridge_solve",
    "shrink_consumer",
]


def loss_gradients(
    model: nn.Module, names: list[str], batches: list[dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Σ over calibration batches of ∂L/∂W (logical [out, in]) and ∂L/∂b for modules ``names``,
    L the language-model loss (labels = input_ids). Other parameters get no gradient."""
    modules = {n: model.get_submodule(n) for n in names}
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    grads: dict[str, torch.Tensor] = {}
    try:
        model.eval()
        for parameter in flags:
            parameter.requires_grad_(False)
        for module in modules.values():
            for parameter in module.parameters():
                parameter.requires_grad_(True)
                parameter.grad = None
        device = next(model.parameters()).device
        for batch in model_batches(model, batches):
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.get("decoder_input_ids", batch["input_ids"])
            with torch.enable_grad():
                output = model(**batch, labels=labels, use_cache=False)
            if getattr(output, "loss", None) is None:
                raise InvalidParameterError(
                    "criterion: 'taylor' needs a model with a language-model head "
                    f"(forward(labels=input_ids) returning a loss); {type(model).__name__} "
                    "returned none"
                )
            output.loss.backward()
        for name, module in modules.items():
            weight = module.weight.grad
            grads[name] = (
                weight.T if weight.shape != dense_weight(module).shape else weight
            ).float()
            if module.bias is not None and module.bias.grad is not None:
                grads[f"{name}.bias"] = module.bias.grad.float()
    finally:
        for module in modules.values():
            for parameter in module.parameters():
                parameter.grad = None
        for parameter, flag in flags.items():
            parameter.requires_grad_(flag)
        model.train(was_training)
    return grads


def refit_consumer(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stats: InputStats,
    keep: torch.Tensor,
    damping: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The least-squares W' [out, |K|] (and b') reproducing W·x + b from the kept inputs x_K.

    Args:
        weight: W [out, in]; bias: b [out] or None (then no constant term is fitted).
        stats: the inputs' statistics with the Gram matrix (``gram``, ``total``, ``count``).
        keep: the kept input indices K.
        damping: ridge λ relative to mean(diag G_KK).

    Returns:
        W' in ``weight``'s dtype and b' (None without a bias).
    """
    G = stats.gram.double().to(weight.device)
    W = weight.detach().double()
    K = keep.to(weight.device)
    cross = W @ G[:, K]  # [out, |K|]: Σ y·x_Kᵀ without the bias part
    gram = G[K][:, K]
    if bias is not None:
        s = stats.total.double().to(weight.device)
        b = bias.detach().double()
        n = float(stats.count)
        cross = torch.cat([cross + torch.outer(b, s[K]), (W @ s + n * b).unsqueeze(1)], dim=1)
        gram = torch.cat(
            [torch.cat([gram, s[K].unsqueeze(1)], 1), torch.cat([s[K], s.new_tensor([n])])[None]],
            0,
        )
    size = len(K)
    ridge = damping * float(gram.diagonal()[:size].mean().clamp_min(1e-12))
    solution = ridge_solve(gram, cross, ridge, size)
    new_weight = solution[:, :size].to(weight.dtype)
    new_bias = None if bias is None else solution[:, size].to(bias.dtype)
    return new_weight, new_bias


def ridge_solve(gram: torch.Tensor, cross: torch.Tensor, ridge: float, size: int) -> torch.Tensor:
    """cross · (gram + ridge·I_size)⁻¹ by Cholesky; the ridge grows until the factor exists."""
    eye = torch.zeros_like(gram)
    eye.diagonal()[:size] = 1.0
    scale = float(gram.diagonal()[:size].mean().clamp_min(1e-12))
    for attempt in range(8):
        factor, info = torch.linalg.cholesky_ex(gram + ridge * eye)
        if int(info) == 0:
            return torch.cholesky_solve(cross.T, factor).T
        ridge = max(ridge * 10, scale * 1e-8 * 10**attempt)
    raise InvalidParameterError(
        "refit: the kept channels' Gram matrix is not positive definite even with a ridge of "
        f"{ridge:.3g}; set refit: false or give more calibration data"
    )


def refit_output_error(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    new_weight: torch.Tensor,
    new_bias: torch.Tensor | None,
    keep: torch.Tensor,
    stats: InputStats,
) -> float:
    """‖(W x + b) − (W' x_K + b')‖ / ‖W x + b‖ over the calibration inputs, from their Gram."""
    device = weight.device
    G = stats.gram.float().to(device)
    s = stats.total.float().to(device)
    n = float(stats.count)
    old_w = weight.detach().float()
    delta = old_w.clone()
    delta[:, keep.to(device)] -= new_weight.float()
    b_old = torch.zeros(old_w.shape[0], device=device) if bias is None else bias.detach().float()
    b_new = torch.zeros_like(b_old) if new_bias is None else new_bias.detach().float()
    d_b = b_old - b_new

    def energy(D: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return ((D @ G) * D).sum() + 2 * (D @ s * c).sum() + n * c.square().sum()

    return float(
        energy(delta, d_b).clamp_min(0).sqrt() / energy(old_w, b_old).clamp_min(1e-30).sqrt()
    )


def shrink_consumer(
    consumer: Dense, keep: torch.Tensor, refit: tuple[InputStats, float] | None
) -> tuple[nn.Module, float | None]:
    """The consuming Linear/Conv1D restricted to its inputs ``keep``, refit or not.

    Args:
        consumer: the module reading the removed channels (down_proj, o_proj), [out, in].
        keep: the kept input indices K.
        refit: (its inputs' statistics with the Gram matrix, ridge damping) to refit the
            weight (and bias) by least squares on x_K; None keeps the columns as they are.

    Returns:
        The new module [out, |K|] and, with a refit, its relative output error on the
        calibration inputs (else None).
    """
    if refit is None:
        return select_inputs(consumer, keep), None
    stats, damping = refit
    W = dense_weight(consumer)
    new_weight, new_bias = refit_consumer(W, consumer.bias, stats, keep, damping)
    new = select_inputs(consumer, keep, weight=new_weight)
    if new_bias is not None:
        with torch.no_grad():
            new.bias.copy_(new_bias)
    return new, refit_output_error(W, consumer.bias, new_weight, new_bias, keep, stats)
