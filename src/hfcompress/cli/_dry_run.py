"""``compress --dry-run`` without decompositions: validation and parameter counts only.

``plan_compression`` validates the recipe and lists its operations, each with the module's
settings (overrides applied). The parameters each module keeps follow from those settings and
its shape alone, by the rules the layers and builders follow:

* low rank r of W [out, in]: r·(out + in), r = the stage's ``rank`` or
  ``rank_for_ratio(out, in, ratio)``; an ``energy`` threshold needs the spectrum (unknown here);
* pruning: ``round(sparsity·n)`` of the n weights go (at most n − 1): over the whole matrix for
  ``magnitude``, in every row for ``wanda`` and ``sparsegpt``; N:M keeps N of every M;
  after low rank, U [out, r] and V [r, in] are pruned each;
* Kronecker, k terms with A (m1, n1): k·(m1·n1 + (out/m1)·(in/n1));

plus the bias. ``tests/cli`` checks every count against a real compression. This is
method-specific knowledge that belongs with each method (a registry hook giving a stage's
parameter count on a planned shape); it lives here until the library offers one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.table import Table
from torch import nn

from hfcompress import CompressedLayer, LowRankLinear
from hfcompress.decompose import rank_for_ratio
from hfcompress.evaluation import count_parameters
from hfcompress.layers import dense_weight_of, module_spec

PER_ROW_CRITERIA = frozenset({"wanda", "sparsegpt"})  # prune round(sparsity·in) in every row


@dataclass
class PlannedModule:
    """One module of a dry run: what the recipe would make of it."""

    name: str
    methods: list[str]
    shape: tuple[int, int]  # [out, in]
    params_before: int
    params_after: int | None  # None: it depends on the weights (an energy-chosen rank)
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class DryRun:
    """Every planned module, the tied modules skipped, and the whole model's count before."""

    modules: list[PlannedModule]
    skipped: list[tuple[str, str]]
    model_params_before: int

    @property
    def known(self) -> bool:
        return all(m.params_after is not None for m in self.modules)

    @property
    def params_before(self) -> int:
        return sum(m.params_before for m in self.modules)

    @property
    def params_after(self) -> int:
        return sum(m.params_after or 0 for m in self.modules)

    @property
    def model_params_after(self) -> int:
        return self.model_params_before - self.params_before + self.params_after

    def table(self) -> Table:
        table = Table(
            title="hfcompress: dry run, nothing changed (validation and parameter counts; "
            "--estimate-errors also runs the decompositions for their errors)"
        )
        for col in ["module", "method", "W [out, in]", "params before", "params after", "setting"]:
            table.add_column(col, justify="right" if "params" in col else "left")
        for m in self.modules:
            table.add_row(
                m.name,
                "+".join(m.methods),
                f"[{m.shape[0]}, {m.shape[1]}]",
                f"{m.params_before:,}",
                "?" if m.params_after is None else f"{m.params_after:,}",
                ", ".join(f"{k}={v}" for k, v in m.settings.items()),
            )
        if self.known:
            ratio = self.params_before / max(self.params_after, 1)
            caption = [
                f"{len(self.modules)} modules: {self.params_before:,} → {self.params_after:,} "
                f"parameters ({ratio:.2f}x)",
                f"whole model: {self.model_params_before:,} → {self.model_params_after:,} "
                f"({self.model_params_before / max(self.model_params_after, 1):.2f}x)",
            ]
        else:
            unknown = sum(m.params_after is None for m in self.modules)
            caption = [
                f"{len(self.modules)} modules, {self.params_before:,} parameters before; "
                f"{unknown} (?) depend on the weights (a rank chosen by energy needs the SVD): "
                "pass --estimate-errors for their counts"
            ]
        caption += [f"skipped {name}: {reason}" for name, reason in self.skipped]
        table.caption = "\n".join(caption)
        return table


def _pruned(numel: int, sparsity: float) -> int:
    """How many of ``numel`` weights a sparsity prunes (``decompose.masks.pruned_count``)."""
    return min(round(sparsity * numel), numel - 1)


def _kept(rows: int, cols: int, params: dict[str, Any], per_row: bool) -> int:
    pattern = params["pattern"]
    if pattern != "unstructured":
        n, m = (int(v) for v in pattern.split(":"))
        return rows * cols // m * n
    if per_row:
        return rows * (cols - _pruned(cols, params["sparsity"]))
    return rows * cols - _pruned(rows * cols, params["sparsity"])


@dataclass
class _State:
    kind: str
    out_features: int
    in_features: int
    bias: int  # out_features when the module has a bias, else 0
    rank: int | None = None


def _state_of(module: nn.Module) -> _State:
    if isinstance(module, CompressedLayer):
        bias = module.out_features if module_spec(module).get("bias") else 0
        rank = module.rank if isinstance(module, LowRankLinear) else None
        return _State(module.method, module.out_features, module.in_features, bias, rank)
    out_features, in_features = dense_weight_of(module).shape
    bias = out_features if getattr(module, "bias", None) is not None else 0
    return _State("dense", out_features, in_features, bias)


def _after(op: Any, state: _State) -> int | None:
    """The parameters the module keeps after ``op``; updates ``state`` to what it becomes."""
    stage, out_f, in_f = op.stage, state.out_features, state.in_features
    method, params = stage.method, stage.layer_params()
    if method == "lowrank":
        rank = params.get("rank")
        if rank is None and "ratio" in params:
            rank = rank_for_ratio(out_f, in_f, params["ratio"])
        state.kind, state.rank = "lowrank", rank
        return None if rank is None else rank * (out_f + in_f) + state.bias
    if method == "prune" and state.kind == "lowrank":
        if state.rank is None:
            return None
        r = state.rank
        return _kept(out_f, r, params, False) + _kept(r, in_f, params, False) + state.bias
    if method == "prune":
        state.kind = "prune"
        per_row = stage.criterion_name in PER_ROW_CRITERIA
        return _kept(out_f, in_f, params, per_row) + state.bias
    if method == "kronecker":
        state.kind = "kronecker"
        m1, n1 = params["a_shape"]
        return params["terms"] * (m1 * n1 + (out_f // m1) * (in_f // n1)) + state.bias
    state.kind = method
    return None  # a method this table does not know yet


def dry_run(model: nn.Module, ops: Sequence[Any], skipped: list[tuple[str, str]]) -> DryRun:
    """The planned modules of ``ops`` (from ``plan_compression``), in first-operation order."""
    modules: dict[str, PlannedModule] = {}
    states: dict[str, _State] = {}
    for op in ops:
        name = op.module_name
        if name not in modules:
            module = model.get_submodule(name)
            states[name] = _state_of(module)
            modules[name] = PlannedModule(
                name=name,
                methods=[],
                shape=(states[name].out_features, states[name].in_features),
                params_before=count_parameters(module).nonzero,
                params_after=None,
            )
        planned, state = modules[name], states[name]
        prefix = "factor_" if state.kind == "lowrank" else ""
        after = _after(op, state)
        known = after is not None and (not planned.methods or planned.params_after is not None)
        planned.params_after = after if known else None
        planned.methods.append(op.stage.method)
        planned.settings.update(
            {prefix + k: v for k, v in op.stage.layer_params().items() if v is not None}
        )
        if op.stage.method == "lowrank" and state.rank is not None:
            planned.settings["rank"] = state.rank
    return DryRun(list(modules.values()), skipped, count_parameters(model).nonzero)
