"""Per-module structure: rank, stable rank, energy, sparsity, and each method's error at a budget.

For W: [out, in] one ``torch.linalg.svdvals`` call in fp32 gives the spectrum σ₁ ≥ … ≥ σₚ,
p = min(out, in), from which follow

* the numerical rank #{i: σᵢ > tol}, tol = rtol·σ₁ with rtol = max(out, in)·eps(fp32) by
  default (as ``numpy.linalg.matrix_rank``);
* the stable rank ‖W‖_F² / ‖W‖₂² = Σσᵢ² / σ₁² (seed 000 §5.3), a continuous proxy of the rank
  that is at most the rank;
* the energy Σ_{i≤r} σᵢ² / Σσᵢ² retained by the best rank-r approximation;
* the low-rank error at a parameter budget, by Eckart–Young √(Σ_{i>r} σᵢ²) / ‖W‖_F.

Pruning and Kronecker errors at the same budget need the weights themselves: the exact norm of
the smallest-magnitude entries a magnitude mask drops, and the Van Loan–Pitsianis error
√(Σ_{i>k} σᵢ(R(W))²) of the best k-term Kronecker sum over a few factor shapes. Together they
show where low-rank, pruning or Kronecker factors fit a module best before choosing a recipe
(the "structure analysis" step of seed 001 §3).

A budget is the fraction of the out·in weight entries a method may store: r·(out + in) for
low-rank factors, the kept entries for pruning (mask or index storage not counted), and
k·(m1·n1 + m2·n2) for a k-term Kronecker sum. Biases are not counted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from rich.table import Table
from torch import nn
from tqdm.auto import tqdm

from hfcompress.decompose import kronecker_error, kronecker_shapes, magnitude_mask, rank_for_ratio
from hfcompress.errors import InvalidParameterError
from hfcompress.layers import dense_weight_of
from hfcompress.matching import check_pattern, select
from hfcompress.report import table_text
from hfcompress.validation import compressible_modules, tied_modules

Method = Literal["lowrank", "prune", "kronecker"]
METHODS: tuple[Method, ...] = ("lowrank", "prune", "kronecker")

DEFAULT_RATIOS = (0.1, 0.25, 0.5)
DEFAULT_KRONECKER_CANDIDATES = 12


@dataclass(frozen=True)
class EnergyAt:
    """Spectral energy kept by the largest rank whose factors fit a parameter ratio.

    Attributes:
        ratio: fraction of the out·in parameters the rank-r factors may keep.
        rank: r = ``rank_for_ratio(out, in, ratio)``, at least 1.
        energy: Σ_{i≤r} σᵢ² / Σσᵢ², in [0, 1] (1 for an all-zero W).
    """

    ratio: float
    rank: int
    energy: float


@dataclass(frozen=True)
class KroneckerFit:
    """The best Kronecker sum Σₖ Aₖ ⊗ Bₖ found within the budget.

    Attributes:
        a_shape: (m1, n1), the shape of each Aₖ.
        b_shape: (m2, n2), the shape of each Bₖ.
        terms: k, as many terms as the budget allows, at most min(m1·n1, m2·n2).
        params: k·(m1·n1 + m2·n2).
        error: ‖W − Σₖ Aₖ ⊗ Bₖ‖_F / ‖W‖_F of the optimal factors.
    """

    a_shape: tuple[int, int]
    b_shape: tuple[int, int]
    terms: int
    params: int
    error: float


@dataclass(frozen=True, eq=False)
class ModuleAnalysis:
    """Structure of one weight W: [out, in], as computed by :func:`analyze_module`.

    Attributes:
        name: qualified module name ("" for a bare weight).
        shape: (out, in).
        rank: numerical rank, #{i: σᵢ > rank_tol}.
        rank_tol: the absolute threshold used for ``rank``.
        stable_rank: ‖W‖_F² / σ₁² (0 for an all-zero W).
        sparsity: fraction of entries that are exactly zero.
        energy: energy retained at the rank each analysis ratio allows.
        budget: fraction of out·in parameters each method may keep for the errors below.
        lowrank_rank: r = ``rank_for_ratio(out, in, budget)``.
        lowrank_error: Eckart–Young relative error at ``lowrank_rank``; None if even rank 1
            needs more than the budget (out + in > budget·out·in).
        prune_kept: entries magnitude pruning keeps.
        prune_error: ‖W ⊙ (1 − M)‖_F / ‖W‖_F for the magnitude mask M.
        kronecker: the best Kronecker fit, or None if no candidate shape fits the budget.
        singular_values: σ, descending, float32 on the CPU (for the plots).
    """

    name: str
    shape: tuple[int, int]
    rank: int
    rank_tol: float
    stable_rank: float
    sparsity: float
    energy: tuple[EnergyAt, ...]
    budget: float
    lowrank_rank: int
    lowrank_error: float | None
    prune_kept: int
    prune_error: float
    kronecker: KroneckerFit | None
    singular_values: torch.Tensor = field(repr=False)

    @property
    def errors(self) -> dict[Method, float | None]:
        """Relative error of each method at ``budget``; None where the method does not fit."""
        kron = None if self.kronecker is None else self.kronecker.error
        return {"lowrank": self.lowrank_error, "prune": self.prune_error, "kronecker": kron}

    @property
    def best(self) -> Method:
        """The method with the smallest error at ``budget`` (pruning always fits)."""
        fitting = {m: e for m, e in self.errors.items() if e is not None}
        return min(fitting, key=lambda m: (fitting[m], METHODS.index(m)))

    def cumulative_energy(self) -> torch.Tensor:
        """[p] float64: entry r − 1 is Σ_{i≤r} σᵢ² / Σσᵢ² (all ones for an all-zero W)."""
        sq = self.singular_values.double().square()
        total = sq.sum()
        if total == 0:
            return torch.ones_like(sq)
        return torch.cumsum(sq, dim=0) / total

    def to_dict(self, include_spectrum: bool = False) -> dict[str, Any]:
        """JSON-compatible fields; the singular values only with ``include_spectrum``."""
        kron = self.kronecker
        data: dict[str, Any] = {
            "name": self.name,
            "shape": list(self.shape),
            "rank": self.rank,
            "rank_tol": self.rank_tol,
            "stable_rank": self.stable_rank,
            "sparsity": self.sparsity,
            "energy": [vars(e) for e in self.energy],
            "budget": self.budget,
            "lowrank_rank": self.lowrank_rank,
            "prune_kept": self.prune_kept,
            "errors": dict(self.errors),
            "kronecker": None
            if kron is None
            else vars(kron) | {"a_shape": list(kron.a_shape), "b_shape": list(kron.b_shape)},
            "best": self.best,
        }
        if include_spectrum:
            data["singular_values"] = self.singular_values.tolist()
        return data


def _check_fraction(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise InvalidParameterError(f"{name}={value!r}: expected a fraction in (0, 1]")
    return float(value)


def _check_options(
    budget: float, ratios: Sequence[float], rtol: float | None, kronecker_candidates: int
) -> tuple[float, tuple[float, ...]]:
    budget = _check_fraction("budget", budget)
    ratios = tuple(_check_fraction("ratios[]", r) for r in ratios)
    if rtol is not None and (
        isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not rtol > 0
    ):
        raise InvalidParameterError(f"rtol={rtol!r}: expected a positive float or None")
    if (
        isinstance(kronecker_candidates, bool)
        or not isinstance(kronecker_candidates, int)
        or kronecker_candidates < 0
    ):
        raise InvalidParameterError(
            f"kronecker_candidates={kronecker_candidates!r}: expected an integer ≥ 0 "
            "(0 skips the Kronecker search)"
        )
    return budget, ratios


def kronecker_candidates_for(
    out_features: int, in_features: int, budget: float, limit: int = DEFAULT_KRONECKER_CANDIDATES
) -> list[tuple[tuple[int, int], int]]:
    """Factor shapes and term counts the Kronecker search tries for W: [out, in].

    A shape fits when one term fits the budget, params ≤ budget·out·in; it then gets as many
    terms k as fit, at most min(m1·n1, m2·n2) (the rank of R(W)). Shapes whose four factor
    dimensions are all ≥ 2 are preferred (if none fits, every fitting shape is allowed), and at
    most ``limit`` of them are kept, the closest to balanced first: ``kronecker_shapes`` order,
    fewest parameters per term (m1·n1 ≈ m2·n2), then the largest rank per term.

    Returns:
        ``[(a_shape, terms), ...]``.
    """
    allowed = budget * out_features * in_features
    fitting = [s for s in kronecker_shapes(out_features, in_features) if s.params <= allowed]
    proper = [s for s in fitting if min(*s.a_shape, *s.b_shape) >= 2]
    candidates = []
    for s in (proper or fitting)[:limit]:
        max_terms = min(s.a_shape[0] * s.a_shape[1], s.b_shape[0] * s.b_shape[1])
        candidates.append((s.a_shape, min(math.floor(allowed / s.params), max_terms)))
    return candidates


def _best_kronecker(
    W32: torch.Tensor, budget: float, norm: float, limit: int
) -> KroneckerFit | None:
    out_features, in_features = W32.shape
    best: KroneckerFit | None = None
    for a_shape, terms in kronecker_candidates_for(out_features, in_features, budget, limit):
        b_shape = (out_features // a_shape[0], in_features // a_shape[1])
        params = terms * (a_shape[0] * a_shape[1] + b_shape[0] * b_shape[1])
        error = kronecker_error(W32, a_shape, terms) / norm if norm > 0 else 0.0
        fit = KroneckerFit(a_shape, b_shape, terms, params, error)
        if best is None or (fit.error, fit.params) < (best.error, best.params):
            best = fit
    return best


def analyze_module(
    W: torch.Tensor,
    budget: float = 0.5,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    *,
    rtol: float | None = None,
    kronecker_candidates: int = DEFAULT_KRONECKER_CANDIDATES,
    name: str = "",
) -> ModuleAnalysis:
    """Rank, stable rank, energy, sparsity and per-method errors of one weight W: [out, in].

    Args:
        W: the weight in ``nn.Linear`` layout [out, in], any float dtype and device; computed
            in fp32 on W's device (use ``dense_weight_of`` for a Conv1D or compressed layer).
        budget: fraction of the out·in parameters each method may keep for the errors.
        ratios: parameter fractions at which to report the energy a rank-r SVD retains, with
            r = ``rank_for_ratio(out, in, ratio)``.
        rtol: relative tolerance of the numerical rank, σᵢ > rtol·σ₁; default
            max(out, in)·eps(fp32), as ``numpy.linalg.matrix_rank``.
        kronecker_candidates: how many factor shapes the Kronecker search tries (one SVD of
            the rearranged W each, see :func:`kronecker_candidates_for`); 0 skips it.
        name: recorded in the result.

    Returns:
        A :class:`ModuleAnalysis`; ``.best`` names the method with the smallest error.

    Raises:
        InvalidParameterError: W is not a finite 2-D matrix, or an option is out of range.

    Example:
        >>> a = analyze_module(torch.randn(256, 64), budget=0.25)
        >>> a.rank, a.best, a.errors
    """
    budget, ratios = _check_options(budget, ratios, rtol, kronecker_candidates)
    if W.ndim != 2 or W.numel() == 0:
        raise InvalidParameterError(
            f"W: expected a non-empty 2-D weight [out, in], got shape {tuple(W.shape)}"
        )
    W32 = W.detach().float()
    if not bool(torch.isfinite(W32).all()):
        raise InvalidParameterError(f"W{f' of {name!r}' if name else ''}: has inf or NaN entries")
    out_features, in_features = W32.shape
    s = torch.linalg.svdvals(W32).cpu()
    sq = s.double().square()
    total = float(sq.sum())
    norm = math.sqrt(total)
    sigma_max = float(s[0])

    def tail_error(rank: int) -> float:
        return math.sqrt(float(sq[rank:].sum()) / total) if total > 0 else 0.0

    rel_tol = (
        rtol
        if rtol is not None
        else max(out_features, in_features) * torch.finfo(torch.float32).eps
    )
    rank_tol = rel_tol * sigma_max
    energy = tuple(
        EnergyAt(ratio, r, float(sq[:r].sum()) / total if total > 0 else 1.0)
        for ratio in ratios
        for r in [rank_for_ratio(out_features, in_features, ratio)]
    )

    lowrank_rank = rank_for_ratio(out_features, in_features, budget)
    fits = lowrank_rank * (out_features + in_features) <= budget * out_features * in_features
    mask = magnitude_mask(W32, 1.0 - budget)
    dropped = float(W32[~mask].double().square().sum())
    return ModuleAnalysis(
        name=name,
        shape=(out_features, in_features),
        rank=int((s > rank_tol).sum()),
        rank_tol=rank_tol,
        stable_rank=total / sigma_max**2 if sigma_max > 0 else 0.0,
        sparsity=1.0 - int(torch.count_nonzero(W32)) / W32.numel(),
        energy=energy,
        budget=budget,
        lowrank_rank=lowrank_rank,
        lowrank_error=tail_error(lowrank_rank) if fits else None,
        prune_kept=int(mask.sum()),
        prune_error=math.sqrt(dropped / total) if total > 0 else 0.0,
        kronecker=_best_kronecker(W32, budget, norm, kronecker_candidates),
        singular_values=s.contiguous(),
    )


def _format_kronecker(fit: KroneckerFit | None) -> str:
    if fit is None:
        return "-"
    (m1, n1), (m2, n2) = fit.a_shape, fit.b_shape
    return f"{fit.error:.4f} ({m1}×{n1}⊗{m2}×{n2}, k={fit.terms})"


@dataclass
class ModelAnalysis:
    """Per-module analysis of a model (:func:`analyze_model`); ``print(analysis)`` shows it.

    Attributes:
        rows: one :class:`ModuleAnalysis` per analyzed module, in ``named_modules`` order.
        skipped: (module, reason) pairs left out, such as weights tied to an embedding.
        budget: the parameter fraction of the error columns.
        ratios: the parameter fractions of the energy columns.
    """

    rows: list[ModuleAnalysis] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    budget: float = 0.5
    ratios: tuple[float, ...] = DEFAULT_RATIOS

    def __getitem__(self, name: str) -> ModuleAnalysis:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"{name!r} was not analyzed; analyzed: {[r.name for r in self.rows]}")

    def best_counts(self) -> dict[Method, int]:
        """How many modules each method fits best at ``budget``."""
        return {m: sum(row.best == m for row in self.rows) for m in METHODS}

    def to_dict(self, include_spectra: bool = False) -> dict[str, Any]:
        """JSON-compatible summary; the singular values only with ``include_spectra``."""
        return {
            "budget": self.budget,
            "ratios": list(self.ratios),
            "modules": [row.to_dict(include_spectra) for row in self.rows],
            "skipped": [{"module": n, "reason": r} for n, r in self.skipped],
            "best_counts": self.best_counts(),
        }

    def table(self) -> Table:
        """A rich table, one row per module."""
        table = Table(title=f"hfcompress: structure analysis (errors at {self.budget:.0%} params)")
        table.add_column("module", no_wrap=True)
        table.add_column("shape [out, in]", no_wrap=True)
        for column in ["rank", "stable rank"]:
            table.add_column(column, justify="right")
        for ratio in self.ratios:
            table.add_column(f"energy@{ratio:.0%}", justify="right")
        for column in ["sparsity", "err lowrank", "err prune", "err kronecker"]:
            table.add_column(column, justify="right")
        table.add_column("best")
        for row in self.rows:
            errors = row.errors
            table.add_row(
                row.name,
                f"[{row.shape[0]}, {row.shape[1]}]",
                str(row.rank),
                f"{row.stable_rank:.2f}",
                *(f"{e.energy:.3f} (r={e.rank})" for e in row.energy),
                f"{row.sparsity:.3f}",
                "-" if errors["lowrank"] is None else f"{errors['lowrank']:.4f}",
                f"{row.prune_error:.4f}",
                _format_kronecker(row.kronecker),
                row.best,
            )
        counts = ", ".join(f"{m} {n}" for m, n in self.best_counts().items())
        caption = [f"{len(self.rows)} modules; best at {self.budget:.0%} params: {counts}"]
        caption += [f"skipped {name}: {reason}" for name, reason in self.skipped]
        table.caption = "\n".join(caption)
        return table

    def __str__(self) -> str:
        return table_text(self.table(), width=200)


def analyze_model(
    model: nn.Module,
    targets: str | None = None,
    budget: float = 0.5,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    *,
    rtol: float | None = None,
    kronecker_candidates: int = DEFAULT_KRONECKER_CANDIDATES,
    progress: bool = True,
) -> ModelAnalysis:
    """Analyze every Linear, Conv1D and compressed layer of ``model`` (see :func:`analyze_module`).

    Conv1D weights are read as [out, in] and compressed layers through their effective dense
    weight. Modules whose weight is tied to another (an LM head sharing the embedding) are
    skipped and listed in ``.skipped``, as ``compress_model`` skips them.

    Args:
        model: any ``nn.Module``; it is not changed.
        targets: a regex that qualified module names must fully match (``re.fullmatch``), as a
            recipe's ``targets``; None analyzes every eligible module.
        budget: fraction of each module's parameters for the per-method errors.
        ratios: parameter fractions of the energy columns.
        rtol: relative tolerance of the numerical rank (see :func:`analyze_module`).
        kronecker_candidates: factor shapes tried per module; 0 skips the Kronecker search.
        progress: show a progress bar.

    Raises:
        InvalidParameterError: an option is out of range, ``targets`` is not a valid regex, or
            it matches no eligible module.

    Example:
        >>> analysis = analyze_model(model, targets=r".*\\.mlp\\..*", budget=0.25)
        >>> print(analysis)
    """
    budget, ratios = _check_options(budget, ratios, rtol, kronecker_candidates)
    if targets is not None:
        try:
            check_pattern(targets, "targets")
        except ValueError as error:
            raise InvalidParameterError(str(error)) from error
    units = compressible_modules(model)
    tied = tied_modules(model)
    matched = units if targets is None else select(targets, units)
    names = [n for n in matched if n not in tied]
    skipped = [
        (n, f"weight tied to {tied[n]}; compress_model skips it too") for n in matched if n in tied
    ]
    if not names:
        raise InvalidParameterError(
            f"targets={targets!r} fully matches no untied Linear/Conv1D or compressed module "
            f"(matched tied modules: {matched}); eligible modules look like "
            f"{[n for n in units if n not in tied][:6]}"
        )
    analysis = ModelAnalysis(skipped=skipped, budget=budget, ratios=ratios)
    bar = tqdm(
        names, desc="hfcompress: analyzing", unit="module", disable=not progress or len(names) < 2
    )
    with torch.no_grad():
        for name in bar:
            W = dense_weight_of(model.get_submodule(name))
            analysis.rows.append(
                analyze_module(
                    W,
                    budget,
                    ratios,
                    rtol=rtol,
                    kronecker_candidates=kronecker_candidates,
                    name=name,
                )
            )
    return analysis
