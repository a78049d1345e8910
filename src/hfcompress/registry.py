"""The method registry: one registration per method, and everything generic is derived from it.

A method (``prune``, ``lowrank``, ``kronecker``, and the structured ones) is one package under
``hfcompress.methods`` that registers a :class:`Method`: its pydantic stage (the recipe's
``method: <name>`` entry), its criteria (one builder function each, with the calibration
statistics it needs), the shape rules that validate a stage on a module before anything
changes, the layer classes it makes and their on-disk state format. The recipe's parser, the
validation, ``compress_model``'s dispatch, the calibrated runner, the checkpoint loader, the
report and the CLI choices all ask the registry; none of them names a method.

Example (a complete method; see docs/methods.md):

.. code-block:: python

    register_method(Method(
        name="rowscale",
        stage=RowScaleStage,                      # method: Literal["rowscale"], criterion, ...
        criteria={"absmax": Criterion(build_absmax)},
        plan=plan_rowscale,                       # (stage, Planned) -> Planned, raises on misfit
        layers=(RowScaledLinear,),
    ))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from torch import nn

from hfcompress.errors import RecipeError, RegistrationError
from hfcompress.layers.base import (
    CompressedLayer,
    Planned,
    register_layer_class,
    unregister_layer_class,
)
from hfcompress.stage import StageBase

if TYPE_CHECKING:
    from hfcompress.stats import LayerStats

# What a data-aware criterion needs from calibration, gathered before its builder runs:
#   "inputs"         per-feature norms of the module's inputs (Σx², Σ|x|)
#   "gram"           the inputs' Gram matrix X·Xᵀ (implies "inputs")
#   "weight_fisher"  Σ (∂L/∂W)² per output row, measured on the dense model (FWSVD)
#   "output_fisher"  Σ (∂L/∂y)² per output, measured on the dense model
#   "activations"    a model-scope method runs the model on calibration data itself
#   "gradients"      a model-scope method needs the loss gradients of the weights it scores
Need = Literal["inputs", "gram", "weight_fisher", "output_fisher", "activations", "gradients"]
NEEDS: tuple[Need, ...] = (
    "inputs",
    "gram",
    "weight_fisher",
    "output_fisher",
    "activations",
    "gradients",
)
ROW_WEIGHT_NEEDS: tuple[Need, ...] = ("weight_fisher", "output_fisher")

Builder = Callable[[nn.Module, StageBase, "LayerStats | None"], nn.Module]
Scope = Literal["layer", "model"]


@dataclass(frozen=True)
class Criterion:
    """One way to build a method's layer.

    Attributes:
        build: for a layer-scope method, ``build(module, stage, stats) -> new module``;
            ``module`` is what the stage meets (a dense Linear/Conv1D, or an earlier stage's
            layer), ``stage`` has the module's overrides applied, ``stats`` is None for a
            data-free criterion. It must not modify ``module``. For a model-scope method, the
            function the method's ``transform`` calls to score what it removes (its signature
            is the method's own).
        needs: the calibration statistics it needs; empty for a data-free criterion.
    """

    build: Builder | Callable[..., Any]
    needs: frozenset[Need] = frozenset()

    def __post_init__(self) -> None:
        unknown = set(self.needs) - set(NEEDS)
        if unknown:
            raise RegistrationError(f"Criterion.needs: unknown {sorted(unknown)}; known: {NEEDS}")

    @property
    def data_free(self) -> bool:
        return not self.needs


PlanRule = Callable[[StageBase, Planned], Planned]


@dataclass
class ModelContext:
    """What a model-scope method's ``transform`` is given besides the model and its stage.

    Attributes:
        where: the stage's place in the recipe, for messages (``"stages[0](width)"``).
        batches: calibration batches (``hfcompress.runner.Batch``), or None.
        journal: every change goes through it (``journal.setattr``), so that a failure
            anywhere in ``compress_model`` puts the model back exactly.
        progress: whether to show progress bars.
        exclude: the recipe's ``exclude`` regex (the stage's own is on the stage).
    """

    where: str
    batches: list[dict[str, Any]] | None
    journal: Any  # hfcompress.structured.Journal (a later layer)
    progress: bool = True
    exclude: str | None = None


@dataclass
class StructuredChange:
    """One module a model-scope method changed, for the report."""

    name: str
    method: str
    shape_before: tuple[int, ...]
    shape_after: tuple[int, ...]
    params_before: int
    params_after: int
    settings: dict[str, Any]
    output_error: float | None = None  # relative error of the changed output on calibration


ModelCheck = Callable[[nn.Module, StageBase, ModelContext], list[str]]
ModelTransform = Callable[[nn.Module, StageBase, ModelContext], list[StructuredChange]]


@dataclass(frozen=True)
class Method:
    """Everything hfcompress knows about one method.

    Attributes:
        name: the recipe's ``method:`` value.
        stage: its pydantic stage class (with ``method: Literal[name]`` and ``criterion``).
        criteria: criterion name -> :class:`Criterion`. The stage's ``criterion`` field must
            admit exactly these names.
        plan: (layer scope) validates the stage on a module of the given :class:`Planned`
            shape, using the layers' own constructors on the meta device, and returns what the
            module becomes. Raises ``InvalidParameterError`` naming the field.
        scope: ``"layer"`` (the method replaces Linear/Conv1D modules one by one, through
            ``plan`` and the criteria's builders) or ``"model"`` (structured: the method
            changes the architecture itself, through ``check`` and ``transform``; its stages
            run before any layer-scope stage).
        check: (model scope) ``check(model, stage, context) -> errors``: every problem of the
            stage on this model, each naming the field, without changing anything.
        transform: (model scope) ``transform(model, stage, context) -> changes``: applies
            the stage, every change through ``context.journal``.
        after: the kinds of module the method may act on (``"dense"``, another method's name).
        layers: the layer classes it makes, rebuilt from their specs when loading.
        description: one line for listings (CLI help, docs).
    """

    name: str
    stage: type[StageBase]
    criteria: Mapping[str, Criterion]
    plan: PlanRule | None = None
    after: frozenset[str] = frozenset({"dense"})
    layers: tuple[type[CompressedLayer], ...] = ()
    description: str = ""
    scope: Scope = "layer"
    check: ModelCheck | None = None
    transform: ModelTransform | None = None

    def criterion(self, name: str) -> Criterion:
        """The criterion ``name``.

        Raises:
            RecipeError: unknown name; the message lists this method's criteria.
        """
        try:
            return self.criteria[name]
        except KeyError:
            raise RecipeError(
                f"{self.name}.criterion: unknown {name!r}; known: {sorted(self.criteria)}"
            ) from None


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Make ``method`` known to the recipe, validation, ``compress_model``, checkpoints, the CLI.

    Raises:
        HfCompressError: the name is taken, the stage's ``method`` field does not default to
            the name, or a layer class is already registered to another method.
    """
    if method.name in _METHODS:
        raise RegistrationError(f"register_method: method {method.name!r} is already registered")
    field_info = method.stage.model_fields.get("method")
    if field_info is None or field_info.default != method.name:
        raise RegistrationError(
            f"register_method({method.name!r}): {method.stage.__name__} needs a field "
            f"`method: Literal[{method.name!r}] = {method.name!r}`"
        )
    if not method.criteria:
        raise RegistrationError(f"register_method({method.name!r}): at least one criterion")
    needed = ("plan",) if method.scope == "layer" else ("check", "transform")
    missing = [field for field in needed if getattr(method, field) is None]
    if missing or method.scope not in ("layer", "model"):
        raise RegistrationError(
            f"register_method({method.name!r}): scope {method.scope!r} needs {list(needed)}; "
            f"missing {missing}"
        )
    for layer in method.layers:
        register_layer_class(layer)
    _METHODS[method.name] = method
    return method


def unregister_method(name: str) -> None:
    """Forget a method and its layer classes (for tests that register a temporary one)."""
    method = _METHODS.pop(name, None)
    for layer in method.layers if method else ():
        unregister_layer_class(layer)


def get_method(name: str) -> Method:
    """The method registered as ``name``.

    Raises:
        RecipeError: unknown name; the message lists the known ones.
    """
    try:
        return _METHODS[name]
    except KeyError:
        raise RecipeError(f"unknown method {name!r}; known methods: {method_names()}") from None


def method_names() -> list[str]:
    """The registered methods' names, in registration order."""
    return list(_METHODS)


def methods() -> list[Method]:
    return list(_METHODS.values())


def criterion_of(stage: StageBase) -> Criterion:
    """The :class:`Criterion` a stage uses."""
    return get_method(stage.method_name).criterion(stage.criterion_name)


def needs_calibration(stage: StageBase) -> bool:
    """Whether the stage's criterion needs calibration data."""
    return not criterion_of(stage).data_free


def compositions() -> set[tuple[str, str]]:
    """Every (kind acted on, method) pair the registry allows: ('dense', 'prune'), ..."""
    return {(kind, m.name) for m in _METHODS.values() if m.scope == "layer" for kind in m.after}


def is_model_scope(stage: StageBase) -> bool:
    """Whether the stage's method changes the architecture (a structured method)."""
    return get_method(stage.method_name).scope == "model"
