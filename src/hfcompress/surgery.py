"""``compress_model``: validate a recipe against a model, then swap its modules.

Two phases. *Planning* (``hfcompress.validation.plan_compression``) checks the whole recipe
against the model; nothing is touched until it passes. *Applying* (here) builds each new module
from the current one (weights are copied, never shared) and swaps it in; if anything fails
midway, Ctrl-C included, every swap is undone, so the model is left exactly as it was. The
report is ``hfcompress.report.CompressionReport``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from hfcompress._version import __version__
from hfcompress.calibration import apply_layerwise, calibration_batches
from hfcompress.errors import DecompositionError, HfCompressError, RecipeError
from hfcompress.layers.base import CompressedLayer, count_parameters
from hfcompress.recipe import Recipe
from hfcompress.registry import (
    ModelContext,
    StructuredChange,
    get_method,
    is_model_scope,
    needs_calibration,
)
from hfcompress.report import CompressionReport, ModuleReport
from hfcompress.stage import StageBase
from hfcompress.structured import Journal, structural_differences
from hfcompress.swap import DiskStash, Operation, Swapper
from hfcompress.validation import compressible_modules, plan_compression, tied_modules

__all__ = [
    "QUANT_METHOD",
    "SPEC_FORMAT_VERSION",
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


def _report_settings(module: nn.Module) -> dict[str, Any]:
    return module.report_settings() if isinstance(module, CompressedLayer) else {}


def _iterate(ops: list[Operation], progress: bool) -> Iterator[Operation]:
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
    calibration_device: torch.device | str | None = None,
    keep_originals: Literal["memory", "disk"] = "memory",
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
        calibration_device: with ``calibration``, the device that calibrates, when the model
            lives elsewhere (e.g. ``"cuda"`` for a model in CPU memory larger than the GPU):
            each block moves there to be compressed and back, so the device holds one block
            and its activations. Default: where the model is. The layer criteria only; the
            structured methods (width, heads, depth) calibrate where the model is.
        keep_originals: where the replaced modules wait, in case the run fails or is
            interrupted and the model must be restored: ``"memory"``, or ``"disk"`` (with
            ``calibration``: once a block is compressed, its originals move to memory-mapped
            temporary files, so the model's memory holds the new layers and not both; an undo
            reads them back). The files are deleted when ``compress_model`` returns.

    Returns:
        A :class:`CompressionReport`; ``print(report)`` shows the per-module table.

    Raises:
        RecipeError: the recipe does not parse or does not fit the model (nothing is changed).
        DecompositionError: a decomposition failed while applying; every change is undone.

    Example:
        >>> report = compress_model(model, {"stages": [
        ...     {"method": "lowrank", "targets": r".*mlp\\..*", "ratio": 0.5}]})
        >>> print(report)
    """
    recipe = Recipe.load(recipe)
    batches = (
        None if calibration is None else calibration_batches(calibration, calibration_batch_size)
    )
    journal = Journal()
    structured = _structured_stages(recipe, batches, journal, progress)
    if structured:
        _check_structured(model, structured)
        ops, skipped = [], []
    else:
        ops, skipped = plan_compression(model, recipe, calibrated=batches is not None)
    report = CompressionReport(dry_run=dry_run)
    report.model_params_before = count_parameters(model)
    if keep_originals not in ("memory", "disk"):
        raise RecipeError(
            f"compress_model: keep_originals={keep_originals!r}; expected 'memory' or 'disk'"
        )
    stash = DiskStash() if keep_originals == "disk" else None
    applier = Swapper(model, swap=True, stash=stash)
    changes: list[StructuredChange] = []
    where = "before any module was replaced"
    try:
        with torch.no_grad():
            for stage, context in structured:
                where = f"in {context.where}"
                changes += get_method(stage.method_name).transform(model, stage, context)
            if structured:
                where = "after the structured stages, planning the others"
                ops, skipped = plan_compression(model, recipe, calibrated=batches is not None)
            calibrated = any(needs_calibration(op.stage) for op in ops)
            # The layer-by-layer pass must really swap modules so later blocks see them; a dry
            # run then undoes everything, exactly as a failure does.
            applier.swap = not dry_run or calibrated or bool(structured)
            if calibrated:
                apply_layerwise(
                    model, ops, batches, applier, progress, true_sequential, calibration_device
                )
            else:
                for op in _iterate(ops, progress):
                    applier.apply(op)
    except BaseException as error:
        # Anything at all, Ctrl-C included: put every original module back first.
        applier.undo()
        journal.undo()
        if stash is not None:
            stash.close()
        op = applier.last
        if op is not None:
            where = (
                f"on module {op.module_name!r} in stages[{op.stage_index}] ({op.stage.method_name})"
            )
        if isinstance(error, RecipeError) or not _is_decomposition_failure(error):
            # Interrupts, out-of-memory and programming errors propagate as themselves.
            _add_note(error, f"hfcompress: compress_model stopped {where}; model restored")
            raise
        raise DecompositionError(
            f"compress_model: failed {where}; the model was restored unchanged: {error}"
        ) from error
    report.skipped = skipped
    report.modules = [_structured_row(change) for change in changes] + _report_rows(applier)
    saved = sum(m.params_before - m.params_after for m in report.modules)
    report.model_params_after = report.model_params_before - saved
    if dry_run:
        applier.undo()
        journal.undo()
    else:
        record_compression(model)
    if stash is not None:
        stash.close()
    return report


def _structured_stages(
    recipe: Recipe, batches: list | None, journal: Journal, progress: bool
) -> list[tuple[StageBase, ModelContext]]:
    """The recipe's model-scope stages with their contexts; they must come first.

    Raises:
        RecipeError: a structured stage after a per-Linear one (whose modules it would change).
    """
    found: list[tuple[StageBase, ModelContext]] = []
    first_layer: str | None = None
    for index, stage in enumerate(recipe.stages):
        where = f"stages[{index}]({stage.method_name})"
        if not is_model_scope(stage):
            first_layer = first_layer or where
            continue
        if first_layer is not None:
            raise RecipeError(
                f"{where}: {stage.method_name!r} changes the architecture, so it must come "
                f"before every per-Linear stage; move it before {first_layer}"
            )
        found.append((stage, ModelContext(where, batches, journal, progress, recipe.exclude)))
    return found


def _check_structured(model: nn.Module, structured: list[tuple[StageBase, ModelContext]]) -> None:
    """Every structured stage checked against the model as it is, before anything changes."""
    errors = []
    for stage, context in structured:
        errors += get_method(stage.method_name).check(model, stage, context)
    if errors:
        shown = errors[:20] + ([f"... and {len(errors) - 20} more"] if len(errors) > 20 else [])
        raise RecipeError("recipe does not fit the model:\n  " + "\n  ".join(shown))


def _structured_row(change: StructuredChange) -> ModuleReport:
    return ModuleReport(
        name=change.name,
        methods=[change.method],
        shape=change.shape_before,
        shape_after=change.shape_after,
        source="structured",
        params_before=change.params_before,
        params_after=change.params_after,
        settings=change.settings,
        rel_error=None,
        output_error=change.output_error,
    )


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


def _report_rows(applier: Swapper) -> list[ModuleReport]:
    applier.settle()  # the modules not settled block by block (data-free, outside the stack)
    rows = []
    for name, new in applier.current.items():
        facts = applier.facts[name]
        rows.append(
            ModuleReport(
                name=name,
                methods=applier.methods[name],
                shape=facts.shape,
                source=new.source,
                params_before=facts.params_before,
                params_after=count_parameters(new),
                settings=_report_settings(new),
                rel_error=facts.rel_error,
                output_error=facts.output_error,
            )
        )
    return rows


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
    shapes, settings = structural_differences(model)
    if not (specs or shapes or settings):
        # Structured compression only, every layer alike: the config alone describes the
        # model, which saves as a plain checkpoint that loads anywhere.
        make_plain(model)
        return
    config.quantization_config = {
        "quant_method": QUANT_METHOD,
        "format_version": SPEC_FORMAT_VERSION,
        "hfcompress_version": __version__,
        "modules": specs,
        **({"shapes": shapes} if shapes else {}),
        **({"settings": settings} if settings else {}),
    }
    for hook in _RECORD_HOOKS:
        hook(model)


def make_plain(model: nn.Module) -> None:
    """Forget hfcompress's ``quantization_config`` and quantizer: a plain transformers model."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
