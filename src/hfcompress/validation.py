"""Validation of a recipe against a model, before anything changes (``plan_compression``).

The recipe is walked over a description of the model's modules (shapes, and what each earlier
stage would have made of them); every setting is checked: targets that match, shapes that
divide, ranks that fit, compositions that exist. Structural checks reuse the layers' own
constructors on the meta device, so a recipe is held to exactly the rules the layers enforce.
"""

from __future__ import annotations

from torch import nn

from hfcompress.calibration import layer_stack
from hfcompress.errors import HfCompressError, InvalidParameterError
from hfcompress.layers.base import CompressedLayer, Planned, dense_weight_of, source_kind
from hfcompress.matching import fullmatch, select
from hfcompress.recipe import Recipe, RecipeError
from hfcompress.registry import compositions, get_method, is_model_scope, needs_calibration
from hfcompress.stage import StageBase
from hfcompress.swap import Operation


def _is_dense(module: nn.Module) -> bool:
    try:
        source_kind(module)
    except HfCompressError:
        return False
    return True


def planned_of(module: nn.Module) -> Planned | None:
    """What validation sees of a module: a dense Linear/Conv1D or a compressed layer's plan."""
    if isinstance(module, CompressedLayer):
        return module.planned()
    if _is_dense(module):
        W = dense_weight_of(module)
        return Planned("dense", W.shape[0], W.shape[1])
    return None


def compressible_modules(model: nn.Module) -> list[str]:
    """Names of the modules a recipe can target: Linear/Conv1D and compressed layers (not their
    insides), in ``named_modules`` order. Tied ones are included; see :func:`tied_modules`."""
    return list(_units(model))


def _units(model: nn.Module) -> dict[str, Planned]:
    """Modules a stage may act on: Linear/Conv1D and compressed layers (not their insides)."""
    units: dict[str, Planned] = {}
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        virtual = planned_of(module)
        if virtual is not None:
            units[name] = virtual
            inside.append(name)
    return units


def tied_modules(model: nn.Module) -> dict[str, str]:
    """Module name -> the module its weight is shared with (e.g. lm_head -> embed_tokens)."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        # Only a registered parameter can be shared: a computed ``weight`` (LowRankLinear's U·V)
        # is a fresh tensor on every read, and ids of freed temporaries are reused.
        weight = module._parameters.get("weight")
        if weight is not None:
            owners.setdefault(id(weight), []).append(name)
    tied: dict[str, str] = {}
    for names in owners.values():
        for name in names:
            others = [n for n in names if n != name]
            if others:
                tied[name] = others[0]
    return tied


def _excluded(name: str, recipe: Recipe, stage: StageBase) -> bool:
    return any(
        pattern is not None and fullmatch(pattern, name, "exclude")
        for pattern in (recipe.exclude, stage.exclude)
    )


def _check_op(op: Operation, planned: Planned) -> Planned:
    """Validate one stage on one module against its shape; return what the module becomes.

    The composition rule comes from the registry (the methods' ``after``); the shape rules
    from the method's ``plan``, which reuses the layers' own constructors on the meta device.
    """
    method = get_method(op.stage.method_name)
    if planned.kind not in method.after or planned.info.get("factors_compressed"):
        before = planned.kind + (
            " with compressed factors" if planned.info.get("factors_compressed") else ""
        )
        supported = ", ".join(f"{m} after {k}" for k, m in sorted(compositions()))
        raise InvalidParameterError(
            f"method: {method.name!r} after {before!r} is not supported; supported: {supported}"
        )
    return method.plan(op.stage, planned)


def plan_compression(
    model: nn.Module, recipe: Recipe | dict | str, *, calibrated: bool = False
) -> tuple[list[Operation], list[tuple[str, str]]]:
    """Validate the whole recipe against the model without changing it.

    Args:
        model: the model.
        recipe: the recipe (dict, :class:`Recipe` or path).
        calibrated: whether calibration data will be given; criteria that need it are refused
            otherwise.

    Structured (model-scope) stages are not planned here: they change the model's shapes, so
    ``compress_model`` checks and applies them first and then plans the rest on the result.

    Returns:
        The operations in order, and the (module, reason) pairs skipped (tied weights).

    Raises:
        RecipeError: every problem found, each naming the stage, the module and the field.
    """
    recipe = Recipe.load(recipe)
    units = _units(model)
    tied = tied_modules(model)
    ops: list[Operation] = []
    skipped: dict[str, str] = {}
    errors: list[str] = []
    per_module: dict[tuple[str, str], list[str]] = {}  # (stage, message) -> modules
    for index, stage in enumerate(recipe.stages):
        if is_model_scope(stage):
            continue  # structured stages: checked and applied by compress_model, first
        where = f"stages[{index}]({stage.method_name})"
        targeted = select(stage.targets, units, f"{where}.targets")
        matched = [n for n in targeted if not _excluded(n, recipe, stage)]
        eligible = []
        for name in matched:
            if name in tied:
                skipped[name] = (
                    f"weight tied to {tied[name]}; compressing it would untie them "
                    "(exclude it, or untie the weights first)"
                )
            else:
                eligible.append(name)
        if not eligible:
            errors.append(_no_match_message(where, stage.targets, units, targeted, matched))
            continue
        for name in eligible:
            op = Operation(index, stage.settings_for(name), name, units[name].kind)
            try:
                _check_criterion(op, calibrated)
                units[name] = _check_op(op, units[name])
            except (InvalidParameterError, RecipeError) as error:
                per_module.setdefault((where, str(error)), []).append(name)
                continue
            ops.append(op)
    errors += [_module_message(w, m, names) for (w, m), names in per_module.items()]
    errors += _check_layer_stack(model, ops)
    if errors:
        shown = errors[:20] + ([f"... and {len(errors) - 20} more"] if len(errors) > 20 else [])
        raise RecipeError("recipe does not fit the model:\n  " + "\n  ".join(shown))
    return ops, list(skipped.items())


def _module_message(where: str, message: str, names: list[str]) -> str:
    """One line for a problem, however many modules of the stage share it."""
    if len(names) == 1:
        return f"{where}, module {names[0]!r}: {message}"
    few = ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
    return f"{where}, {len(names)} modules ({few}): {message}"


def _check_criterion(op: Operation, calibrated: bool) -> None:
    stage = op.stage
    if not needs_calibration(stage):
        return
    if not calibrated:
        raise RecipeError(
            f"criterion: {stage.criterion_name!r} needs calibration data; pass "
            "compress_model(model, recipe, calibration=...) or use a data-free criterion"
        )
    if op.acts_on != "dense":
        raise RecipeError(
            f"criterion: {stage.criterion_name!r} acts on a dense Linear/Conv1D; after "
            f"{op.acts_on!r} only the data-free criterion is supported"
        )


def _check_layer_stack(model: nn.Module, ops: list[Operation]) -> list[str]:
    names = sorted({op.module_name for op in ops if needs_calibration(op.stage)})
    if not names:
        return []
    try:
        layer_stack(model, names)
    except HfCompressError as error:
        return [f"criterion: {error}"]
    return []


def _no_match_message(
    where: str, targets: str, units: dict[str, Planned], targeted: list[str], matched: list[str]
) -> str:
    if matched:
        return f"{where}.targets: {targets!r} matches only tied modules {matched}"
    if targeted:
        few = targeted[:4] + (["..."] if len(targeted) > 4 else [])
        return (
            f"{where}.targets: {targets!r} matches {len(targeted)} modules, all excluded by "
            f"`exclude` (the recipe's or the stage's), e.g. {few}"
        )
    examples = list(units)[:6]
    return (
        f"{where}.targets: {targets!r} fully matches no Linear/Conv1D or compressed module "
        f"(re.fullmatch on qualified names); eligible modules look like {examples}"
    )
