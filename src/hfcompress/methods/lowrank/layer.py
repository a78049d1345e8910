"""``LowRankLinear``: W ≈ U·V from a truncated SVD, with ranks that can shrink in training.

Progressive low-rank decomposition (Hajimolahoseini et al., seed 000 §4): factor W into
U = U_r·√Σ_r: [out, r] and V = √Σ_r·V_rᵀ: [r, in], train, then ``truncate`` to a smaller rank
and train again. The factors are two child ``nn.Linear`` modules, ``v`` (in → r) and ``u``
(r → out, carrying the bias), so a later stage can compress each factor like any Linear
(pruning after low-rank prunes U and V).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from hfcompress.decompose.svd import SvdMethod, check_rank, svd_factors
from hfcompress.errors import InvalidParameterError
from hfcompress.layers.base import (
    CompressedLayer,
    LazyWeight,
    SourceKind,
    StoredTensor,
    count_parameters,
    dense_weight_of,
    layer_from_spec,
    module_spec,
    source_kind,
)
from hfcompress.methods.lowrank import format as disk


class LowRankLinear(CompressedLayer):
    """y = (x·Vᵀ)·Uᵀ + b with U: [out, r] (``u.weight``) and V: [r, in] (``v.weight``).

    It has r·(out + in) (+ out for the bias) parameters, and its forward costs
    r·(out + in) multiply-adds per token instead of out·in.

    Example:
        >>> layer = LowRankLinear.from_module(nn.Linear(768, 3072), ratio=0.25)
        >>> layer.rank
        153
        >>> layer.truncate(64)
    """

    method = "lowrank"
    spec_fields = disk.SPEC_FIELDS

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        *,
        source: SourceKind = "linear",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self._init_common(in_features, out_features, source)
        check_rank(rank, out_features, in_features)
        self.v = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.u = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)
        self.register_load_state_dict_pre_hook(disk.follow_saved_rank)

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        *,
        rank: int | None = None,
        ratio: float | None = None,
        energy: float | None = None,
        method: SvdMethod = "auto",
    ) -> LowRankLinear:
        """Factor an ``nn.Linear`` / ``Conv1D`` by truncated SVD (computed in fp32).

        Args:
            module: the dense module.
            rank: the rank r, in [1, min(out, in)].
            ratio: alternatively, the fraction of parameters kept: r = ⌊ratio·out·in/(out + in)⌋.
            energy: alternatively, the fraction of Σσᵢ² retained.
            method: SVD algorithm, see :func:`hfcompress.decompose.svd_factors`.

        Raises:
            InvalidParameterError: not exactly one of rank/ratio/energy, or out of range.
            UnsupportedModuleError: the module is neither Linear nor Conv1D.
        """
        W = dense_weight_of(module)
        U, V = svd_factors(W, rank, ratio=ratio, energy=energy, method=method)
        return cls.from_factors(U, V, module.bias, source_kind(module))

    @classmethod
    def from_factors(
        cls,
        U: torch.Tensor,
        V: torch.Tensor,
        bias: torch.Tensor | None,
        source: SourceKind = "linear",
    ) -> LowRankLinear:
        """A layer holding given factors U: [out, r] and V: [r, in] (copied) and the bias.

        For factorizations computed elsewhere (the data-aware ones in
        :mod:`hfcompress.decompose.calibrated`).
        """
        if U.ndim != 2 or V.ndim != 2 or U.shape[1] != V.shape[0]:
            raise InvalidParameterError(
                f"factors: expected U [out, r] and V [r, in], "
                f"got {list(U.shape)} and {list(V.shape)}"
            )
        layer = cls(
            V.shape[1],
            U.shape[0],
            U.shape[1],
            bias=bias is not None,
            source=source,
            device=U.device,
            dtype=U.dtype,
        )
        with torch.no_grad():
            layer.u.weight.copy_(U)
            layer.v.weight.copy_(V)
            if bias is not None:
                layer.u.bias.copy_(bias)
        return layer

    @classmethod
    def from_spec(
        cls, spec: dict[str, object], device: torch.device | str | None, dtype: torch.dtype | None
    ) -> LowRankLinear:
        layer = cls(
            int(spec["in_features"]),
            int(spec["out_features"]),
            int(spec["rank"]),
            bool(spec["bias"]),
            source=spec["source"],
            device=device,
            dtype=dtype,
        )
        for name, factor_spec in dict(spec.get("factors", {})).items():
            if name not in disk.FACTOR_NAMES:
                raise InvalidParameterError(f"factors: unknown factor {name!r}; expected 'u', 'v'")
            if factor_spec.get("method") != "dense":
                setattr(layer, name, layer_from_spec(factor_spec, device, dtype))
        return layer

    @classmethod
    def factor_spec_error(
        cls, spec: Mapping[str, Any], name: str, factor_spec: Mapping[str, Any]
    ) -> str | None:
        return disk.factor_spec_error(spec, name, factor_spec)

    def stored_tensor(
        self, path: str, local: str, tensor: torch.Tensor
    ) -> tuple[str, StoredTensor]:
        if path:  # a plain factor u or v (a compressed one describes its own tensors)
            return local, disk.plain_factor_tensor(path, local, tensor)
        return super().stored_tensor(path, local, tensor)

    def to_spec(self) -> dict[str, object]:
        spec = super().to_spec()
        spec["factors"] = {"u": module_spec(self.u), "v": module_spec(self.v)}
        return spec

    @property
    def rank(self) -> int:
        return self.v.out_features

    @property
    def weight(self) -> torch.Tensor:
        """W = U·V: [out, in] as a :class:`LazyWeight`; forward never uses it.

        For code that inspects ``module.weight`` of a Linear: T5 reads its dtype on every
        forward, which costs nothing here; only an operation on the values computes U·V.
        Writing into it changes nothing: train the factors instead.
        """
        like = self.v.weight
        if not isinstance(like, torch.Tensor):  # int8 factors (quantize_int8): float32 in and out
            like = torch.empty((), dtype=torch.float32)
        return LazyWeight(self.dense_weight, (self.out_features, self.in_features), like)

    def factors(self) -> dict[str, nn.Module]:
        return {"u": self.u, "v": self.v}

    def with_factors(self, factors: dict[str, nn.Module]) -> LowRankLinear:
        """A new low-rank layer of the same structure holding the given ``u`` / ``v`` modules."""
        shell = LowRankLinear(
            self.in_features,
            self.out_features,
            self.rank,
            bias=self.u.bias is not None,
            source=self.source,
            device="meta",
        )
        for name, module in factors.items():
            setattr(shell, name, module)
        return shell

    def nonzero_param_count(self) -> int:
        return sum(count_parameters(f) for f in self.factors().values())

    def report_settings(self) -> dict[str, object]:
        settings = dict(self.compression_params())
        for factor in self.factors().values():
            if isinstance(factor, CompressedLayer):
                settings.update({f"factor_{k}": v for k, v in factor.compression_params().items()})
                break
        return settings

    @property
    def bias(self) -> torch.Tensor | None:
        """The bias, held by the factor ``u``."""
        return self.u.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.u(self.v(x))

    def dense_weight(self) -> torch.Tensor:
        return dense_weight_of(self.u) @ dense_weight_of(self.v)

    def dense_bias(self) -> torch.Tensor | None:
        return self.u.bias

    def compression_params(self) -> dict[str, object]:
        return {"rank": self.rank}

    @torch.no_grad()
    def truncate(self, new_rank: int) -> None:
        """Re-factor the current product U·V to rank ``new_rank``, shrinking the parameters.

        The SVD of U·V is taken without building it: with U = Q_u·R_u and Vᵀ = Q_v·R_v,
        U·V = Q_u·(R_u·R_vᵀ)·Q_vᵀ, so only the r×r core needs an SVD. The result is the best
        rank-``new_rank`` approximation of U·V (Eckart–Young), split as U·√Σ and √Σ·Vᵀ.

        The factors are replaced by new, smaller ``nn.Parameter`` objects: an optimizer holding
        the old ones must be rebuilt (the training callbacks do this).

        Raises:
            InvalidParameterError: ``new_rank`` outside [1, current rank], or a factor was
                compressed by a later stage (re-factoring would discard its structure).
        """
        if (
            isinstance(new_rank, bool)
            or not isinstance(new_rank, int)
            or not 1 <= new_rank <= self.rank
        ):
            raise InvalidParameterError(
                f"new_rank={new_rank!r}: expected an integer in "
                f"[1, current rank] = [1, {self.rank}]"
            )
        if not (type(self.u) is nn.Linear and type(self.v) is nn.Linear):
            raise InvalidParameterError(
                f"truncate: the factors are {type(self.u).__name__}/{type(self.v).__name__}; "
                "only plain nn.Linear factors can be re-factored"
            )
        if new_rank == self.rank:
            return
        U32 = self.u.weight.float()
        V32 = self.v.weight.float()
        Q_u, R_u = torch.linalg.qr(U32)
        Q_v, R_v = torch.linalg.qr(V32.T)
        core_u, S, core_vh = torch.linalg.svd(R_u @ R_v.T)
        root = S[:new_rank].sqrt()
        new_U = (Q_u @ core_u[:, :new_rank]) * root
        new_V = root[:, None] * (core_vh[:new_rank] @ Q_v.T)
        self._replace_factors(new_U, new_V)

    @torch.no_grad()
    def resize_rank_(self, rank: int) -> None:
        """Give the factors rank ``rank`` with zero values, keeping their types and settings.

        For loading weights of another rank into this layer; the values are meant to be
        overwritten. Use :meth:`truncate` to lower the rank while keeping the product.
        """
        check_rank(rank, self.out_features, self.in_features)
        factory = {"device": self.u.weight.device, "dtype": self.u.weight.dtype}
        has_bias = self.u.bias is not None
        u = nn.Linear(rank, self.out_features, bias=has_bias, **factory)
        v = nn.Linear(self.in_features, rank, bias=False, **factory)
        # a compressed factor (pruned by a later stage) is rebuilt as the same kind of layer
        if isinstance(self.u, CompressedLayer):
            u = type(self.u).from_module(u, **self.u.compression_params())
        if isinstance(self.v, CompressedLayer):
            v = type(self.v).from_module(v, **self.v.compression_params())
        self.u, self.v = u, v

    def _replace_factors(self, U: torch.Tensor, V: torch.Tensor) -> None:
        old_u, old_v = self.u, self.v
        factory = {"device": old_u.weight.device, "dtype": old_u.weight.dtype}
        rank = U.shape[1]
        self.v = nn.Linear(self.in_features, rank, bias=False, **factory)
        self.u = nn.Linear(rank, self.out_features, bias=old_u.bias is not None, **factory)
        self.v.weight.copy_(V)
        self.u.weight.copy_(U)
        if old_u.bias is not None:
            self.u.bias.copy_(old_u.bias)
        self.u.requires_grad_(old_u.weight.requires_grad)
        self.v.requires_grad_(old_v.weight.requires_grad)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, bias={self.u.bias is not None}, source={self.source}"
        )
