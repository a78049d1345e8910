"""The report of ``compress_model``: one row per compressed module, printed as a table."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table


@dataclass
class ModuleReport:
    """One compressed module in a :class:`CompressionReport`."""

    name: str
    methods: list[str]
    shape: tuple[int, ...]  # [out, in] of a Linear; a structured row: its structure's sizes
    source: str
    params_before: int
    params_after: int  # parameters that can be non-zero
    settings: dict[str, Any]
    rel_error: float | None  # ‖W − Ŵ‖_F / ‖W‖_F against the weight before the recipe
    output_error: float | None = None  # ‖(W − Ŵ)X‖_F / ‖WX‖_F on calibration inputs, if known
    shape_after: tuple[int, ...] | None = None  # a structured row: the sizes after

    def shape_text(self) -> str:
        before = "[" + ", ".join(map(str, self.shape)) + "]"
        if self.shape_after is None:
            return before
        return before + " → [" + ", ".join(map(str, self.shape_after)) + "]"


@dataclass
class CompressionReport:
    """What ``compress_model`` did (or, for a dry run, would do); ``print(report)`` shows it."""

    modules: list[ModuleReport] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (module, reason)
    dry_run: bool = False
    model_params_before: int = 0
    model_params_after: int = 0

    @property
    def params_before(self) -> int:
        """Parameters of the compressed modules before the recipe."""
        return sum(m.params_before for m in self.modules)

    @property
    def params_after(self) -> int:
        """Non-zero-able parameters of the compressed modules after the recipe."""
        return sum(m.params_after for m in self.modules)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "modules": [
                vars(m)
                | {"shape": list(m.shape)}
                | ({"shape_after": list(m.shape_after)} if m.shape_after is not None else {})
                for m in self.modules
            ],
            "skipped": [{"module": n, "reason": r} for n, r in self.skipped],
            "params_before": self.params_before,
            "params_after": self.params_after,
            "model_params_before": self.model_params_before,
            "model_params_after": self.model_params_after,
        }

    def table(self) -> Table:
        title = "hfcompress: " + ("dry run, nothing changed" if self.dry_run else "compressed")
        table = Table(title=title)
        for col in ["module", "method", "shape", "params before", "params after", "setting"]:
            table.add_column(col, justify="right" if "params" in col else "left")
        table.add_column("rel. error", justify="right")
        with_output = any(m.output_error is not None for m in self.modules)
        if with_output:
            table.add_column("output error", justify="right")
        for m in self.modules:
            setting = ", ".join(f"{k}={v}" for k, v in m.settings.items())
            row = [
                m.name,
                "+".join(m.methods),
                m.shape_text(),
                f"{m.params_before:,}",
                f"{m.params_after:,}",
                setting,
                _fmt_error(m.rel_error),
            ]
            table.add_row(*row, *([_fmt_error(m.output_error)] if with_output else []))
        ratio = f"{self.params_before / self.params_after:.2f}x" if self.params_after else "removed"
        caption = [
            f"{len(self.modules)} modules: {self.params_before:,} → {self.params_after:,} "
            f"parameters ({ratio})"
        ]
        if self.model_params_before:
            caption.append(
                f"whole model: {self.model_params_before:,} → {self.model_params_after:,} "
                f"({self.model_params_before / max(self.model_params_after, 1):.2f}x)"
            )
        caption += [f"skipped {name}: {reason}" for name, reason in self.skipped]
        table.caption = "\n".join(caption)
        return table

    def __str__(self) -> str:
        return table_text(self.table(), width=160)


def table_text(table: Table, width: int = 160) -> str:
    """A rich table as plain text (what ``print(report)`` shows), ``width`` columns wide."""
    console = Console(width=width, record=True, file=io.StringIO())
    console.print(table)
    return console.export_text()


def _fmt_error(error: float | None) -> str:
    return "-" if error is None else f"{error:.4f}"
