"""The compression recipe: a typed, validated description of what to compress and how.

A recipe is a list of stages applied in order, each naming a method, a regex over module names
and the method's settings, plus per-layer ``overrides`` (KronyPT, seed 004, compresses early and
late layers differently). It is given as a dict, a :class:`Recipe`, or a JSON/YAML file:

.. code-block:: yaml

    stages:
      - method: lowrank
        targets: 'model\\.layers\\.\\d+\\.mlp\\.(gate|up|down)_proj'
        ratio: 0.5
        overrides: {'model\\.layers\\.[0-3]\\..*': {ratio: 0.75}}
      - method: prune
        targets: 'model\\.layers\\.\\d+\\.mlp\\..*'
        sparsity: 0.5
        pattern: unstructured
      - method: kronecker
        targets: 'model\\.layers\\.\\d+\\.self_attn\\.o_proj'
        a_shape: [288, 288]
        terms: 2
    exclude: 'lm_head'

This module validates everything that can be checked without the model; ``compress_model``
checks the rest (shapes, ranks, divisibility) against the model before touching it. Each
stage is validated by the class its method registered (``hfcompress.registry``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from hfcompress.errors import RecipeError
from hfcompress.matching import check_pattern
from hfcompress.registry import get_method, method_names
from hfcompress.stage import StageBase, format_items

RECIPE_VERSION = 1


def _parse_stage(value: Any, index: int) -> StageBase:
    """One stage, validated by its method's stage class from the registry."""
    if isinstance(value, StageBase):
        return value
    if not isinstance(value, dict):
        raise PydanticCustomError(
            "stage",
            "stages[{index}]: expected a mapping with 'method', got {kind}",
            {"index": index, "kind": type(value).__name__},
        )
    if "method" not in value:
        raise PydanticCustomError(
            "stage",
            "stages[{index}]: missing 'method'; allowed: {allowed}",
            {"index": index, "allowed": str(method_names())},
        )
    name = value["method"]
    if not isinstance(name, str) or name not in method_names():
        raise PydanticCustomError(
            "stage",
            "stages[{index}]: unknown method {name}; allowed: {allowed}",
            {"index": index, "name": repr(name), "allowed": str(method_names())},
        )
    stage = get_method(name).stage
    try:
        return stage.model_validate(value)
    except ValidationError as error:
        head = f"stages[{index}]({name})"
        lines = [
            f"{head}.{where}: {message}" if where else f"{head}: {message}"
            for where, message in format_items(error.errors(), list(stage.model_fields))
        ]
        raise PydanticCustomError("stage", "{message}", {"message": "; ".join(lines)}) from error


class Recipe(BaseModel):
    """Stages applied in order, and modules no stage may touch."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stages: list[SerializeAsAny[StageBase]] = Field(
        min_length=1,
        description="Compression stages, applied in order; each is validated by the stage class "
        "its `method` names in the registry.",
    )
    exclude: str | None = Field(
        default=None, description="Regex of module names that no stage touches (e.g. 'lm_head')."
    )
    version: int = Field(
        default=RECIPE_VERSION, ge=1, strict=True, description="Recipe format version."
    )

    @field_validator("stages", mode="before")
    @classmethod
    def _stages_from_registry(cls, value: Any) -> Any:
        if not isinstance(value, (list, tuple)):
            return value  # pydantic says "Input should be a valid list"
        return [_parse_stage(item, index) for index, item in enumerate(value)]

    @field_validator("exclude")
    @classmethod
    def _valid_regex(cls, value: str | None) -> str | None:
        return None if value is None else check_pattern(value, "exclude")

    @field_validator("version")
    @classmethod
    def _known_version(cls, value: int) -> int:
        if value > RECIPE_VERSION:
            raise ValueError(
                f"version={value}: this hfcompress reads recipe versions ≤ {RECIPE_VERSION}; "
                "upgrade hfcompress"
            )
        return value

    @classmethod
    def load(cls, source: Recipe | dict[str, Any] | str | Path) -> Recipe:
        """A recipe from a :class:`Recipe`, a dict, or a path to a ``.json`` / ``.yaml`` file.

        Raises:
            RecipeError: unreadable file, bad syntax, or a schema error; the message names the
                file (if any) and the offending field.
        """
        if isinstance(source, Recipe):
            return source
        origin = "recipe"
        if isinstance(source, (str, Path)):
            origin = str(source)
            source = _read_file(Path(source))
        if not isinstance(source, dict):
            raise RecipeError(
                f"{origin}: expected a mapping with 'stages', got {type(source).__name__}"
            )
        try:
            return cls.model_validate(source)
        except ValidationError as error:
            raise RecipeError(f"{origin}: {format_recipe_error(error)}") from error

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible dict that :meth:`load` reads back."""
        return self.model_dump(mode="json", exclude_none=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _read_file(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise RecipeError(f"{path}: cannot read recipe ({error.strerror or error})") from error
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text)
        return yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise RecipeError(
            f"{path}: not valid {path.suffix.lstrip('.') or 'YAML'}: {error}"
        ) from error


def format_recipe_error(error: ValidationError) -> str:
    """One line per problem: 'stages[1](prune).sparsity: Input should be less than 1'."""
    stage_lines = [item["msg"] for item in error.errors() if item["type"] == "stage"]
    others = [item for item in error.errors() if item["type"] != "stage"]
    lines = [
        f"{where}: {message}" if where else message
        for where, message in format_items(others, list(Recipe.model_fields))
    ]
    return "; ".join(stage_lines + lines)
