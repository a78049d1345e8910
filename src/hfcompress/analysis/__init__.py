"""Structure analysis: where low-rank, pruning or Kronecker factors fit a model best.

* :mod:`~hfcompress.analysis.structure`: per-module shape, numerical and stable rank, energy
  retained at given parameter ratios, sparsity, and the relative error each method gives at a
  parameter budget (:func:`analyze_module`, :func:`analyze_model`).
* :mod:`~hfcompress.analysis.plots`: singular-value spectra, energy-vs-rank curves and the
  params-vs-perplexity trade-off, saved as PNG. They need the optional matplotlib extra,
  ``pip install "hfcompress[plots]"``, imported only when a plot is drawn.

Example:
    >>> from hfcompress.analysis import analyze_model, plot_spectra
    >>> analysis = analyze_model(model, budget=0.25)
    >>> print(analysis)
    >>> plot_spectra(analysis, "spectra.png")
"""

from hfcompress.analysis.plots import (
    MissingDependencyError,
    plot_energy,
    plot_spectra,
    plot_tradeoff,
)
from hfcompress.analysis.structure import (
    METHODS,
    EnergyAt,
    KroneckerFit,
    ModelAnalysis,
    ModuleAnalysis,
    analyze_model,
    analyze_module,
    kronecker_candidates_for,
)

__all__ = [
    "METHODS",
    "EnergyAt",
    "KroneckerFit",
    "MissingDependencyError",
    "ModelAnalysis",
    "ModuleAnalysis",
    "analyze_model",
    "analyze_module",
    "kronecker_candidates_for",
    "plot_energy",
    "plot_spectra",
    "plot_tradeoff",
]
