"""Evaluate compressed models: perplexity, task metrics, and efficiency.

* :mod:`~hfcompress.evaluation.perplexity`: sliding-window perplexity of a causal LM.
* :mod:`~hfcompress.evaluation.task`: accuracy / F1 of a sequence classifier on a dataset.
* :mod:`~hfcompress.evaluation.efficiency`: parameter counts, checkpoint size, latency,
  throughput, speedup against a reference, and the weighted score of seed 003 §6.4.

``datasets`` (dataset helpers) and ``evaluate`` (metrics other than accuracy and F1) are
optional; a helper that needs one raises :class:`MissingDependencyError` naming it.
"""

from hfcompress.evaluation._common import MissingDependencyError
from hfcompress.evaluation.efficiency import (
    LatencyResult,
    ParameterCount,
    SpeedComparison,
    checkpoint_size_mb,
    compare_speed,
    compression_ratio,
    count_parameters,
    measure_generation,
    measure_latency,
    weighted_score,
)
from hfcompress.evaluation.perplexity import (
    PerplexityResult,
    Window,
    perplexity,
    perplexity_of_dataset,
    perplexity_of_text,
    plan_windows,
)
from hfcompress.evaluation.task import (
    accuracy,
    evaluate_classification,
    f1_score,
    predict_classes,
)

__all__ = [
    "LatencyResult",
    "MissingDependencyError",
    "ParameterCount",
    "PerplexityResult",
    "SpeedComparison",
    "Window",
    "accuracy",
    "checkpoint_size_mb",
    "compare_speed",
    "compression_ratio",
    "count_parameters",
    "evaluate_classification",
    "f1_score",
    "measure_generation",
    "measure_latency",
    "perplexity",
    "perplexity_of_dataset",
    "perplexity_of_text",
    "plan_windows",
    "predict_classes",
    "weighted_score",
]
