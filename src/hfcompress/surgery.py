"""``compress_model``: validate a recipe against a model, then swap its modules.

Two phases. *Planning* (``hfcompress.validation.plan_compression``) checks the whole recipe
against the model; nothing is touched until it passes. *Applying* (here) builds each new module
from the current one (weights are copied, never shared) and swaps it in; if anything fails
midway, Ctrl-C included, every swap is undone, so the model is left exactly as it was. The
report is ``hfcompress.report.CompressionReport``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from hfcompress._version import __version__
from hfcompress.calibration import (
    Batch,
    InputStats,
    build_calibrated,
    calibration_batches,
    collect_stats,
    fisher_row_importance,
    forward_groups,
    layer_stack,
    output_gradient_energy,
    run_layerwise,
)
from hfcompress.errors import HfCompressError
from hfcompress.layers import (
    CompressedLayer,
    LowRankLinear,
    PrunedLinear,
    dense_weight_of,
    get_layer_class,
    module_spec,
)
from hfcompress.recipe import GRAM_CRITERIA, Recipe
from hfcompress.report import CompressionReport, ModuleReport
from hfcompress.validation import (
    SUPPORTED_COMPOSITIONS,
    _Op,
    compressible_modules,
    plan_compression,
    tied_modules,
)

__all__ = [
    "QUANT_METHOD",
    "SPEC_FORMAT_VERSION",
    "SUPPORTED_COMPOSITIONS",
    "CompressionReport",
    "ModuleReport",
    "compress_model",
    "compressible_modules",
    "compression_spec",
    "plan_compression",
    "record_compression",
    "register_record_hook",
    "tied_modules",
]

SPEC_FORMAT_VERSION = 1
QUANT_METHOD = "hfcompress"

# Called with the model after record_compression; the HF integration registers itself here, so
# that this module does not depend on it (imports point from serialization to surgery).
_RECORD_HOOKS: list[Callable[[nn.Module], None]] = []


def register_record_hook(hook: Callable[[nn.Module], None]) -> None:
    """Run ``hook(model)`` whenever a model's compression is recorded in its config."""
    if hook not in _RECORD_HOOKS:
        _RECORD_HOOKS.append(hook)


def _build(op: _Op, current: nn.Module) -> nn.Module:
    """The module that replaces ``current`` for this operation (``current`` is not modified)."""
    params = op.stage.layer_params()
    if op.acts_on == "lowrank" and op.stage.method == "prune":
        shell = LowRankLinear(
            current.in_features,
            current.out_features,
            current.rank,
            bias=current.u.bias is not None,
            source=current.source,
            device="meta",
        )
        shell.u = PrunedLinear.from_module(current.u, **params)
        shell.v = PrunedLinear.from_module(current.v, **params)
        return shell
    return get_layer_class(op.stage.method).from_module(current, **params)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _relative_error(original: torch.Tensor, module: nn.Module) -> float:
    W = original.detach().float()
    W_hat = dense_weight_of(module).detach().float()
    return float(torch.linalg.matrix_norm(W - W_hat) / torch.linalg.matrix_norm(W).clamp_min(1e-30))


def _params(module: nn.Module) -> int:
    if isinstance(module, CompressedLayer):
        if isinstance(module, LowRankLinear):
            return sum(
                c.nonzero_param_count()
                if isinstance(c, CompressedLayer)
                else sum(p.numel() for p in c.parameters())
                for c in (module.u, module.v)
            )
        return module.nonzero_param_count()
    return sum(p.numel() for p in module.parameters())


def _settings(module: nn.Module) -> dict[str, Any]:
    spec = module_spec(module)
    settings = {
        k: v
        for k, v in spec.items()
        if k not in ("method", "in_features", "out_features", "bias", "source", "factors")
    }
    if isinstance(module, LowRankLinear) and isinstance(module.u, PrunedLinear):
        settings.update({f"factor_{k}": v for k, v in module.u.compression_params().items()})
    return settings


def _iterate(ops: list[_Op], progress: bool) -> Iterator[_Op]:
    return iter(
        tqdm(
            ops, desc="hfcompress: decomposing", unit="module", disable=not progress or len(ops) < 2
        )
    )


def compress_model(
    model: nn.Module,
    recipe: Recipe | dict | str,
    *,
    calibration: Any = None,
    dry_run: bool = False,
    progress: bool = True,
    calibration_batch_size: int = 8,
    true_sequential: bool = False,
) -> CompressionReport:
    """Compress ``model`` in place according to ``recipe``.

    Args:
        model: any ``transformers.PreTrainedModel`` (or ``nn.Module``) with Linear/Conv1D layers.
        recipe: a :class:`~hfcompress.recipe.Recipe`, a dict, or a JSON/YAML path.
        calibration: data for the data-aware criteria (``wanda``, ``sparsegpt``, ``whitened``,
            ``activation``, ``fisher``): a LongTensor [n, seq], a list of tokenized examples, a
            ``datasets.Dataset`` with ``input_ids``, or a DataLoader. The model is then
            compressed block by block, each block calibrated on the outputs of the already
            compressed blocks before it (SparseGPT's sequential scheme).
        dry_run: compute everything (including reconstruction errors) but change nothing.
        progress: show progress bars while decomposing / calibrating.
        calibration_batch_size: batch size when ``calibration`` is a tensor.
        true_sequential: with ``calibration``, also compress the modules *inside* a block in
            forward order, each group (q/k/v; o; gate/up; down) calibrated on the outputs of the
            groups before it, already compressed (GPTQ's option). One block forward per group
            instead of one per block; on SmolLM2 it did not lower SparseGPT's perplexity.

    Returns:
        A :class:`CompressionReport`; ``print(report)`` shows the per-module table.

    Raises:
        RecipeError: the recipe does not parse or does not fit the model (nothing is changed).
        HfCompressError: a decomposition failed while applying; every change is undone.

    Example:
        >>> report = compress_model(model, {"stages": [
        ...     {"method": "lowrank", "targets": r".*mlp\\..*", "ratio": 0.5}]})
        >>> print(report)
    """
    batches = (
        None if calibration is None else calibration_batches(calibration, calibration_batch_size)
    )
    ops, skipped = plan_compression(model, recipe, calibrated=batches is not None)
    report = CompressionReport(skipped=skipped, dry_run=dry_run)
    report.model_params_before = _model_params(model)
    calibrated = [op for op in ops if op.stage.needs_calibration]
    # The layer-by-layer pass must really swap modules so later blocks see them; a dry run
    # then undoes everything, exactly as a failure does.
    applier = _Applier(model, swap=not dry_run or bool(calibrated))
    try:
        with torch.no_grad():
            if calibrated:
                _apply_layerwise(model, ops, batches, applier, progress, true_sequential)
            else:
                for op in _iterate(ops, progress):
                    applier.apply(op)
    except BaseException as error:
        # Anything at all, Ctrl-C included: put every original module back first.
        applier.undo()
        op = applier.last
        where = (
            "before any module was replaced"
            if op is None
            else f"on module {op.module_name!r} in stages[{op.stage_index}] ({op.stage.method})"
        )
        if not _is_decomposition_failure(error):
            # Interrupts, out-of-memory and programming errors propagate as themselves.
            _add_note(error, f"hfcompress: compress_model stopped {where}; model restored")
            raise
        raise HfCompressError(
            f"compress_model: failed {where}; the model was restored unchanged: {error}"
        ) from error
    report.modules = applier.report_rows()
    saved = sum(m.params_before - m.params_after for m in report.modules)
    report.model_params_after = report.model_params_before - saved
    if dry_run:
        applier.undo()
    else:
        record_compression(model)
    return report


def _is_decomposition_failure(error: BaseException) -> bool:
    """Whether ``error`` is a module's decomposition failing (reported as an HfCompressError).

    Numerical failures (a singular Cholesky factor, an SVD that does not converge, a bad value)
    are; interrupts, out-of-memory and programming errors (TypeError, AttributeError, ...) are
    not, so that a caller sees them as what they are.
    """
    if isinstance(error, torch.OutOfMemoryError):
        return False
    return isinstance(error, (HfCompressError, ValueError, ArithmeticError, RuntimeError))


def _add_note(error: BaseException, note: str) -> None:
    if hasattr(error, "add_note"):  # Python ≥ 3.11
        error.add_note(note)


class _Applier:
    """Applies operations one by one, remembering what it needs to report and to undo."""

    def __init__(self, model: nn.Module, swap: bool) -> None:
        self.model = model
        self.swap = swap
        self.current: dict[str, nn.Module] = {}  # module name -> its latest replacement
        self.originals: dict[str, nn.Module] = {}
        self.methods: dict[str, list[str]] = {}
        self.stats: dict[str, InputStats] = {}
        self.undo_log: list[tuple[str, nn.Module]] = []
        self.last: _Op | None = None

    def apply(
        self, op: _Op, stats: InputStats | None = None, fisher: torch.Tensor | None = None
    ) -> None:
        self.last = op
        module = self.current.get(op.module_name) or self.model.get_submodule(op.module_name)
        self.originals.setdefault(op.module_name, module)
        if op.stage.needs_calibration:
            new = build_calibrated(op.stage, module, stats, fisher)
            if stats is not None and stats.gram is not None:
                self.stats[op.module_name] = stats
        else:
            new = _build(op, module)
        self.current[op.module_name] = new
        self.methods.setdefault(op.module_name, []).append(op.stage.method)
        if self.swap:
            self.undo_log.append((op.module_name, module))
            _set_module(self.model, op.module_name, new)

    def undo(self) -> None:
        for name, module in reversed(self.undo_log):
            _set_module(self.model, name, module)
        self.undo_log.clear()

    def report_rows(self) -> list[ModuleReport]:
        rows = []
        for name, new in self.current.items():
            original = self.originals[name]
            W = dense_weight_of(original)
            stats = self.stats.get(name)
            rows.append(
                ModuleReport(
                    name=name,
                    methods=self.methods[name],
                    shape=(W.shape[0], W.shape[1]),
                    source=new.source,
                    params_before=_params(original),
                    params_after=_params(new),
                    settings=_settings(new),
                    rel_error=_relative_error(W, new),
                    output_error=None if stats is None else _output_error(W, new, stats.gram),
                )
            )
        return rows


def _apply_layerwise(
    model: nn.Module,
    ops: list[_Op],
    batches: list[Batch],
    applier: _Applier,
    progress: bool,
    true_sequential: bool = False,
) -> None:
    """Apply every operation, the ones inside the layer stack block by block on calibration data."""
    prefix, stack = layer_stack(
        model, sorted({op.module_name for op in ops if op.stage.needs_calibration})
    )

    # Row weights per criterion, from the dense model before anything changes: FWSVD's
    # weight-gradient Fisher ('fisher'), the output-gradient energy G ('fisher_whitened').
    row_weights = {
        criterion: measure(model, batches, names)
        for criterion, measure in (
            ("fisher", fisher_row_importance),
            ("fisher_whitened", output_gradient_energy),
        )
        if (names := sorted({op.module_name for op in ops if op.stage.criterion_name == criterion}))
    }
    by_block: dict[int, list[_Op]] = {}
    outside: list[_Op] = []
    for op in ops:
        index = _block_index(prefix, op.module_name)
        (outside if index is None else by_block.setdefault(index, [])).append(op)

    def compress_block(index: int, block: nn.Module, inputs: list[tuple]) -> None:
        head = f"{prefix}.{index}."
        by_module: dict[str, list[_Op]] = {}
        for op in by_block.get(index, []):
            by_module.setdefault(op.module_name.removeprefix(head), []).append(op)
        gram = {
            name: any(op.stage.criterion_name in GRAM_CRITERIA for op in module_ops)
            for name, module_ops in by_module.items()
            if any(op.stage.needs_calibration for op in module_ops)
        }
        # "True sequential" (the GPTQ option): modules reading the same tensor form a group, and
        # each group is calibrated on the outputs of the groups before it, already compressed
        # (o_proj sees the compressed q/k/v). Otherwise one pass gathers the whole block's stats.
        if not by_module:
            return
        groups = forward_groups(block, inputs, by_module) if true_sequential else [list(by_module)]
        for group in groups:
            wanted = {name: gram[name] for name in group if name in gram}
            stats = collect_stats(block, inputs, wanted) if wanted else {}
            for name in group:
                for op in by_module[name]:  # a module's stages in recipe order
                    rows = row_weights.get(op.stage.criterion_name, {}).get(op.module_name)
                    applier.apply(op, stats.get(name), rows)

    run_layerwise(model, batches, stack, compress_block, progress)
    for op in outside:
        applier.apply(op)


def _block_index(prefix: str, name: str) -> int | None:
    head = prefix + "."
    if not name.startswith(head):
        return None
    index = name[len(head) :].split(".", 1)[0]
    return int(index) if index.isdigit() else None


def _output_error(W: torch.Tensor, module: nn.Module, gram: torch.Tensor) -> float:
    """‖(W − Ŵ)X‖_F / ‖W X‖_F from the Gram matrix G = X·Xᵀ: √tr(Δ G Δᵀ) / √tr(W G Wᵀ)."""
    W32 = W.detach().float().to(gram.device)
    delta = W32 - dense_weight_of(module).detach().float().to(gram.device)
    num = ((delta @ gram) * delta).sum().clamp_min(0).sqrt()
    den = ((W32 @ gram) * W32).sum().clamp_min(1e-30).sqrt()
    return float(num / den)


def _model_params(model: nn.Module) -> int:
    """Parameters of the model, counting only entries of pruned weights that can be non-zero."""
    masked = sum(
        m.mask.numel() - int(m.mask.sum()) for m in model.modules() if isinstance(m, PrunedLinear)
    )
    return sum(p.numel() for p in model.parameters()) - masked  # parameters() counts tied ones once


def compression_spec(model: nn.Module) -> dict[str, Any]:
    """Per-module structure of every compressed layer: {qualified name: layer spec}."""
    specs: dict[str, Any] = {}
    inside: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, CompressedLayer) and not any(
            name.startswith(p + ".") for p in inside
        ):
            specs[name] = module.to_spec()
            inside.append(name)
    return specs


def record_compression(model: nn.Module) -> None:
    """Write the current structure into ``model.config.quantization_config``.

    ``save_pretrained`` stores it in ``config.json``, and ``from_pretrained`` (after
    ``import hfcompress``) rebuilds the modules from it. Call this after changing a layer's
    structure outside ``compress_model`` (the training callbacks do, after ``truncate``).
    """
    config = getattr(model, "config", None)
    if config is None:
        return
    specs = compression_spec(model)
    config.quantization_config = {
        "quant_method": QUANT_METHOD,
        "format_version": SPEC_FORMAT_VERSION,
        "hfcompress_version": __version__,
        "modules": specs,
    }
    for hook in _RECORD_HOOKS:
        hook(model)
