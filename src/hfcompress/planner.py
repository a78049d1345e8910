"""Automatic per-layer budgets: "keep half the parameters" instead of hand-tuning every layer.

:func:`plan_recipe` measures every targeted module on calibration data and returns an ordinary
:class:`~hfcompress.recipe.Recipe` (one stage, per-layer ``overrides``) that a user can read,
edit, save as YAML and pass to ``compress_model``.

* ``lowrank``: with whitening by the Cholesky factor L of X·Xᵀ (SVD-LLM), a rank-r factorization
  of module m leaves the relative output error e_m(r) = Σ_{i>r} σᵢ²(W·L) / Σ σᵢ²(W·L). Each extra
  rank costs (out + in) parameters and removes σ²_{r+1} / Σσ²; the σ² decrease, so handing out
  rank units greedily by removed error per parameter minimizes Σ_m e_m under the budget.
* ``prune``: OWL (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity"): blocks with more
  outlier Wanda scores (|W|·‖X‖ above ``outlier_factor`` × their mean) are pruned less,
  s_l = s − λ·(D_l − D̄)/max|D − D̄|, shifted so the total pruned count meets the target.
"""

from __future__ import annotations

import heapq
import io
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from tqdm.auto import tqdm

from hfcompress.calibration import InputStats, calibration_batches
from hfcompress.decompose.calibrated import wanda_scores
from hfcompress.errors import InvalidParameterError
from hfcompress.layers import dense_weight_of
from hfcompress.recipe import Recipe
from hfcompress.surgery import compressible_modules, tied_modules

_DAMP = 1e-6


@dataclass
class PlanRow:
    """The planned setting of one module."""

    name: str
    shape: tuple[int, int]
    setting: float | int  # rank, or sparsity
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
        console = Console(width=140, record=True, file=io.StringIO())
        console.print(self.table())
        return console.export_text()


def _targets(model: nn.Module, targets: str) -> list[str]:
    tied = tied_modules(model)
    names = [n for n in compressible_modules(model) if re.fullmatch(targets, n) and n not in tied]
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
    stats = {name: InputStats(want_gram=gram) for name in names}
    handles = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda _m, args, s=stats[name]: s.add(args[0])
        )
        for name in names
    ]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc="hfcompress: measuring", disable=not progress):
                model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return stats


def _whitened_spectrum(W: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """σ² of W·L with L the Cholesky factor of X·Xᵀ (damped), normalized to sum 1."""
    H = gram.double()
    H = H + _DAMP * H.diagonal().mean().clamp_min(1e-12) * torch.eye(
        H.shape[0], dtype=H.dtype, device=H.device
    )
    L = torch.linalg.cholesky(H)
    sq = torch.linalg.svdvals(W.double().to(H.device) @ L).square()
    return (sq / sq.sum().clamp_min(1e-300)).float().cpu()


def _allocate_ranks(
    spectra: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], budget: int
) -> dict[str, int]:
    """Greedy: each rank unit to the module removing the most error per parameter."""
    ranks = dict.fromkeys(spectra, 1)
    spent = sum(sum(shapes[n]) for n in spectra)
    if spent > budget:
        raise InvalidParameterError(
            f"keep: the budget of {budget:,} parameters is below rank 1 for every module "
            f"({spent:,}); raise keep"
        )
    cap = {n: max(1, (o * i) // (o + i)) for n, (o, i) in shapes.items()}  # beyond: no saving
    heap = [(-spectra[n][1].item() / sum(shapes[n]), n) for n in spectra if cap[n] > 1]
    heapq.heapify(heap)
    while heap:
        _, name = heapq.heappop(heap)
        cost = sum(shapes[name])
        if spent + cost > budget:
            continue  # a cheaper module may still fit
        ranks[name] += 1
        spent += cost
        r = ranks[name]
        if r < cap[name] and r < len(spectra[name]):
            heapq.heappush(heap, (-spectra[name][r].item() / cost, name))
    return ranks


def _plan_lowrank(model, names, targets, stats, keep, criterion) -> Plan:
    shapes, spectra = {}, {}
    for name in names:
        W = dense_weight_of(model.get_submodule(name)).detach()
        shapes[name] = (W.shape[0], W.shape[1])
        spectra[name] = _whitened_spectrum(W, stats[name].gram)
    dense = sum(o * i for o, i in shapes.values())
    budget = int(keep * dense)
    ranks = _allocate_ranks(spectra, shapes, budget)
    rows = [
        PlanRow(
            n, shapes[n], ranks[n], ranks[n] * sum(shapes[n]), float(spectra[n][ranks[n] :].sum())
        )
        for n in names
    ]
    base = max(set(ranks.values()), key=list(ranks.values()).count)
    overrides = {re.escape(n): {"rank": r} for n, r in ranks.items() if r != base}
    stage = {
        "method": "lowrank",
        "targets": targets,
        "rank": base,
        "criterion": criterion,
    }
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
    progress: bool = True,
) -> Plan:
    """Allocate per-layer ranks or sparsities so the targeted modules keep ``keep`` of their
    parameters, from measurements on ``calibration`` data.

    Args:
        model: the dense model (not changed).
        calibration: calibration data in any form ``compress_model`` accepts.
        keep: fraction of the targeted modules' parameters to keep, in (0, 1).
        targets: regex (re.fullmatch) of the modules to compress.
        method: ``"lowrank"`` (ranks from whitened spectra) or ``"prune"`` (OWL sparsities).
        criterion: the recipe's criterion; default ``"whitened"`` / ``"wanda"``.
        owl_lambda: OWL's maximal deviation of a block's sparsity from the target.
        outlier_factor: OWL's M: a score is an outlier above M × its block's mean.
        progress: progress bars.

    Returns:
        A :class:`Plan`; ``plan.recipe`` goes to ``compress_model(model, plan.recipe,
        calibration=...)`` and ``plan.recipe.to_yaml()`` saves it.
    """
    if not 0.0 < keep < 1.0:
        raise InvalidParameterError(f"keep={keep!r}: expected a fraction in (0, 1)")
    if method not in ("lowrank", "prune"):
        raise InvalidParameterError(f"method={method!r}: expected 'lowrank' or 'prune'")
    names = _targets(model, targets)
    batches = calibration_batches(calibration)
    stats = _dense_stats(model, names, batches, gram=method == "lowrank", progress=progress)
    if method == "lowrank":
        return _plan_lowrank(model, names, targets, stats, keep, criterion or "whitened")
    return _plan_prune(
        model, names, targets, stats, keep, criterion or "wanda", owl_lambda, outlier_factor
    )
