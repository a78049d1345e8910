"""What every recipe stage shares: targets, exclusions, per-layer overrides.

Each method's own settings live in its package (``hfcompress.methods.<name>.config``), as a
subclass of :class:`StageBase` with a ``method: Literal["<name>"]`` field and a ``criterion``
field; the recipe (``hfcompress.recipe``) finds the class through the method registry. No torch.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hfcompress.matching import check_pattern, fullmatch

# Pydantic error types of a strict field given the wrong type (True for an int, 8.0 for an int).
_STRICT_TYPES = frozenset({"int_type", "float_type", "int_from_float"})
# Fields of a stage that no override may change.
_ENVELOPE = frozenset({"method", "targets", "exclude", "overrides"})


class StageBase(BaseModel):
    """The fields of every stage. Subclasses add ``method``, ``criterion`` and their settings.

    Subclasses that make one value out of several alternatives (low rank's rank / ratio /
    energy) list them in ``alternatives``, so that an override naming one replaces the others.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    alternatives: ClassVar[frozenset[str]] = frozenset()

    targets: str = Field(
        description="Regex matched with re.fullmatch against qualified module names "
        "(e.g. 'model\\.layers\\.\\d+\\.mlp\\.up_proj')."
    )
    exclude: str | None = Field(
        default=None, description="Regex of module names this stage skips even if targeted."
    )
    overrides: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Per-layer settings: {module-name regex: {field: value}}. The first regex that "
        "fully matches a module wins; its fields replace the stage's for that module.",
    )

    @field_validator("targets", "exclude")
    @classmethod
    def _valid_regex(cls, value: str | None, info: Any) -> str | None:
        return None if value is None else check_pattern(value, info.field_name)

    @field_validator("overrides")
    @classmethod
    def _valid_overrides(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for key, settings in value.items():
            check_pattern(key, "overrides")
            forbidden = _ENVELOPE & set(settings)
            if forbidden:
                raise ValueError(
                    f"overrides[{key!r}]: {sorted(forbidden)} cannot be overridden per layer; "
                    "only the method's settings can"
                )
        return value

    @model_validator(mode="after")
    def _overrides_are_valid_settings(self) -> StageBase:
        base = self.model_dump(exclude={"overrides"})
        for key, settings in self.overrides.items():
            try:
                type(self).model_validate(self._merge(base, settings))
            except ValidationError as error:
                raise ValueError(f"overrides[{key!r}]: {first_message(error)}") from error
        return self

    @classmethod
    def _merge(cls, base: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
        if cls.alternatives & set(settings):
            base = {k: v for k, v in base.items() if k not in cls.alternatives}
        return {**base, **settings}

    @property
    def method_name(self) -> str:
        return str(getattr(self, "method", ""))

    @property
    def criterion_name(self) -> str:
        """The stage's criterion (each method's stage class defines the field)."""
        return str(getattr(self, "criterion", ""))

    def settings_for(self, module_name: str) -> StageBase:
        """This stage with the first matching override applied (the stage itself if none)."""
        for key, settings in self.overrides.items():
            if fullmatch(key, module_name, "overrides"):
                merged = self._merge(self.model_dump(exclude={"overrides"}), settings)
                return type(self).model_validate(merged)
        return self

    def layer_params(self) -> dict[str, Any]:
        """The settings a layer is built from (what ``from_module`` takes)."""
        return {}


def first_message(error: ValidationError) -> str:
    return format_validation_error(error).split("; ")[0]


def _location(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        parts.append(f"[{item}]" if isinstance(item, int) else ("." if parts else "") + str(item))
    return "".join(parts)


def format_items(items: list[Any], allowed: list[str] | None = None) -> list[tuple[str, str]]:
    """(where, message) per pydantic error item; ``where`` is '' for a model-level error."""
    lines = []
    for item in items:
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field" + (f"; allowed: {sorted(allowed)}" if allowed else "")
        elif item["type"] == "finite_number":
            message = f"got {item['input']!r}; NaN and infinity are not allowed"
        elif item["type"] in _STRICT_TYPES:
            message = f"{message}, got {item['input']!r} ({type(item['input']).__name__})"
        lines.append((_location(item["loc"]), message))
    return lines


def format_validation_error(error: ValidationError, allowed: list[str] | None = None) -> str:
    """One line per problem: 'sparsity: Input should be less than 1'.

    Args:
        error: pydantic's error.
        allowed: the model's field names, listed when a field is unknown.
    """
    return "; ".join(
        f"{where}: {message}" if where else message
        for where, message in format_items(error.errors(), allowed)
    )
