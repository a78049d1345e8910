"""Automatic per-layer budgets: "keep half the parameters" instead of hand-tuning every layer.

:func:`plan_recipe` measures every targeted module on calibration data and returns an ordinary
:class:`~hfcompress.recipe.Recipe` (one stage, per-layer ``overrides``) that a user can read,
edit, save as YAML and pass to ``compress_model``.

* ``lowrank``: with whitening by the Cholesky factor L of X·Xᵀ (SVD-LLM), the least output error
  ‖(W − Ŵ)X‖²_F of a rank-r factorization of module m is e_m(r) = Σ_{i>r} σᵢ²(W·L). By default
  (``weighting="loss"``) each output row is first weighted by √G_j, G_j = Σ_tokens (∂L/∂y_j)²,
  so e_m estimates the loss increase (diagonal empirical Fisher of the outputs) and modules are
  compared in one unit, and the recipe's criterion is ``fisher_whitened``, which factorizes each
  module for that same weighted error; ``weighting="output"`` compares relative output errors
  (criterion ``whitened``) instead. Ranks minimizing Σ_m e_m(r_m) within the budget come from a
  Lagrangian relaxation in which a module may also stay dense (no error, out·in parameters:
  cheaper than any rank past out·in/(out+in)).
* ``prune``, ``allocation="owl"``: OWL (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity"):
  blocks with more outlier Wanda scores (|W|·‖X‖ above ``outlier_factor`` × their mean) are
  pruned less, s_l = s − λ·(D_l − D̄)/max|D − D̄|, shifted so the total pruned count meets the
  target.
* ``prune``, ``allocation="saliency"``: per-module sparsities from the Optimal Brain Surgeon
  saliency that SparseGPT prunes by (Hassibi & Stork 1993): removing w_ji costs ≈ w_ji²/[H⁻¹]_ii
  of output error, weighted by G_j like the low-rank errors. Each row prunes its k least salient
  weights; the k of every module minimizes the summed estimate under the budget (Lagrangian, exact
  since the sorted saliencies make each module's curve convex).
"""

from __future__ import annotations

import heapq
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from rich.table import Table
from torch import nn
from tqdm.auto import tqdm

from hfcompress.calibration import (
    InputStats,
    calibration_batches,
    output_gradient_energy,
    recording_inputs,
)
from hfcompress.decompose.calibrated import wanda_scores
from hfcompress.errors import InvalidParameterError
from hfcompress.layers import dense_weight_of
from hfcompress.matching import select
from hfcompress.recipe import Recipe
from hfcompress.report import table_text
from hfcompress.validation import compressible_modules, tied_modules

_DAMP = 1e-6


@dataclass
class PlanRow:
    """The planned setting of one module."""

    name: str
    shape: tuple[int, int]
    setting: float | int | str  # rank, sparsity, or "dense" (left as it is)
    params: int  # parameters the module keeps under the plan
    predicted_error: float | None = None  # relative output error (lowrank), if computed


@dataclass
class Plan:
    """A recipe and how it spends the budget."""

    recipe: Recipe
    rows: list[PlanRow] = field(default_factory=list)
    budget: int = 0  # parameters the targeted modules may keep
    dense: int = 0  # parameters of the targeted modules before compression

    @property
    def planned(self) -> int:
        return sum(r.params for r in self.rows)

    def table(self) -> Table:
        table = Table(title=f"hfcompress plan: keep {self.planned:,} of {self.dense:,} parameters")
        for col in ("module", "W [out, in]", "setting", "params", "predicted error"):
            table.add_column(col, justify="left" if col == "module" else "right")
        for r in self.rows:
            error = "-" if r.predicted_error is None else f"{r.predicted_error:.4f}"
            setting = f"{r.setting:.4f}" if isinstance(r.setting, float) else str(r.setting)
            table.add_row(r.name, f"[{r.shape[0]}, {r.shape[1]}]", setting, f"{r.params:,}", error)
        table.caption = f"budget {self.budget:,} parameters; planned {self.planned:,}"
        return table

    def __str__(self) -> str:
        return table_text(self.table(), width=140)


def _targets(model: nn.Module, targets: str) -> list[str]:
    tied = tied_modules(model)
    names = [n for n in select(targets, compressible_modules(model)) if n not in tied]
    if not names:
        raise InvalidParameterError(
            f"targets={targets!r}: matches no Linear/Conv1D module "
            "(re.fullmatch; tied ones excluded)"
        )
    return names


def _dense_stats(
    model: nn.Module, names: list[str], batches: list, gram: bool, progress: bool
) -> dict[str, InputStats]:
    """Input statistics of ``names`` in the dense model, one pass over the calibration data."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with recording_inputs(model, dict.fromkeys(names, gram)) as stats, torch.no_grad():
            for batch in tqdm(batches, desc="hfcompress: measuring", disable=not progress):
                model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)
    finally:
        model.train(was_training)
    return stats


def _damped(gram: torch.Tensor, fraction: float) -> torch.Tensor:
    """H + fraction·mean(diag H)·I in float64, for a Cholesky factorization of X·Xᵀ."""
    H = gram.double()
    return H + fraction * H.diagonal().mean().clamp_min(1e-12) * torch.eye(
        H.shape[0], dtype=H.dtype, device=H.device
    )


def _whitened_spectrum(W: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """σ² of W·L, descending, with L the Cholesky factor of X·Xᵀ (damped): Σ_{i>r} σᵢ² is the
    least ‖(W − Ŵ)X‖²_F over rank-r Ŵ (SVD-LLM)."""
    L = torch.linalg.cholesky(_damped(gram, _DAMP))
    return torch.linalg.svdvals(W.double().to(L.device) @ L).square().cpu()


def _tail_errors(sq: torch.Tensor) -> torch.Tensor:
    """e(r) = Σ_{i≥r} sq_i for r = 0 … len(sq): the error left at rank r."""
    tails = sq.flip(0).cumsum(0).flip(0)
    return torch.cat([tails, tails.new_zeros(1)])


def _choose(errors: torch.Tensor, shape: tuple[int, int], lam: float) -> int | None:
    """The rank (or None: keep dense) minimizing error + lam·parameters for one module."""
    out, inp = shape
    cap = min(len(errors) - 1, (out * inp) // (out + inp))
    ranks = torch.arange(1, cap + 1, dtype=torch.float64)
    objective = errors[1 : cap + 1].double() + lam * ranks * (out + inp)
    best = int(objective.argmin())
    return None if lam * out * inp < float(objective[best]) else best + 1


def _cost(choice: dict[str, int | None], shapes: dict[str, tuple[int, int]]) -> int:
    return sum(o * i if choice[n] is None else choice[n] * (o + i) for n, (o, i) in shapes.items())


def _allocate_ranks(
    errors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], budget: int
) -> dict[str, int | None]:
    """Ranks (None = keep the module dense) minimizing Σ_m e_m(r_m) with Σ params ≤ budget.

    ``errors[m][r]`` is module m's error at rank r (decreasing in r). Lagrangian relaxation:
    each module independently minimizes e_m(r) + λ·params(r) over ranks 1 … cap and "dense"
    (error 0, out·in parameters, cheaper than any rank past cap), and λ is bisected until the
    budget is met; the budget left over is then spent rank by rank where it removes the most
    error per parameter. Exact whenever the errors are convex in r (σ² non-increasing).
    """
    floor = sum(o + i for o, i in shapes.values())
    if floor > budget:
        raise InvalidParameterError(
            f"keep: the budget of {budget:,} parameters is below rank 1 for every module "
            f"({floor:,}); raise keep"
        )
    top = max(float(e[0]) for e in errors.values()) + 1.0
    lo, hi = 0.0, top  # λ = top: rank 1 everywhere is cheapest in every objective
    for _ in range(100):
        mid = (lo + hi) / 2
        if _cost({n: _choose(errors[n], shapes[n], mid) for n in shapes}, shapes) > budget:
            lo = mid
        else:
            hi = mid
    choice = {n: _choose(errors[n], shapes[n], hi) for n in shapes}
    return _top_up(choice, errors, shapes, budget)


def _top_up(
    choice: dict[str, int | None],
    errors: dict[str, torch.Tensor],
    shapes: dict[str, tuple[int, int]],
    budget: int,
) -> dict[str, int | None]:
    spent = _cost(choice, shapes)
    heap = []
    for n, r in choice.items():
        o, i = shapes[n]
        if r is not None and r < min(len(errors[n]) - 1, (o * i) // (o + i)):
            heapq.heappush(heap, (-float(errors[n][r] - errors[n][r + 1]) / (o + i), n))
    while heap:
        _, n = heapq.heappop(heap)
        o, i = shapes[n]
        if spent + o + i > budget:
            continue  # a cheaper module may still fit
        choice[n] += 1
        spent += o + i
        r = choice[n]
        if r < min(len(errors[n]) - 1, (o * i) // (o + i)):
            heapq.heappush(heap, (-float(errors[n][r] - errors[n][r + 1]) / (o + i), n))
    return choice


def _plan_lowrank(model, names, targets, stats, keep, criterion, gradients) -> Plan:
    shapes, errors = {}, {}
    for name in names:
        W = dense_weight_of(model.get_submodule(name)).detach()
        shapes[name] = (W.shape[0], W.shape[1])
        if gradients is None:
            sq = _whitened_spectrum(W, stats[name].gram)
            errors[name] = _tail_errors(sq / sq.sum().clamp_min(1e-300))
        else:
            # Output-gradient weighting: a first-order change δY of the module's output raises
            # the loss by ≈ ½ Σ_j G_j ‖δY_j‖² (diagonal empirical Fisher of the outputs,
            # G_j = Σ_tokens (∂L/∂y_j)²), so rows are weighted by √G before the whitened SVD
            # and every module's error is in the same unit: loss.
            scale = gradients[name].double().clamp_min(0).sqrt().to(W.device)
            errors[name] = _tail_errors(_whitened_spectrum(scale[:, None] * W, stats[name].gram))
    dense = sum(o * i for o, i in shapes.values())
    budget = int(keep * dense)
    ranks = _allocate_ranks(errors, shapes, budget)
    total = {n: float(errors[n][0]) or 1.0 for n in names}
    rows = [
        PlanRow(
            n,
            shapes[n],
            "dense" if ranks[n] is None else ranks[n],
            shapes[n][0] * shapes[n][1] if ranks[n] is None else ranks[n] * sum(shapes[n]),
            0.0 if ranks[n] is None else float(errors[n][ranks[n]]) / total[n],
        )
        for n in names
    ]
    compressed = [r for r in ranks.values() if r is not None]
    base = max(set(compressed), key=compressed.count)
    overrides = {re.escape(n): {"rank": r} for n, r in ranks.items() if r not in (None, base)}
    stage = {"method": "lowrank", "targets": targets, "rank": base, "criterion": criterion}
    kept_dense = [n for n, r in ranks.items() if r is None]
    if kept_dense:
        stage["exclude"] = "|".join(re.escape(n) for n in kept_dense)
    if overrides:
        stage["overrides"] = overrides
    return Plan(Recipe.load({"stages": [stage]}), rows, budget, dense)


def _block_of(name: str) -> str:
    """The block a module belongs to: its name up to the first numeric component."""
    match = re.match(r"^(.*?\.\d+)\.", name)
    return match.group(1) if match else name


def _plan_prune(model, names, targets, stats, keep, criterion, owl_lambda, outlier_factor) -> Plan:
    sparsity = 1.0 - keep
    blocks: dict[str, list[str]] = {}
    for name in names:
        blocks.setdefault(_block_of(name), []).append(name)
    outliers, sizes = {}, {}
    for block, members in blocks.items():
        scores = [
            wanda_scores(
                dense_weight_of(model.get_submodule(n)).detach(), stats[n].input_norm
            ).flatten()
            for n in members
        ]
        flat = torch.cat(scores).float()
        outliers[block] = float((flat > outlier_factor * flat.mean()).float().mean())
        sizes[block] = flat.numel()
    mean = sum(outliers.values()) / len(outliers)
    spread = max(abs(d - mean) for d in outliers.values()) or 1.0
    raw = {b: sparsity - owl_lambda * (d - mean) / spread for b, d in outliers.items()}
    total = sum(sizes.values())
    shift = sparsity - sum(raw[b] * sizes[b] for b in raw) / total  # meet the pruned count
    per_block = {b: min(0.99, max(0.0, s + shift)) for b, s in raw.items()}
    rows = []
    for block, members in blocks.items():
        for name in members:
            W = dense_weight_of(model.get_submodule(name))
            n = W.numel()
            rows.append(
                PlanRow(name, tuple(W.shape), per_block[block], n - round(per_block[block] * n))
            )
    overrides = {re.escape(b) + r"\..*": {"sparsity": round(s, 6)} for b, s in per_block.items()}
    stage = {
        "method": "prune",
        "targets": targets,
        "sparsity": round(sparsity, 6),
        "criterion": criterion,
        "overrides": overrides,
    }
    dense = total
    return Plan(Recipe.load({"stages": [stage]}), rows, int(keep * dense), dense)


def _pruning_errors(
    W: torch.Tensor, gram: torch.Tensor, row_weight: torch.Tensor | None
) -> torch.Tensor:
    """e(k) for k = 0 … in: the estimated error when every row prunes its k least salient weights.

    OBS saliency of w_ji: w_ji²/[H⁻¹]_ii (H = X·Xᵀ dampened as SparseGPT does), times the row's
    weight G_j. Summing single-weight saliencies ignores how removals interact (OBS's joint error
    is w_Pᵀ([H⁻¹]_PP)⁻¹w_P), so it is an estimate; the allocation only compares modules with it.
    """
    H = _damped(gram, 0.01)  # as SparseGPT dampens
    hinv_diag = torch.cholesky_inverse(torch.linalg.cholesky(H)).diagonal()
    saliency = W.double().to(H.device).square() / hinv_diag[None, :]
    if row_weight is not None:
        saliency = saliency * row_weight.double().to(H.device)[:, None]
    step = saliency.sort(dim=1).values.sum(0)  # the k-th prune of every row, non-decreasing in k
    return torch.cat([step.new_zeros(1), step.cumsum(0)]).cpu()


def _allocate_sparsity(
    errors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], prune: int
) -> dict[str, int]:
    """Weights pruned per row, k_m, with Σ out_m·k_m ≥ ``prune`` and least Σ_m e_m(k_m).

    Each module prunes while its marginal error per pruned weight is ≤ λ (e_m is convex in k), and
    λ is bisected to the smallest value that prunes enough. k < in, so no module is removed.
    """

    def pruned_at(lam: float) -> dict[str, int]:
        chosen = {}
        for n, (out, inp) in shapes.items():
            marginal = (errors[n][1:] - errors[n][:-1]) / out
            chosen[n] = min(int((marginal <= lam).sum()), inp - 1)
        return chosen

    def total(chosen: dict[str, int]) -> int:
        return sum(shapes[n][0] * k for n, k in chosen.items())

    most = max(float(e[-1] - e[-2]) / shapes[n][0] for n, e in errors.items()) + 1.0
    if total(pruned_at(most)) < prune:
        raise InvalidParameterError("keep: below what pruning all but one weight per row leaves")
    lo, hi = -1.0, most
    for _ in range(200):
        mid = (lo + hi) / 2
        if total(pruned_at(mid)) >= prune:
            hi = mid
        else:
            lo = mid
    return pruned_at(hi)


def _plan_prune_saliency(model, names, targets, stats, keep, criterion, gradients) -> Plan:
    shapes, errors = {}, {}
    for name in names:
        W = dense_weight_of(model.get_submodule(name)).detach()
        shapes[name] = (W.shape[0], W.shape[1])
        row_weight = None if gradients is None else gradients[name]
        errors[name] = _pruning_errors(W, stats[name].gram, row_weight)
        if gradients is None:  # compare relative output errors: divide by ‖W·X‖²
            errors[name] = errors[name] / float(
                ((W.double() @ stats[name].gram.double()) * W.double()).sum()
            )
    dense = sum(o * i for o, i in shapes.values())
    pruned = _allocate_sparsity(errors, shapes, dense - int(keep * dense))
    sparsity = {n: pruned[n] / shapes[n][1] for n in names}
    rows = [
        PlanRow(n, shapes[n], sparsity[n], shapes[n][0] * (shapes[n][1] - pruned[n])) for n in names
    ]
    values = list(sparsity.values())
    base = max(set(values), key=values.count)
    stage = {"method": "prune", "targets": targets, "sparsity": base, "criterion": criterion}
    overrides = {re.escape(n): {"sparsity": s} for n, s in sparsity.items() if s != base}
    if overrides:
        stage["overrides"] = overrides
    return Plan(Recipe.load({"stages": [stage]}), rows, int(keep * dense), dense)


def plan_recipe(
    model: nn.Module,
    calibration: Any,
    *,
    keep: float,
    targets: str,
    method: Literal["lowrank", "prune"] = "lowrank",
    criterion: str | None = None,
    owl_lambda: float = 0.08,
    outlier_factor: float = 5.0,
    weighting: Literal["loss", "output"] = "loss",
    allocation: Literal["saliency", "owl"] = "saliency",
    progress: bool = True,
) -> Plan:
    """Allocate per-layer ranks or sparsities so the targeted modules keep ``keep`` of their
    parameters, from measurements on ``calibration`` data.

    Args:
        model: the dense model (not changed).
        calibration: calibration data in any form ``compress_model`` accepts.
        keep: fraction of the targeted modules' parameters to keep, in (0, 1).
        targets: regex (re.fullmatch) of the modules to compress.
        method: ``"lowrank"`` (ranks from whitened spectra) or ``"prune"`` (sparsities).
        criterion: the recipe's criterion; default for ``lowrank`` the one whose objective the
            ranks were allocated for (``"fisher_whitened"`` with ``weighting="loss"``,
            ``"whitened"`` with ``"output"``), for ``prune`` ``"sparsegpt"`` (saliency) or
            ``"wanda"`` (OWL).
        owl_lambda: OWL's maximal deviation of a block's sparsity from the target.
        outlier_factor: OWL's M: a score is an outlier above M × its block's mean.
        weighting: ``lowrank`` and saliency pruning. ``"loss"``: each module's output error is
            weighted by the squared loss gradients of its outputs (one backward pass per
            calibration batch), so errors of different modules are compared by what they cost
            the loss; ``"output"``: every module's relative output error counts the same.
        allocation: ``prune`` only: ``"saliency"`` (per-module sparsities from OBS saliencies,
            for ``sparsegpt``; on SmolLM2 at 50% it beat uniform and OWL sparsities) or
            ``"owl"`` (block sparsities from outlier ratios).
        progress: progress bars.

    Returns:
        A :class:`Plan`; ``plan.recipe`` goes to ``compress_model(model, plan.recipe,
        calibration=...)`` and ``plan.recipe.to_yaml()`` saves it.
    """
    if not 0.0 < keep < 1.0:
        raise InvalidParameterError(f"keep={keep!r}: expected a fraction in (0, 1)")
    if method not in ("lowrank", "prune"):
        raise InvalidParameterError(f"method={method!r}: expected 'lowrank' or 'prune'")
    if weighting not in ("loss", "output"):
        raise InvalidParameterError(f"weighting={weighting!r}: expected 'loss' or 'output'")
    if allocation not in ("owl", "saliency"):
        raise InvalidParameterError(f"allocation={allocation!r}: expected 'owl' or 'saliency'")
    names = _targets(model, targets)
    batches = calibration_batches(calibration)
    measured = method == "lowrank" or allocation == "saliency"
    stats = _dense_stats(model, names, batches, gram=measured, progress=progress)
    gradients = None
    if measured and weighting == "loss":
        gradients = output_gradient_energy(model, batches, names)
    if method == "lowrank":
        # the modules are then factorized with the objective the ranks were allocated for
        default = "whitened" if gradients is None else "fisher_whitened"
        return _plan_lowrank(model, names, targets, stats, keep, criterion or default, gradients)
    if allocation == "saliency":
        return _plan_prune_saliency(
            model, names, targets, stats, keep, criterion or "sparsegpt", gradients
        )
    return _plan_prune(
        model, names, targets, stats, keep, criterion or "wanda", owl_lambda, outlier_factor
    )
