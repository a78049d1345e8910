"""Package-wide rules: imports point one way, and importing does not touch CUDA."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import hfcompress

PACKAGE = Path(hfcompress.__file__).parent

# Each layer may import only from the layers listed before it.
ORDER = [
    "_version",
    "errors",
    "matching",
    "decompose",
    "stage",
    "layers",
    "stats",
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
    assert tops - {"__init__"} <= set(ORDER), sorted(tops - {"__init__"} - set(ORDER))


def test_import_does_not_initialise_cuda():
    code = "import torch, hfcompress; assert not torch.cuda.is_initialized(); print('ok')"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_public_api_is_declared():
    for name in hfcompress.__all__:
        assert hasattr(hfcompress, name), name
