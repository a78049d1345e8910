"""``PrunedLinear``: a Linear whose weight is multiplied by a fixed boolean mask.

Magnitude pruning per layer (unstructured) or N:M along the input dimension. Because forward
computes with ``weight * mask``, masked entries receive exactly zero gradient, and because they
are stored as 0, no optimizer moves them: with AdamW the first and second moments stay 0, so the
update is 0/(√0 + ε) = 0, and decoupled weight decay multiplies 0 by (1 − lr·λ). This is the
pattern lock of Prune Once For All (Zafrir et al., 2021).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from hfcompress.decompose.masks import magnitude_mask, nm_mask
from hfcompress.decompose.patterns import (
    UNSTRUCTURED,
    check_nm_divides,
    normalize_pattern,
    parse_nm_pattern,
    resolve_sparsity,
)
from hfcompress.errors import FrozenLayerError, InvalidParameterError
from hfcompress.layers.base import (
    CompressedLayer,
    ContentCheck,
    FoundTensor,
    SourceKind,
    StoredForm,
    StoredTensor,
    dense_weight_of,
    source_kind,
)
from hfcompress.methods.prune import format as disk


def compute_mask(W: torch.Tensor, pattern: str, sparsity: float) -> torch.Tensor:
    """Magnitude mask of W: [out, in] for ``pattern`` (sparsity applies to unstructured only)."""
    if pattern == UNSTRUCTURED:
        return magnitude_mask(W, sparsity)
    n, m = parse_nm_pattern(pattern)
    return nm_mask(W, n, m)


def _zero_masked_after_load(module: PrunedLinear, incompatible_keys: object) -> None:
    with torch.no_grad():
        module.apply_mask_()


def _dense_weight_in_state(
    module: PrunedLinear, state: dict[str, torch.Tensor], prefix: str, local_metadata: object
) -> None:
    """A frozen 2:4 layer on CUDA holds a semi-structured weight: state dicts (and so
    checkpoints) hold the dense [out, in] weight, as for any other pruned layer."""
    weight = state.get(prefix + "weight")
    if weight is not None and is_semi_structured(weight):
        state[prefix + "weight"] = weight.to_dense()


def is_semi_structured(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is one of PyTorch's 2:4 semi-structured sparse tensors."""
    return isinstance(tensor, torch.sparse.SparseSemiStructuredTensor)


def semi_structured(weight: torch.Tensor) -> torch.Tensor | None:
    """``weight`` [out, in] (2:4 pruned) as a semi-structured sparse tensor, or None if the
    device cannot run it: CUDA of compute capability ≥ 8.0, fp16/bf16, and shapes the kernels
    take (multiples of their tiles). Then ``F.linear`` runs the cuSPARSELt/CUTLASS 2:4 kernels
    and the weight holds half its values plus 2-bit metadata per kept value."""
    if not weight.is_cuda or weight.dtype not in (torch.float16, torch.bfloat16):
        return None
    if torch.cuda.get_device_capability(weight.device) < (8, 0):
        return None
    try:
        return torch.sparse.to_sparse_semi_structured(weight.detach().contiguous())
    except (RuntimeError, ValueError, NotImplementedError):  # shape or backend not supported
        return None


class PrunedLinear(CompressedLayer):
    """y = x·(W ⊙ M)ᵀ + b with W: [out, in] and a boolean mask M: [out, in].

    The mask is a persistent buffer, saved and loaded with the weights. ``sparsity`` is the
    fraction of zeros the mask was built for: ``round(sparsity·out·in)`` entries for
    unstructured, exactly 1 − N/M for ``"N:M"``.

    Example:
        >>> layer = PrunedLinear.from_module(nn.Linear(64, 32), sparsity=0.5)
        >>> layer = PrunedLinear.from_module(nn.Linear(64, 32), pattern="2:4")
    """

    method = "prune"
    spec_fields = disk.SPEC_FIELDS
    mask: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        pattern: str = UNSTRUCTURED,
        sparsity: float | None = None,
        source: SourceKind = "linear",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self._init_common(in_features, out_features, source)
        self.pattern = normalize_pattern(pattern)
        self.sparsity = resolve_sparsity(self.pattern, sparsity)
        check_nm_divides(self.pattern, in_features)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        self.register_buffer(
            "mask", torch.ones(out_features, in_features, dtype=torch.bool, device=device)
        )
        self.register_load_state_dict_pre_hook(disk.accept_compact_weights)
        # keep the invariant the no-grad forward relies on: masked weights are exact zeros
        self.register_load_state_dict_post_hook(_zero_masked_after_load)
        self.register_state_dict_post_hook(_dense_weight_in_state)

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        *,
        sparsity: float | None = None,
        pattern: str = UNSTRUCTURED,
    ) -> PrunedLinear:
        """Prune an ``nn.Linear`` / ``Conv1D`` by magnitude.

        Args:
            module: the dense module; its weight is copied, not shared.
            sparsity: fraction of weights to prune, in [0, 1). Implied by an N:M pattern.
            pattern: ``"unstructured"`` (per-layer magnitude) or ``"N:M"`` (keep N of every M
                consecutive inputs).

        Raises:
            InvalidParameterError: bad sparsity or pattern, or ``in`` not divisible by M.
            UnsupportedModuleError: the module is neither Linear nor Conv1D.
        """
        W = dense_weight_of(module)
        pattern = normalize_pattern(pattern)
        sparsity = resolve_sparsity(pattern, sparsity)
        check_nm_divides(pattern, W.shape[1])
        mask = compute_mask(W, pattern, sparsity)
        return cls.from_weight(W, mask, module.bias, source_kind(module), pattern, sparsity)

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        mask: torch.Tensor,
        bias: torch.Tensor | None,
        source: SourceKind = "linear",
        pattern: str = UNSTRUCTURED,
        sparsity: float | None = None,
    ) -> PrunedLinear:
        """A layer holding W: [out, in] (zeroed where ``mask`` is False), the mask and the bias.

        For masks and weights computed elsewhere (Wanda, SparseGPT's updated weights). With
        ``sparsity=None`` an unstructured layer records the mask's measured sparsity.
        """
        if weight.shape != mask.shape or mask.dtype != torch.bool:
            raise InvalidParameterError(
                f"mask: expected a bool tensor of the weight's shape {list(weight.shape)}, got "
                f"{mask.dtype} {list(mask.shape)}"
            )
        if sparsity is None and normalize_pattern(pattern) == UNSTRUCTURED:
            sparsity = 1.0 - float(mask.sum()) / mask.numel()
        out_features, in_features = weight.shape
        layer = cls(
            in_features,
            out_features,
            bias=bias is not None,
            pattern=pattern,
            sparsity=sparsity,
            source=source,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            layer.mask.copy_(mask)
            layer.weight.copy_(weight * mask)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    @classmethod
    def from_spec(
        cls, spec: dict[str, object], device: torch.device | str | None, dtype: torch.dtype | None
    ) -> PrunedLinear:
        return cls(
            int(spec["in_features"]),
            int(spec["out_features"]),
            bool(spec["bias"]),
            pattern=str(spec["pattern"]),
            sparsity=spec.get("sparsity"),
            source=spec["source"],
            device=device,
            dtype=dtype,
        )

    frozen: bool = False  # set by freeze_(): no mask in memory, inference only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.frozen:
            if self.training and torch.is_grad_enabled():
                raise FrozenLayerError(
                    "PrunedLinear: this layer is frozen for inference (hfcompress.freeze) and "
                    "holds no mask to keep its zeros; call hfcompress.unfreeze(model) to train"
                )
            return F.linear(x, self.weight, self.bias)
        if not (torch.is_grad_enabled() and self.weight.requires_grad):
            # Masked weights are stored as exact zeros (from_weight zeroes them, they get zero
            # gradient, apply_mask_ re-zeroes them): without autograd, W ⊙ M is W itself.
            return F.linear(x, self.weight, self.bias)
        return F.linear(x, self.weight * self.mask, self.bias)

    def __getattr__(self, name: str) -> object:
        # A frozen layer's mask is its non-zero pattern, computed on the rare read (reports,
        # saving); it is never resident.
        if name == "mask" and self.__dict__.get("frozen", False):
            return self.dense_weight().detach() != 0
        return super().__getattr__(name)

    @torch.no_grad()
    def freeze_(self) -> None:
        """Drop the mask from memory and stop the weight's gradient: the inference form.

        The zeros of the weight are the mask (a kept weight that is exactly 0 is then counted as
        pruned, which changes no output). ``unfreeze_`` restores the trainable form.
        """
        if self.frozen:
            return
        self.apply_mask_()
        del self._buffers["mask"]
        self.frozen = True
        self.weight.requires_grad_(False)
        sparse = semi_structured(self.weight) if self.pattern == "2:4" else None
        if sparse is not None:
            self.weight = nn.Parameter(sparse, requires_grad=False)

    @torch.no_grad()
    def unfreeze_(self) -> None:
        """The trainable form again: the mask buffer is rebuilt from the weight's non-zeros."""
        if not self.frozen:
            return
        if is_semi_structured(self.weight):
            self.weight = nn.Parameter(self.weight.detach().to_dense())
        mask = self.weight != 0
        self.frozen = False
        self.register_buffer("mask", mask)
        self.weight.requires_grad_(True)

    @torch.no_grad()
    def apply_mask_(self) -> None:
        """Zero the stored weights the mask removes (after an optimizer or a mask change)."""
        self.weight.mul_(self.mask)

    @torch.no_grad()
    def update_mask(self, sparsity: float | None = None) -> None:
        """Recompute the mask by magnitude of the current weights and zero what it removes.

        Gradual pruning calls this with rising sparsities; an N:M layer keeps its pattern and
        ignores ``sparsity``. Weights pruned earlier are 0, so they come back only if nothing
        larger is left, which magnitude order makes impossible while the sparsity rises.
        """
        self.set_mask_(*self.next_mask(sparsity))

    @torch.no_grad()
    def next_mask(self, sparsity: float | None = None) -> tuple[float, torch.Tensor]:
        """(sparsity, mask [out, in]) that :meth:`update_mask` would set; changes nothing."""
        if self.pattern == UNSTRUCTURED and sparsity is not None:
            sparsity = resolve_sparsity(self.pattern, sparsity)
        else:
            sparsity = self.sparsity
        return sparsity, compute_mask(self.weight * self.mask, self.pattern, sparsity)

    @torch.no_grad()
    def set_mask_(self, sparsity: float, mask: torch.Tensor) -> None:
        """Install ``mask`` (and the sparsity it has) and zero the weights it removes."""
        self.sparsity = sparsity
        self.mask.copy_(mask)
        self.apply_mask_()

    def dense_weight(self) -> torch.Tensor:
        if self.frozen:
            weight = self.weight
            return weight.to_dense() if is_semi_structured(weight) else weight
        return self.weight * self.mask

    def dense_bias(self) -> torch.Tensor | None:
        return self.bias

    def compression_params(self) -> dict[str, object]:
        return {"pattern": self.pattern, "sparsity": self.sparsity}

    def nonzero_param_count(self) -> int:
        bias = self.bias.numel() if self.bias is not None else 0
        return int(self.mask.sum()) + bias

    # --- on-disk state: values + bitmask (hfcompress.methods.prune.format) ---

    def stored_tensor(
        self, path: str, local: str, tensor: torch.Tensor
    ) -> tuple[str, StoredTensor]:
        stored = disk.stored_tensor(self.out_features, self.in_features, local)
        if stored is None:
            return super().stored_tensor(path, local, tensor)
        return stored

    def stored_form(self) -> StoredForm:
        return disk.stored_form(self.in_features)

    def content_checks(self, found: Mapping[str, FoundTensor], where: str) -> list[ContentCheck]:
        check = disk.bitmask_check(
            found,
            where,
            out_features=self.out_features,
            in_features=self.in_features,
            pattern=self.pattern,
            sparsity=self.sparsity,
        )
        return [check]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, pattern={self.pattern}, "
            f"sparsity={self.sparsity:.4f}, source={self.source}"
        )
