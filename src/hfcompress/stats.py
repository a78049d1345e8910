"""Statistics of a Linear layer's calibration inputs, and what a data-aware builder is given.

Gathered by ``hfcompress.calibration`` (forward pre-hooks, fp32 accumulation); consumed by the
methods' builders (``hfcompress.methods.<name>.build``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class InputStats:
    """Statistics of a Linear layer's inputs X: [N, in] over N calibration tokens (fp32).

    Attributes:
        count: N, the tokens seen.
        sq_sum: Σ x² per input feature, [in]; ‖X_j‖₂ = √sq_sum (Wanda).
        abs_sum: Σ |x| per input feature, [in]; mean |x_j| = abs_sum / N (ASVD).
        total: Σ x per input feature, [in] (the refit of a Linear with a bias needs the mean).
        gram: Σ x·xᵀ, [in, in] = X·Xᵀ (SparseGPT's Hessian, SVD-LLM's whitening); only when asked.
    """

    count: int = 0
    sq_sum: torch.Tensor | None = None
    abs_sum: torch.Tensor | None = None
    total: torch.Tensor | None = None
    gram: torch.Tensor | None = None
    want_gram: bool = field(default=False, repr=False)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if self.sq_sum is None:
            self.sq_sum = torch.zeros(x.shape[1], device=x.device)
            self.abs_sum = torch.zeros(x.shape[1], device=x.device)
            self.total = torch.zeros(x.shape[1], device=x.device)
            if self.want_gram:
                self.gram = torch.zeros(x.shape[1], x.shape[1], device=x.device)
        self.count += x.shape[0]
        self.sq_sum += x.square().sum(0)
        self.abs_sum += x.abs().sum(0)
        self.total += x.sum(0)
        if self.gram is not None:
            self.gram.addmm_(x.T, x)

    @property
    def input_norm(self) -> torch.Tensor:
        """‖X_j‖₂ per input feature, [in]."""
        return self.sq_sum.sqrt()

    @property
    def mean_abs(self) -> torch.Tensor:
        """mean |x_j| per input feature, [in]."""
        return self.abs_sum / max(self.count, 1)


@dataclass(frozen=True)
class LayerStats:
    """What a data-aware builder gets for one module.

    Attributes:
        inputs: statistics of the module's inputs (None if its criterion needs none).
        row_weights: per-output-row weights [out] measured on the dense model (FWSVD's squared
            weight gradients, or the output-gradient energy), if the criterion needs them.
    """

    inputs: InputStats | None = None
    row_weights: torch.Tensor | None = None
