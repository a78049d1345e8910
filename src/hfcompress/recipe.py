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
checks the rest (shapes, ranks, divisibility) against the model before touching it. No torch here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from hfcompress.errors import RecipeError
from hfcompress.matching import check_pattern, fullmatch

RECIPE_VERSION = 1
# Criteria that need calibration data (compress_model(..., calibration=...)), and those of them
# that need the inputs' Gram matrix X·Xᵀ rather than per-feature norms.
CALIBRATED_CRITERIA = frozenset(
    {"wanda", "sparsegpt", "activation", "whitened", "fisher", "fisher_whitened"}
)
GRAM_CRITERIA = frozenset({"sparsegpt", "whitened", "fisher_whitened"})
_NM = re.compile(r"^(\d+):(\d+)$")


def _check_regex(value: str, field: str) -> str:
    return check_pattern(value, field)


class _Stage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

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
        return None if value is None else _check_regex(value, info.field_name)

    @field_validator("overrides")
    @classmethod
    def _valid_overrides(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for key, settings in value.items():
            _check_regex(key, "overrides")
            forbidden = {"method", "targets", "exclude", "overrides"} & set(settings)
            if forbidden:
                raise ValueError(
                    f"overrides[{key!r}]: {sorted(forbidden)} cannot be overridden per layer; "
                    "only the method's settings can"
                )
        return value

    @model_validator(mode="after")
    def _overrides_are_valid_settings(self) -> _Stage:
        base = self.model_dump(exclude={"overrides"})
        for key, settings in self.overrides.items():
            merged = self._merge(base, settings)
            try:
                type(self).model_validate(merged)
            except ValidationError as error:
                raise ValueError(f"overrides[{key!r}]: {_first_message(error)}") from error
        return self

    @staticmethod
    def _merge(base: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
        return {**base, **settings}

    @property
    def criterion_name(self) -> str:
        """The stage's criterion (each method's stage class defines the field)."""
        return str(getattr(self, "criterion", ""))

    @property
    def needs_calibration(self) -> bool:
        """Whether this stage's criterion needs calibration data."""
        return self.criterion_name in CALIBRATED_CRITERIA

    def settings_for(self, module_name: str) -> _Stage:
        """This stage with the first matching override applied (the stage itself if none)."""
        for key, settings in self.overrides.items():
            if fullmatch(key, module_name, "overrides"):
                merged = self._merge(self.model_dump(exclude={"overrides"}), settings)
                return type(self).model_validate(merged)
        return self


class PruneStage(_Stage):
    """Magnitude pruning, per layer: unstructured, or N:M along the input dimension.

    Example:
        ``{method: prune, targets: '.*mlp\\..*', sparsity: 0.5}`` or
        ``{method: prune, targets: '.*', pattern: '2:4'}``
    """

    method: Literal["prune"] = "prune"
    sparsity: float | None = Field(
        default=None,
        ge=0.0,
        lt=1.0,
        strict=True,
        allow_inf_nan=False,
        description="Fraction of weights set to zero, in [0, 1). Implied by an N:M pattern.",
    )
    pattern: str = Field(
        default="unstructured",
        description="'unstructured' or 'N:M' (keep N of every M consecutive inputs, N < M).",
    )
    criterion: Literal["magnitude", "wanda", "sparsegpt"] = Field(
        default="magnitude",
        description="'magnitude' (data-free), 'wanda' (|W|·‖X‖, Sun et al. 2023) or 'sparsegpt' "
        "(OBS updates with the Hessian X·Xᵀ, Frantar & Alistarh 2023); the last two need "
        "calibration data.",
    )

    @field_validator("pattern")
    @classmethod
    def _valid_pattern(cls, value: str) -> str:
        if value == "unstructured":
            return value
        match = _NM.match(value.replace(" ", ""))
        if match is None:
            raise ValueError(f"pattern={value!r}: expected 'unstructured' or 'N:M' such as '2:4'")
        n, m = int(match.group(1)), int(match.group(2))
        if not 1 <= n < m:
            raise ValueError(f"pattern={value!r}: expected 1 ≤ N < M")
        return f"{n}:{m}"

    @model_validator(mode="after")
    def _sparsity_fits_pattern(self) -> PruneStage:
        if self.pattern == "unstructured":
            if self.sparsity is None:
                raise ValueError("sparsity: required for an unstructured pattern, in [0, 1)")
        elif self.sparsity is not None:
            n, m = (int(v) for v in self.pattern.split(":"))
            if abs(self.sparsity - (1 - n / m)) > 1e-9:
                raise ValueError(
                    f"sparsity={self.sparsity}: pattern {self.pattern} implies {1 - n / m:g}; "
                    "leave sparsity out"
                )
        return self

    def layer_params(self) -> dict[str, Any]:
        return {"sparsity": self.sparsity, "pattern": self.pattern}


class LowRankStage(_Stage):
    """Truncated-SVD factorization W ≈ U·V (Hajimolahoseini et al., seed 000 §4).

    Example:
        ``{method: lowrank, targets: '.*mlp\\..*', ratio: 0.5}`` (or ``rank: 64``, ``energy: 0.95``)
    """

    method: Literal["lowrank"] = "lowrank"
    rank: int | None = Field(
        default=None, ge=1, strict=True, description="Rank r of U: [out, r], V: [r, in]."
    )
    ratio: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        strict=True,
        allow_inf_nan=False,
        description="Fraction of the layer's parameters to keep.",
    )
    energy: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        strict=True,
        allow_inf_nan=False,
        description="Fraction of Σσᵢ² the kept rank retains.",
    )
    criterion: Literal["svd", "activation", "whitened", "fisher", "fisher_whitened"] = Field(
        default="svd",
        description="'svd' (data-free, minimizes ‖W − Ŵ‖), 'activation' (ASVD scaling), 'whitened' "
        "(SVD-LLM, minimizes ‖(W − Ŵ)X‖), 'fisher' (FWSVD row weights from squared "
        "gradients) or 'fisher_whitened' (minimizes Σ_j G_j‖(W − Ŵ)_j X‖², G_j the squared "
        "loss gradients of output j: an estimate of the loss increase); all but 'svd' need "
        "calibration data.",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> LowRankStage:
        given = [k for k in ("rank", "ratio", "energy") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"rank/ratio/energy: give exactly one, got {given or 'none'}")
        if self.energy is not None and self.criterion != "svd":
            raise ValueError(
                f"energy: selects ranks from W's own spectrum, so only with criterion 'svd'; "
                f"use rank or ratio with criterion {self.criterion!r}"
            )
        return self

    @staticmethod
    def _merge(base: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
        # An override naming one of rank/ratio/energy replaces whichever the stage used.
        if {"rank", "ratio", "energy"} & set(settings):
            base = {k: v for k, v in base.items() if k not in ("rank", "ratio", "energy")}
        return {**base, **settings}

    def layer_params(self) -> dict[str, Any]:
        return {
            k: getattr(self, k) for k in ("rank", "ratio", "energy") if getattr(self, k) is not None
        }


class KroneckerStage(_Stage):
    """Nearest Kronecker sum W ≈ Σₖ Aₖ ⊗ Bₖ (Van Loan & Pitsianis; KronyPT, seed 004).

    Example:
        ``{method: kronecker, targets: '.*mlp\\.c_fc', a_shape: [768, 768], terms: 1}``
    """

    method: Literal["kronecker"] = "kronecker"
    a_shape: tuple[StrictInt, StrictInt] = Field(
        description="(m1, n1), the shape of A; must divide the weight's [out, in]."
    )
    terms: int = Field(default=1, ge=1, strict=True, description="Number of Kronecker terms k.")
    criterion: Literal["vanloan", "activation"] = Field(
        default="vanloan",
        description="'vanloan' (data-free nearest Kronecker sum) or 'activation' (weights the "
        "problem by the inputs' norms, minimizing the output error); 'activation' needs "
        "calibration data.",
    )

    @field_validator("a_shape")
    @classmethod
    def _positive(cls, value: tuple[int, int]) -> tuple[int, int]:
        if min(value) < 1:
            raise ValueError(f"a_shape={list(value)}: expected two positive integers")
        return value

    def layer_params(self) -> dict[str, Any]:
        return {"a_shape": tuple(self.a_shape), "terms": self.terms}


Stage = Annotated[PruneStage | LowRankStage | KroneckerStage, Field(discriminator="method")]
METHODS = ("prune", "lowrank", "kronecker")


class Recipe(BaseModel):
    """Stages applied in order, and modules no stage may touch."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stages: list[Stage] = Field(min_length=1, description="Compression stages, applied in order.")
    exclude: str | None = Field(
        default=None, description="Regex of module names that no stage touches (e.g. 'lm_head')."
    )
    version: int = Field(
        default=RECIPE_VERSION, ge=1, strict=True, description="Recipe format version."
    )

    @field_validator("exclude")
    @classmethod
    def _valid_regex(cls, value: str | None) -> str | None:
        return None if value is None else _check_regex(value, "exclude")

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
            raise RecipeError(f"{origin}: {format_validation_error(error)}") from error

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


# Pydantic error types of a strict field given the wrong type (True for an int, 8.0 for an int).
_STRICT_TYPES = frozenset({"int_type", "float_type", "int_from_float"})


def _location(loc: tuple[Any, ...]) -> str:
    parts = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item in METHODS and parts and parts[-1].endswith("]"):
            parts.append(f"({item})")  # the discriminated-union branch
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts)


def _first_message(error: ValidationError) -> str:
    return format_validation_error(error).split("; ")[0]


def format_validation_error(error: ValidationError) -> str:
    """One line per problem: 'stages[1](prune).sparsity: Input should be less than 1'."""
    messages = []
    for item in error.errors():
        where = _location(item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = f"unknown field; {_allowed_fields(item['loc'])}"
        elif item["type"] == "union_tag_invalid":
            message = f"unknown method {item['input'].get('method')!r}; allowed: {list(METHODS)}"
        elif item["type"] == "union_tag_not_found":
            message = f"missing 'method'; allowed: {list(METHODS)}"
        elif item["type"] == "finite_number":
            message = f"got {item['input']!r}; NaN and infinity are not allowed"
        elif item["type"] in _STRICT_TYPES:
            message = f"{message}, got {item['input']!r} ({type(item['input']).__name__})"
        messages.append(f"{where}: {message}" if where else message)
    return "; ".join(messages)


def _allowed_fields(loc: tuple[Any, ...]) -> str:
    method = next((item for item in loc if item in METHODS), None)
    model: type[BaseModel] = {
        "prune": PruneStage,
        "lowrank": LowRankStage,
        "kronecker": KroneckerStage,
    }.get(method, Recipe)
    return f"allowed: {sorted(model.model_fields)}"
