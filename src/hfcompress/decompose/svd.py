"""Truncated SVD factors for low-rank layers.

W ≈ U·V with U = U_r·√Σ_r: [out, r] and V = √Σ_r·V_rᵀ: [r, in] — the balanced split of
Hajimolahoseini et al. (progressive low-rank decomposition, seed 000 §4). By Eckart–Young the
truncation error is ‖W − U·V‖_F = √(Σ_{i>r} σᵢ²), the smallest any rank-r matrix achieves.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from hfcompress.errors import InvalidParameterError

SvdMethod = Literal["auto", "full", "randomized"]

# Randomized SVD is only worth its approximation on big matrices cut to a small rank. Below
# these bounds LAPACK's full SVD is fast and exact, so "auto" keeps it.
_RANDOMIZED_MIN_DIM = 4096
_RANDOMIZED_MAX_RANK_FRACTION = 0.1
_RANDOMIZED_OVERSAMPLE = 16
_RANDOMIZED_ITERS = 6


def _check_fraction(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise InvalidParameterError(f"{name}={value!r}: expected a fraction in (0, 1]")


def check_rank(rank: int, out_features: int, in_features: int) -> None:
    """Raise unless ``rank`` is an integer in [1, min(out, in)].

    Raises:
        InvalidParameterError: naming the rank, the allowed range and the weight's shape.
    """
    max_rank = min(out_features, in_features)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= max_rank:
        raise InvalidParameterError(
            f"rank={rank!r}: expected an integer in [1, min(out, in)] = [1, {max_rank}] "
            f"for a weight of shape [{out_features}, {in_features}]"
        )


def rank_for_ratio(out_features: int, in_features: int, ratio: float) -> int:
    """Largest rank whose factors keep at most ``ratio`` of the dense parameters.

    A rank-r factorization of a [out, in] matrix has r·(out + in) parameters; the result is
    clamped to [1, min(out, in)].

    Raises:
        InvalidParameterError: ``ratio`` is not in (0, 1].
    """
    _check_fraction("ratio", ratio)
    rank = math.floor(ratio * out_features * in_features / (out_features + in_features))
    return max(1, min(rank, out_features, in_features))


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest rank r whose leading singular values keep ``energy`` of Σσᵢ².

    Raises:
        InvalidParameterError: ``energy`` is not in (0, 1].
    """
    _check_fraction("energy", energy)
    sq = singular_values.double().square()
    total = sq.sum()
    if total == 0:
        return 1
    cumulative = torch.cumsum(sq, dim=0) / total
    # A tolerance keeps energy=1.0 from demanding ranks that only rounding error separates.
    rank = int(torch.searchsorted(cumulative, torch.tensor(energy - 1e-12, dtype=sq.dtype))) + 1
    return min(rank, singular_values.numel())


def resolve_rank(
    W: torch.Tensor,
    rank: int | None = None,
    *,
    ratio: float | None = None,
    energy: float | None = None,
) -> int:
    """Turn exactly one of ``rank`` / ``ratio`` / ``energy`` into a rank for W: [out, in].

    Raises:
        InvalidParameterError: none or several are given, or the value is out of range.
    """
    given = {
        k: v for k, v in {"rank": rank, "ratio": ratio, "energy": energy}.items() if v is not None
    }
    if len(given) != 1:
        raise InvalidParameterError(
            f"give exactly one of rank=, ratio=, energy=; got {sorted(given) or 'none'}"
        )
    out_features, in_features = W.shape
    if rank is not None:
        check_rank(rank, out_features, in_features)
        return rank
    if ratio is not None:
        return rank_for_ratio(out_features, in_features, ratio)
    _check_fraction("energy", energy)
    return rank_for_energy(torch.linalg.svdvals(W.detach().float()), energy)


def _use_randomized(shape: tuple[int, int], rank: int, method: SvdMethod) -> bool:
    if method == "full":
        return False
    if method == "randomized":
        return True
    small = min(shape)
    return small >= _RANDOMIZED_MIN_DIM and rank <= _RANDOMIZED_MAX_RANK_FRACTION * small


def svd_factors(
    W: torch.Tensor,
    rank: int | None = None,
    *,
    ratio: float | None = None,
    energy: float | None = None,
    method: SvdMethod = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced truncated-SVD factors of W: [out, in].

    Args:
        W: the weight, [out, in] (``nn.Linear`` layout), any float dtype and device.
        rank: the rank r to keep, in [1, min(out, in)].
        ratio: alternatively, the fraction of W's parameters the factors may keep:
            r = ⌊ratio·out·in / (out + in)⌋.
        energy: alternatively, the fraction of Σσᵢ² to retain (smallest such r).
        method: ``"full"`` is LAPACK's exact SVD (``torch.linalg.svd``). ``"randomized"`` is
            Halko et al.'s randomized range finder (``torch.svd_lowrank`` with oversampling and
            power iterations): approximate, for r ≪ min(out, in) on big matrices. ``"auto"``
            (default) picks randomized only when min(out, in) ≥ 4096 and r ≤ 0.1·min(out, in),
            where its error is negligible and its speed matters; everything else is exact.

    Returns:
        ``(U, V)`` with U = U_r·√Σ_r: [out, r] and V = √Σ_r·V_rᵀ: [r, in], in W's dtype and
        on W's device. The SVD itself runs in fp32.

    Raises:
        InvalidParameterError: W is not 2-D, or the rank selection is invalid.
    """
    if W.ndim != 2:
        raise InvalidParameterError(
            f"W: expected a 2-D weight [out, in], got shape {tuple(W.shape)}"
        )
    W32 = W.detach().float()
    if energy is not None and rank is None and ratio is None:
        # The energy rule needs the whole spectrum, so one exact SVD serves both steps.
        _check_fraction("energy", energy)
        U_full, S_full, Vh_full = torch.linalg.svd(W32, full_matrices=False)
        r = rank_for_energy(S_full, energy)
        return _balanced(U_full[:, :r], S_full[:r], Vh_full[:r], W.dtype)
    r = resolve_rank(W, rank, ratio=ratio, energy=energy)
    if _use_randomized(tuple(W.shape), r, method):
        q = min(r + _RANDOMIZED_OVERSAMPLE, min(W.shape))
        U_full, S_full, V_full = torch.svd_lowrank(W32, q=q, niter=_RANDOMIZED_ITERS)
        U_r, S_r, Vh_r = U_full[:, :r], S_full[:r], V_full[:, :r].T
    else:
        U_full, S_full, Vh_full = torch.linalg.svd(W32, full_matrices=False)
        U_r, S_r, Vh_r = U_full[:, :r], S_full[:r], Vh_full[:r]
    return _balanced(U_r, S_r, Vh_r, W.dtype)


def _balanced(
    U_r: torch.Tensor, S_r: torch.Tensor, Vh_r: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split Σ evenly: U_r·√Σ_r and √Σ_r·V_rᵀ, so neither factor carries all the scale."""
    root = S_r.sqrt()
    return (U_r * root).to(dtype).contiguous(), (root[:, None] * Vh_r).to(dtype).contiguous()


def low_rank_error(W: torch.Tensor, rank: int) -> float:
    """Eckart–Young error ‖W − W_r‖_F = √(Σ_{i>r} σᵢ²) of the best rank-r approximation."""
    s = torch.linalg.svdvals(W.detach().float()).double()
    return float(s[rank:].square().sum().sqrt())
