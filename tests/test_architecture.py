"""Package-wide rules: imports point one way, and importing does not touch CUDA."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import hfcompress

PACKAGE = Path(hfcompress.__file__).parent

# Each layer may import only from the layers listed before it.
ORDER = [
    "_version",
    "_interrupt",
    "errors",
    "matching",
    "decompose",
    "stage",
    "layers",
    "stats",
    "runner",
    "structured",
    "formats",
    "registry",
    "methods",
    "recipe",
    "swap",
    "calibration",
    "report",
    "validation",
    "surgery",
    "planner",
    "checkpoint_checks",
    "serialization",
    "model_card",
    "inference",
    "quantization",
    "integrations",
    "training",
    "evaluation",
    "analysis",
    "cli",
]


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "hfcompress" or len(parts) < 2:
        return None
    return parts[1].removesuffix(".py")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_imports_point_one_way():
    violations = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE)
        own = relative.parts[0].removesuffix(".py")
        if own not in ORDER:
            continue
        for module in imported_modules(path):
            other = layer_of(module)
            if other in ORDER and ORDER.index(other) > ORDER.index(own):
                violations.append(f"{relative} imports {module}")
    assert not violations, violations


def test_every_module_has_a_place_in_the_order():
    # a module missing from ORDER would escape test_imports_point_one_way
    tops = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in PACKAGE.rglob("*.py")}
    entry = {"__init__", "__main__"}
    assert tops - entry <= set(ORDER), sorted(tops - entry - set(ORDER))


def test_import_does_not_initialise_cuda():
    code = "import torch, hfcompress; assert not torch.cuda.is_initialized(); print('ok')"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_public_api_is_declared():
    for name in hfcompress.__all__:
        assert hasattr(hfcompress, name), name


GENERIC = ["recipe.py", "stage.py", "registry.py", "swap.py", "calibration.py", "validation.py",
           "surgery.py", "report.py"]  # fmt: skip
METHOD_WORDS = {"prune", "lowrank", "kronecker", "PrunedLinear", "LowRankLinear", "KroneckerLinear"}


def _named_in_code(path: Path) -> set[str]:
    """Method names used in code: identifiers, attributes, string constants (docstrings aside)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            found.add(node.id)
        elif isinstance(node, ast.Attribute):
            found.add(node.attr)
        elif isinstance(node, ast.alias):
            found.update(node.name.split("."))
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.update(node.module.split("."))
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings
        ):
            found.add(node.value)
    return found & METHOD_WORDS


@pytest.mark.parametrize("name", GENERIC)
def test_generic_modules_name_no_method(name):
    assert not _named_in_code(PACKAGE / name), name


CHECKPOINT_GENERIC = ["serialization.py", "checkpoint_checks.py", "formats.py", "inference.py",
                      "layers/base.py"]  # fmt: skip


@pytest.mark.parametrize("name", CHECKPOINT_GENERIC)
def test_checkpoint_code_names_no_method_or_layer_class(name):
    """The on-disk format is each layer class's (its state-format hooks on CompressedLayer):
    saving, loading and checking import no method package and name no method or layer class
    (issue 13)."""
    path = PACKAGE / name
    methods = sorted(m for m in imported_modules(path) if m.startswith("hfcompress.methods"))
    assert not methods, methods
    assert not _named_in_code(path), name
