"""Asymmetric calibration: fit a layer to the *dense* model's outputs from its compressed inputs.

Layer-by-layer compression feeds layer ℓ the inputs X̃: [in, N] produced by the already
compressed layers before it, while the dense model fed it X. The symmetric objective
‖(W − Ŵ)·X̃‖_F (SparseGPT, SVD-LLM) reproduces W·X̃, i.e. it faithfully passes on the upstream
error. The asymmetric one, ‖W·X − Ŵ·X̃‖_F, asks the layer to undo that error as far as X̃ allows
(GPTAQ, Li et al. 2025, "GPTAQ: Efficient Finetuning-Free Quantization for Asymmetric
Calibration", for quantization; the same algebra serves pruning and low rank).

With H̃ = X̃·X̃ᵀ and T the least-squares solution of T·X̃ ≈ W·X, the residual of T is orthogonal to
X̃'s rows, so for every Ŵ

    ‖W·X − Ŵ·X̃‖² = ‖W·X − T·X̃‖² + ‖(T − Ŵ)·X̃‖²,

and the asymmetric problem is the symmetric one with W replaced by T and the Hessian H̃: every
Gram-based method (SparseGPT's OBS updates, SVD-LLM's whitened truncation) runs unchanged on T.
"""

from __future__ import annotations

import torch

from hfcompress.errors import InvalidParameterError


def dense_output_target(
    W: torch.Tensor, H: torch.Tensor, shift: torch.Tensor, percdamp: float = 0.01
) -> torch.Tensor:
    """The weight T that best maps the compressed inputs X̃ to the dense outputs W·X.

    T = W + W·D·(H + λI)⁻¹ with D = Σ_tokens (x − x̃)·x̃ᵀ = X·X̃ᵀ − H: the ridge regression of the
    output shift W·(X − X̃) on X̃, penalizing ‖T − W‖ rather than ‖T‖, so that T = W exactly when the
    inputs did not change (D = 0) whatever λ. With λ = 0 it is the least-squares solution.

    Args:
        W: [out, in] weight, any float dtype and device.
        H: [in, in], X̃·X̃ᵀ summed over the calibration tokens (compressed inputs).
        shift: [in, in], D = Σ_tokens (x − x̃)·x̃ᵀ, x the dense model's input of the same token.
        percdamp: λ = percdamp·mean(diag(H)), as SparseGPT dampens its Hessian.

    Returns:
        T: [out, in], fp32, on W's device (the methods that take it compute in fp32 anyway).

    Raises:
        InvalidParameterError: shapes that do not match W, a negative ``percdamp``, or an H that
            is not positive definite after dampening.
    """
    out_features, in_features = W.shape
    for name, matrix in (("H", H), ("shift", shift)):
        if tuple(matrix.shape) != (in_features, in_features):
            raise InvalidParameterError(
                f"{name}: expected [{in_features}, {in_features}] for W: [{out_features}, "
                f"{in_features}], got {list(matrix.shape)}"
            )
    if percdamp < 0:
        raise InvalidParameterError(f"percdamp: expected >= 0, got {percdamp!r}")
    W32 = W.detach().float()
    H32 = H.to(W.device, torch.float32)
    damped = H32 + percdamp * H32.diagonal().mean() * torch.eye(in_features, device=W.device)
    L, info = torch.linalg.cholesky_ex(damped)
    if int(info) != 0:
        raise InvalidParameterError(
            f"H: not positive definite after dampening with percdamp={percdamp!r}; expected "
            "X̃·X̃ᵀ of the calibration inputs, or a larger percdamp"
        )
    # (W·D)·(H + λI)⁻¹, H symmetric: solve (H + λI)·Zᵀ = (W·D)ᵀ.
    correction = torch.cholesky_solve((W32 @ shift.to(W.device, torch.float32)).T, L).T
    return W32 + correction
