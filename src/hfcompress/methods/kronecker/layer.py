"""``KroneckerLinear``: W ≈ Σₖ Aₖ ⊗ Bₖ, applied without ever building W.

Kronecker decomposition of transformer weights (KroneckerBERT, Tahaei et al. 2022; KnGPT-2,
Edalati et al. 2021; KronyPT, seed 004), initialized by Van Loan's nearest Kronecker product.

For x: [n] viewed as X: [n1, n2] (row-major), (A ⊗ B)·x is A·X·Bᵀ viewed as [m1·m2]. The two
matrix products can be taken in either order, and the factor shapes decide which is cheap: with
A: (768, 768) and B: (4, 1), applying A first costs 768·768·(1) + 768·4 per token while B first
costs 768·4 + 768·768·4, four times more. ``forward`` picks the order with fewer multiply-adds.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from hfcompress.decompose.kronecker import b_shape_for, kronecker_sum, nearest_kronecker
from hfcompress.errors import InvalidParameterError
from hfcompress.formats import drop_marker
from hfcompress.layers.base import (
    CompressedLayer,
    LazyWeight,
    SourceKind,
    StoredTensor,
    dense_weight_of,
    source_kind,
)
from hfcompress.methods.kronecker import format as disk

ContractionOrder = Literal["a_first", "b_first"]


def contraction_costs(
    a_shape: tuple[int, int], b_shape: tuple[int, int], terms: int
) -> dict[ContractionOrder, int]:
    """Multiply-adds per token of each contraction order, for k = ``terms``.

    a_first: X·Aᵀ over n1, then B over n2:  k·m1·n2·(n1 + m2).
    b_first: X·Bᵀ over n2, then A over n1:  k·n1·m2·(n2 + m1).
    """
    (m1, n1), (m2, n2) = a_shape, b_shape
    return {
        "a_first": terms * m1 * n2 * (n1 + m2),
        "b_first": terms * n1 * m2 * (n2 + m1),
    }


def _apply_a_first(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Y: [N, m1·m2] for x: [N, n1·n2], contracting A first (shapes as in KroneckerLinear).

    Y[b, i1, i2] = Σₖ Σ_j2 (Σ_j1 Aₖ[i1, j1]·X[b, j1, j2])·Bₖ[i2, j2]. The output is the largest
    tensor here, so the bias is fused into the last product instead of a separate pass.
    """
    k, m1, n1 = A.shape
    _, m2, n2 = B.shape
    N = x.shape[0]
    X = x.view(N, n1, n2).transpose(1, 2).reshape(N * n2, n1)  # a view when n2 == 1
    T = X @ A.reshape(k * m1, n1).T  # [N·n2, k·m1]
    if k * n2 == 1:
        # The last contraction is an outer product with B: one broadcast multiply-add.
        T = T.view(N, m1, 1)
        b = B.view(1, 1, m2)
        Y = T * b if bias is None else torch.addcmul(bias.view(1, m1, m2), T, b)
        return Y.view(N, m1 * m2)
    T = T.view(N, n2, k, m1).permute(0, 3, 2, 1).reshape(N * m1, k * n2)
    Y = T @ B.permute(1, 0, 2).reshape(m2, k * n2).T  # [N·m1, m2]
    Y = Y.view(N, m1 * m2)
    return Y if bias is None else Y.add_(bias)


def _apply_b_first(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Y: [N, m1·m2] for x: [N, n1·n2], contracting B first (shapes as in KroneckerLinear)."""
    k, m1, n1 = A.shape
    _, m2, n2 = B.shape
    N = x.shape[0]
    T = x.reshape(N * n1, n2) @ B.reshape(k * m2, n2).T  # [N·n1, k·m2]
    T = T.view(N, n1, k, m2).permute(0, 3, 2, 1).reshape(N * m2, k * n1)  # a view if k·m2 == 1
    A_mat = A.permute(1, 0, 2).reshape(m1, k * n1)
    if m2 == 1:
        return T @ A_mat.T if bias is None else torch.addmm(bias, T, A_mat.T)
    Y = (T @ A_mat.T).view(N, m2, m1).transpose(1, 2)  # [N, m1, m2], strided
    # Putting the contiguous bias first makes the sum come out contiguous: one pass, not two.
    Y = Y.contiguous() if bias is None else torch.add(bias.view(m1, m2), Y)
    return Y.view(N, m1 * m2)


_APPLY = {"a_first": _apply_a_first, "b_first": _apply_b_first}


class KroneckerLinear(CompressedLayer):
    """y = x·(Σₖ Aₖ ⊗ Bₖ)ᵀ + b with A: [k, m1, n1] and B: [k, m2, n2].

    out = m1·m2 and in = n1·n2. The layer has k·(m1·n1 + m2·n2) (+ out for the bias)
    parameters, and one term has rank at most min(m1, n1)·min(m2, n2).

    Example:
        >>> layer = KroneckerLinear.from_module(nn.Linear(768, 3072), a_shape=(768, 768))
        >>> layer.B.shape
        torch.Size([1, 4, 1])
    """

    method = "kronecker"
    spec_fields = disk.SPEC_FIELDS

    def __init__(
        self,
        in_features: int,
        out_features: int,
        a_shape: tuple[int, int],
        terms: int = 1,
        bias: bool = True,
        *,
        source: SourceKind = "linear",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self._init_common(in_features, out_features, source)
        b_shape = b_shape_for((out_features, in_features), tuple(a_shape))
        a_shape = (int(a_shape[0]), int(a_shape[1]))
        max_terms = min(a_shape[0] * a_shape[1], b_shape[0] * b_shape[1])
        if isinstance(terms, bool) or not isinstance(terms, int) or not 1 <= terms <= max_terms:
            raise InvalidParameterError(
                f"terms={terms!r}: expected an integer in [1, min(m1·n1, m2·n2)] = "
                f"[1, {max_terms}] for a_shape={a_shape} and b_shape={b_shape}"
            )
        factory = {"device": device, "dtype": dtype}
        self.A = nn.Parameter(torch.zeros(terms, *a_shape, **factory))
        self.B = nn.Parameter(torch.zeros(terms, *b_shape, **factory))
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        self.register_load_state_dict_pre_hook(drop_marker)
        costs = contraction_costs(a_shape, b_shape, terms)
        self.order: ContractionOrder = min(costs, key=costs.__getitem__)

    @classmethod
    def from_module(
        cls, module: nn.Module, *, a_shape: tuple[int, int], terms: int = 1
    ) -> KroneckerLinear:
        """Factor an ``nn.Linear`` / ``Conv1D`` by the nearest Kronecker sum (Van Loan, fp32).

        Args:
            module: the dense module.
            a_shape: (m1, n1), dividing the weight's [out, in]; B is (out/m1, in/n1).
            terms: number of Kronecker terms k.

        Raises:
            InvalidParameterError: ``a_shape`` does not divide the shape, or ``terms`` is out
                of range.
            UnsupportedModuleError: the module is neither Linear nor Conv1D.
        """
        W = dense_weight_of(module)
        b_shape_for(tuple(W.shape), tuple(a_shape))  # validate before the SVD
        A, B = nearest_kronecker(W, tuple(a_shape), terms)
        return cls.from_factors(A, B, module.bias, source_kind(module))

    @classmethod
    def from_factors(
        cls,
        A: torch.Tensor,
        B: torch.Tensor,
        bias: torch.Tensor | None,
        source: SourceKind = "linear",
    ) -> KroneckerLinear:
        """A layer holding given factors A: [k, m1, n1] and B: [k, m2, n2] (copied) and the bias."""
        if A.ndim != 3 or B.ndim != 3 or A.shape[0] != B.shape[0]:
            raise InvalidParameterError(
                f"factors: expected A [k, m1, n1] and B [k, m2, n2], got {list(A.shape)} and "
                f"{list(B.shape)}"
            )
        k, m1, n1 = A.shape
        _, m2, n2 = B.shape
        layer = cls(
            n1 * n2,
            m1 * m2,
            (m1, n1),
            k,
            bias=bias is not None,
            source=source,
            device=A.device,
            dtype=A.dtype,
        )
        with torch.no_grad():
            layer.A.copy_(A)
            layer.B.copy_(B)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    @classmethod
    def from_spec(
        cls, spec: dict[str, object], device: torch.device | str | None, dtype: torch.dtype | None
    ) -> KroneckerLinear:
        return cls(
            int(spec["in_features"]),
            int(spec["out_features"]),
            tuple(int(d) for d in spec["a_shape"]),
            int(spec["terms"]),
            bool(spec["bias"]),
            source=spec["source"],
            device=device,
            dtype=dtype,
        )

    @property
    def terms(self) -> int:
        return self.A.shape[0]

    @property
    def weight(self) -> torch.Tensor:
        """W = Σₖ Aₖ ⊗ Bₖ: [out, in] as a :class:`LazyWeight`; forward never uses it.

        For code that inspects ``module.weight`` of a Linear (dtype checks cost nothing; only an
        operation on the values computes W). Writing into it changes nothing: train A and B.
        """
        return LazyWeight(self.dense_weight, (self.out_features, self.in_features), self.A)

    @property
    def a_shape(self) -> tuple[int, int]:
        return (self.A.shape[1], self.A.shape[2])

    @property
    def b_shape(self) -> tuple[int, int]:
        return (self.B.shape[1], self.B.shape[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        leading = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features)
        y = _APPLY[self.order](x2d, self.A, self.B, self.bias)
        return y.view(*leading, self.out_features)

    def dense_weight(self) -> torch.Tensor:
        return kronecker_sum(self.A, self.B)

    def dense_bias(self) -> torch.Tensor | None:
        return self.bias

    def compression_params(self) -> dict[str, object]:
        return {"a_shape": list(self.a_shape), "terms": self.terms}

    def stored_tensor(
        self, path: str, local: str, tensor: torch.Tensor
    ) -> tuple[str, StoredTensor]:
        stored = disk.factor_tensor(local, tensor)
        if stored is None:
            return super().stored_tensor(path, local, tensor)
        return local, stored

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"a_shape={self.a_shape}, b_shape={self.b_shape}, terms={self.terms}, "
            f"bias={self.bias is not None}, order={self.order}, source={self.source}"
        )
