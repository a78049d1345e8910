"""PNG plots of an analysis: singular-value spectra, energy-vs-rank curves, params-vs-perplexity.

matplotlib is an optional extra (``pip install "hfcompress[plots]"``) imported only when a plot
is drawn. Figures are built as ``matplotlib.figure.Figure`` on the non-interactive Agg canvas,
never through ``pyplot``: nothing stays open after saving, and the caller's pyplot backend (a
notebook's, say) is left alone.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from hfcompress.analysis.structure import ModelAnalysis, ModuleAnalysis, analyze_model
from hfcompress.errors import InvalidParameterError, MissingDependencyError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# Up to this many modules share one axes with a legend; more are split into a grid with one
# panel per module kind (q_proj, c_fc, ...), coloured by layer index.
_SINGLE_AXES_MAX = 8
_GRID_COLUMNS = 4
_DPI = 120


def _new_figure(nrows: int, ncols: int, panel: tuple[float, float]) -> Figure:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise MissingDependencyError(
            "hfcompress plots need matplotlib, which is not installed: "
            'pip install "hfcompress[plots]"'
        ) from error
    figure = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png_path(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise InvalidParameterError(f"path={str(path)!r}: expected a file name ending in .png")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _save(figure: Figure, path: Path) -> Path:
    figure.savefig(path, format="png", dpi=_DPI)
    figure.clear()
    return path


def _rows(source: ModelAnalysis | nn.Module, targets: str | None) -> list[ModuleAnalysis]:
    if isinstance(source, ModelAnalysis):
        return source.rows
    if isinstance(source, nn.Module):
        # Only the spectra are drawn, so the per-shape Kronecker SVDs are skipped.
        return analyze_model(source, targets, kronecker_candidates=0, progress=False).rows
    raise InvalidParameterError(
        f"source: expected a ModelAnalysis or an nn.Module, got {type(source).__name__}"
    )


def _layer_index(name: str) -> int | None:
    match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return None if match is None else int(match.group(1))


def _group_key(name: str) -> str:
    """The name with its first numeric component (the layer index) replaced by ``*``."""
    return re.sub(r"(^|\.)\d+(\.|$)", r"\1*\2", name, count=1)


def _panels(rows: list[ModuleAnalysis]) -> list[tuple[str, list[ModuleAnalysis]]]:
    if len(rows) <= _SINGLE_AXES_MAX:
        return [("", rows)]
    groups: dict[str, list[ModuleAnalysis]] = {}
    for row in rows:
        groups.setdefault(_group_key(row.name), []).append(row)
    parts = [key.split(".") for key in groups]
    shared = 0  # leading name components every kind has in common, left out of the titles
    while len(parts) > 1 and all(len(p) > shared and p[shared] == parts[0][shared] for p in parts):
        shared += 1
    return [
        (".".join(p[shared:]) or key, rows)
        for p, (key, rows) in zip(parts, groups.items(), strict=True)
    ]


def _draw(
    rows: list[ModuleAnalysis],
    path: str | os.PathLike[str],
    curve: Any,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    log_y: bool,
    reference: Any = None,
) -> Path:
    """One axes with a legend for a few modules, or a grid of module kinds coloured by layer."""
    if not rows:
        raise InvalidParameterError("nothing to plot: the analysis has no modules")
    path = _png_path(path)
    panels = _panels(rows)
    ncols = min(len(panels), _GRID_COLUMNS)
    nrows = math.ceil(len(panels) / ncols)
    single = len(panels) == 1 and panels[0][0] == ""
    figure = _new_figure(nrows, ncols, (7.0, 4.5) if single else (4.0, 3.0))
    axes = figure.subplots(nrows, ncols, squeeze=False).ravel()
    layers = [i for i in map(_layer_index, (r.name for r in rows)) if i is not None]
    top = max(layers, default=0)
    cmap = _colormap()
    for ax, (panel_title, panel_rows) in zip(axes, panels, strict=False):
        for position, row in enumerate(panel_rows):
            x, y = curve(row)
            if single:
                ax.plot(x, y, label=f"{row.name} [{row.shape[0]}, {row.shape[1]}]")
            else:
                layer = _layer_index(row.name)
                shade = (layer if layer is not None else position) / max(top, 1)
                ax.plot(x, y, color=cmap(shade), linewidth=1.2)
        if reference is not None:
            reference(ax, panel_rows)
        if log_y:
            ax.set_yscale("log")
        ax.set_title(panel_title or title, fontsize=9 if panel_title else 11)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_xlabel(xlabel, fontsize=8 if not single else 10)
        ax.set_ylabel(ylabel, fontsize=8 if not single else 10)
        ax.tick_params(which="both", labelsize=7 if not single else 9)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    if single:
        axes[0].legend(fontsize=7, loc="best")
    else:
        figure.suptitle(title)
        _layer_colorbar(figure, axes[: len(panels)], cmap, top)
    return _save(figure, path)


def _colormap() -> Any:
    from matplotlib import colormaps

    return colormaps["viridis"]


def _layer_colorbar(figure: Figure, axes: Sequence[Axes], cmap: Any, top: int) -> None:
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.ticker import MaxNLocator

    mappable = ScalarMappable(norm=Normalize(0, max(top, 1)), cmap=cmap)
    colorbar = figure.colorbar(mappable, ax=list(axes), label="layer index", shrink=0.8)
    colorbar.locator = MaxNLocator(integer=True)
    colorbar.update_ticks()


def plot_spectra(
    source: ModelAnalysis | nn.Module,
    path: str | os.PathLike[str],
    *,
    targets: str | None = None,
) -> Path:
    """Normalized singular values σᵢ/σ₁ against i, log scale, one line per module.

    Up to 8 modules share one plot with a legend; more are drawn as a grid with one panel per
    module kind (the name with its layer index replaced by ``*``), coloured by layer index.

    Args:
        source: an analysis (its stored spectra are used) or a model (analyzed first, without
            the Kronecker search).
        path: the PNG file to write; parent folders are created.
        targets: with a model, the regex of modules to draw (``re.fullmatch``).

    Returns:
        ``path`` as a ``Path``.

    Raises:
        MissingDependencyError: matplotlib is not installed (``pip install "hfcompress[plots]"``).
        InvalidParameterError: ``path`` does not end in ``.png``, or nothing to plot.
    """
    rows = _rows(source, targets)

    def curve(row: ModuleAnalysis) -> tuple[list[int], list[float]]:
        s = row.singular_values.double()
        top = float(s[0]) if s.numel() and float(s[0]) > 0 else 1.0
        positive = s > 0  # log scale: exact zeros are left out
        index = (positive.nonzero().flatten() + 1).tolist()
        return index, (s[positive] / top).tolist()

    return _draw(
        rows,
        path,
        curve,
        title="singular-value spectra",
        xlabel="index i",
        ylabel="σᵢ / σ₁",
        log_y=True,
    )


def plot_energy(
    source: ModelAnalysis | nn.Module,
    path: str | os.PathLike[str],
    *,
    targets: str | None = None,
) -> Path:
    """Cumulative energy Σ_{i≤r} σᵢ² / Σσᵢ² against the rank fraction r / min(out, in).

    A dotted vertical line marks the break-even rank r = out·in / (out + in), beyond which the
    factors hold more parameters than W (drawn where a panel's modules share one shape). Layout
    and arguments as :func:`plot_spectra`.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        MissingDependencyError: matplotlib is not installed (``pip install "hfcompress[plots]"``).
        InvalidParameterError: ``path`` does not end in ``.png``, or nothing to plot.
    """
    rows = _rows(source, targets)

    def curve(row: ModuleAnalysis) -> tuple[list[float], list[float]]:
        energy = row.cumulative_energy()
        p = energy.numel()
        return [(i + 1) / p for i in range(p)], energy.tolist()

    def break_even(ax: Axes, panel_rows: list[ModuleAnalysis]) -> None:
        shapes = {row.shape for row in panel_rows}
        if len(shapes) == 1:
            out_f, in_f = shapes.pop()
            ax.axvline(
                out_f * in_f / (out_f + in_f) / min(out_f, in_f),
                color="gray",
                linestyle=":",
                label="break-even rank",
            )
        ax.set_ylim(0.0, 1.02)
        ax.set_xlim(0.0, 1.0)

    return _draw(
        rows,
        path,
        curve,
        title="energy retained vs rank",
        xlabel="rank fraction r / min(out, in)",
        ylabel="energy retained",
        log_y=False,
        reference=break_even,
    )


def _pareto(points: list[tuple[str, float, float]]) -> list[tuple[float, float]]:
    """Points that no other point beats on both axes (fewer params and lower y)."""
    front: list[tuple[float, float]] = []
    for _, params, value in sorted(points, key=lambda p: (p[1], p[2])):
        if not front or value < front[-1][1]:
            front.append((params, value))
    return front


def plot_tradeoff(
    points: Sequence[tuple[str, float, float]],
    path: str | os.PathLike[str],
    *,
    log_x: bool = False,
    pareto: bool = True,
    title: str = "parameters vs perplexity",
    ylabel: str = "perplexity",
) -> Path:
    """Scatter of (parameters, perplexity) per model, each point labelled (seed 003 fig. 2).

    Args:
        points: ``(label, parameters, perplexity)`` per model, e.g. the original model and
            each compressed variant (``count_parameters(model).nonzero`` and ``perplexity``).
        path: the PNG file to write; parent folders are created.
        log_x: logarithmic parameter axis.
        pareto: join the points no other point beats on both axes (lower is better).
        title: the plot title.
        ylabel: the y-axis label, for a metric other than perplexity.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        MissingDependencyError: matplotlib is not installed (``pip install "hfcompress[plots]"``).
        InvalidParameterError: no points, a malformed point, non-positive parameters or a
            non-finite value, or ``path`` does not end in ``.png``.

    Example:
        >>> plot_tradeoff([("gpt2", 124e6, 29.9), ("lowrank 50%", 81e6, 35.2)], "tradeoff.png")
    """
    checked: list[tuple[str, float, float]] = []
    for index, point in enumerate(points):
        try:
            label, params, value = point
            params, value = float(params), float(value)
        except (TypeError, ValueError) as error:
            raise InvalidParameterError(
                f"points[{index}]={point!r}: expected (label, parameters, perplexity)"
            ) from error
        if not (params > 0 and math.isfinite(params) and math.isfinite(value)):
            raise InvalidParameterError(
                f"points[{index}]={point!r}: expected parameters > 0 and finite values"
            )
        checked.append((str(label), params, value))
    if not checked:
        raise InvalidParameterError("points: expected at least one (label, parameters, value)")
    path = _png_path(path)
    figure = _new_figure(1, 1, (7.0, 4.5))
    from matplotlib.ticker import EngFormatter

    ax = figure.subplots()
    ax.scatter([p[1] for p in checked], [p[2] for p in checked], zorder=3)
    for label, params, value in checked:
        ax.annotate(label, (params, value), xytext=(5, 5), textcoords="offset points", fontsize=8)
    if pareto and len(checked) > 1:
        front = _pareto(checked)
        ax.plot(*zip(*front, strict=True), color="gray", linestyle="--", label="Pareto front")
        ax.legend(fontsize=8)
    if log_x:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(EngFormatter())
    ax.xaxis.set_major_formatter(EngFormatter())
    ax.margins(x=0.12, y=0.1)
    ax.set_xlabel("parameters")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    return _save(figure, path)
