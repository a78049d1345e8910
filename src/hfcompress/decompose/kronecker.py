"""Nearest sums of Kronecker products (Van Loan & Pitsianis, 1993).

W: [m, n] with m = m1·m2 and n = n1·n2 is approximated by Σₖ Aₖ ⊗ Bₖ, Aₖ: [m1, n1],
Bₖ: [m2, n2]. The rearrangement R(W): [m1·n1, m2·n2] maps every Kronecker product A ⊗ B to the
rank-one matrix vec(A)·vec(B)ᵀ and preserves the Frobenius norm, so the best k-term sum is the
best rank-k approximation of R(W): a top-k SVD. KronyPT (seed 004) tabulates the factor shapes
of GPT-2's MLP weights with their parameter counts and maximal ranks, as ``kronecker_shapes``
does here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hfcompress.errors import InvalidParameterError


@dataclass(frozen=True)
class KroneckerShape:
    """One way to factor an [out, in] matrix as A ⊗ B.

    Attributes:
        a_shape: (m1, n1), the shape of A.
        b_shape: (m2, n2), the shape of B, with m1·m2 = out and n1·n2 = in.
        params: parameters of one term, m1·n1 + m2·n2.
        max_rank: the largest rank one term can have, min(m1, n1)·min(m2, n2), since
            rank(A ⊗ B) = rank(A)·rank(B).
    """

    a_shape: tuple[int, int]
    b_shape: tuple[int, int]
    params: int
    max_rank: int


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, int(n**0.5) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def kronecker_shapes(out_features: int, in_features: int) -> list[KroneckerShape]:
    """Every factor shape for an [out, in] weight, fewest parameters first.

    Example:
        >>> s = [k for k in kronecker_shapes(3072, 768) if k.a_shape == (768, 768)][0]
        >>> s.b_shape, s.params, s.max_rank
        ((4, 1), 589828, 768)
    """
    if out_features < 1 or in_features < 1:
        raise InvalidParameterError(
            f"shape=({out_features}, {in_features}): expected positive dimensions"
        )
    shapes = []
    for m1 in _divisors(out_features):
        for n1 in _divisors(in_features):
            m2, n2 = out_features // m1, in_features // n1
            shapes.append(
                KroneckerShape(
                    a_shape=(m1, n1),
                    b_shape=(m2, n2),
                    params=m1 * n1 + m2 * n2,
                    max_rank=min(m1, n1) * min(m2, n2),
                )
            )
    return sorted(shapes, key=lambda s: (s.params, -s.max_rank, s.a_shape))


def b_shape_for(weight_shape: tuple[int, int], a_shape: tuple[int, int]) -> tuple[int, int]:
    """B's shape (m2, n2) for W: [m, n] and A: (m1, n1).

    Raises:
        InvalidParameterError: ``a_shape`` does not divide the weight's shape.
    """
    m, n = weight_shape
    if (
        len(a_shape) != 2
        or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in a_shape)
        or m % a_shape[0]
        or n % a_shape[1]
    ):
        raise InvalidParameterError(
            f"a_shape={tuple(a_shape)!r}: expected two positive integers (m1, n1) dividing the "
            f"weight shape [out, in] = [{m}, {n}] (m1 | {m}, n1 | {n})"
        )
    return m // a_shape[0], n // a_shape[1]


def kron_rearrange(W: torch.Tensor, a_shape: tuple[int, int]) -> torch.Tensor:
    """Van Loan's rearrangement R(W): [m1·n1, m2·n2] of W: [m1·m2, n1·n2].

    R[i1·n1 + j1, i2·n2 + j2] = W[i1·m2 + i2, j1·n2 + j2], so R(A ⊗ B) = vec(A)·vec(B)ᵀ with
    row-major vec.
    """
    m1, n1 = a_shape
    m2, n2 = b_shape_for(tuple(W.shape), a_shape)
    return W.reshape(m1, m2, n1, n2).permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)


def kronecker_sum(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Σₖ Aₖ ⊗ Bₖ as a dense [m1·m2, n1·n2] matrix, for A: [k, m1, n1], B: [k, m2, n2].

    For checks and ``to_dense``; the layer's forward never calls this.
    """
    _, m1, n1 = A.shape
    _, m2, n2 = B.shape
    # (A ⊗ B)[i1·m2 + i2, j1·n2 + j2] = A[i1, j1]·B[i2, j2], summed over terms.
    return torch.einsum("kac,kbd->abcd", A, B).reshape(m1 * m2, n1 * n2)


def nearest_kronecker(
    W: torch.Tensor, a_shape: tuple[int, int], terms: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors minimizing ‖W − Σₖ Aₖ ⊗ Bₖ‖_F (Van Loan & Pitsianis, 1993).

    Args:
        W: [m, n] weight (``nn.Linear`` layout), any float dtype and device.
        a_shape: (m1, n1) with m1 | m and n1 | n; B's shape is (m / m1, n / n1).
        terms: number of Kronecker terms k, in [1, min(m1·n1, m2·n2)].

    Returns:
        ``(A, B)`` with A: [k, m1, n1] and B: [k, m2, n2], in W's dtype. The top-k SVD of R(W)
        runs in fp32 and its singular values are split evenly, Aₖ = √σₖ·uₖ and Bₖ = √σₖ·vₖ, so
        both factors have comparable scale for training. The error equals √(Σ_{i>k} σᵢ(R(W))²).

    Raises:
        InvalidParameterError: ``a_shape`` does not divide W's shape, or ``terms`` is out of range.
    """
    if W.ndim != 2:
        raise InvalidParameterError(
            f"W: expected a 2-D weight [out, in], got shape {tuple(W.shape)}"
        )
    m1, n1 = a_shape
    m2, n2 = b_shape_for(tuple(W.shape), a_shape)
    max_terms = min(m1 * n1, m2 * n2)
    if isinstance(terms, bool) or not isinstance(terms, int) or not 1 <= terms <= max_terms:
        raise InvalidParameterError(
            f"terms={terms!r}: expected an integer in [1, min(m1·n1, m2·n2)] = [1, {max_terms}] "
            f"for a_shape={tuple(a_shape)} and b_shape={(m2, n2)}"
        )
    R = kron_rearrange(W.detach().float(), (m1, n1))
    U, S, Vh = torch.linalg.svd(R, full_matrices=False)
    root = S[:terms].sqrt()
    A = (U[:, :terms] * root).T.reshape(terms, m1, n1)
    B = (root[:, None] * Vh[:terms]).reshape(terms, m2, n2)
    return A.to(W.dtype).contiguous(), B.to(W.dtype).contiguous()


def kronecker_error(W: torch.Tensor, a_shape: tuple[int, int], terms: int = 1) -> float:
    """‖W − Σₖ Aₖ ⊗ Bₖ‖_F of the optimal k-term approximation: √(Σ_{i>k} σᵢ(R(W))²)."""
    s = torch.linalg.svdvals(kron_rearrange(W.detach().float(), a_shape)).double()
    return float(s[terms:].square().sum().sqrt())
