"""Efficiency: parameter counts, checkpoint size, latency/throughput, speedup, weighted score.

Timings are wall-clock seconds of one forward pass under ``torch.no_grad()``, after warm-up,
repeated and summarized by the median and the 10th/90th percentiles; on CUDA every timed call is
bracketed by ``torch.cuda.synchronize``. A speedup is only meaningful between models measured in
the same run on the same machine, which :func:`compare_speed` does, interleaving the two.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from hfcompress.errors import InvalidParameterError
from hfcompress.evaluation._common import eval_mode, model_device, synchronize
from hfcompress.layers import PrunedLinear

BYTES_PER_MB = 1_000_000  # decimal megabytes, as file sizes on the Hub are shown
Inputs = torch.Tensor | Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class ParameterCount:
    """Parameters of a model.

    Attributes:
        total: stored parameter entries; a tensor shared by several modules (tied embeddings)
            counts once. Buffers such as pruning masks are not parameters.
        nonzero: entries that can be non-zero: a ``PrunedLinear`` weight counts only the entries
            its mask keeps. Structural, so dense weights that happen to be 0 still count; an
            int8 weight of :func:`hfcompress.quantize_int8` counts its non-zero int8 values.
    """

    total: int
    nonzero: int

    @property
    def sparsity(self) -> float:
        """Fraction of parameters that are masked out: 1 − nonzero / total."""
        return 1.0 - self.nonzero / self.total if self.total else 0.0


def count_parameters(model: nn.Module) -> ParameterCount:
    """Total and non-zero-able parameters of ``model`` (see :class:`ParameterCount`)."""
    seen: set[int] = set()
    total = nonzero = 0
    for module in model.modules():
        for parameter in module.parameters(recurse=False):
            if id(parameter) in seen:
                continue
            seen.add(id(parameter))
            total += parameter.numel()
            if isinstance(module, PrunedLinear) and parameter is module.weight:
                nonzero += int(module.mask.sum())
            elif isinstance(getattr(parameter, "qdata", None), torch.Tensor):
                nonzero += int(parameter.qdata.count_nonzero())  # torchao int8: zeros survive
            else:
                nonzero += parameter.numel()
        packed = getattr(module, "_packed_params", None)
        if packed is not None and hasattr(packed, "_weight_bias"):
            # torch.ao's int8 Linear (hfcompress.quantize_int8) holds no parameters: its weight
            # is packed for the kernel, and its structure is gone, so count int8 non-zeros
            weight, bias = packed._weight_bias()
            values = weight.int_repr()
            total += values.numel() + (bias.numel() if bias is not None else 0)
            nonzero += int(values.count_nonzero()) + (bias.numel() if bias is not None else 0)
    return ParameterCount(total=total, nonzero=nonzero)


def checkpoint_size_mb(path: str | Path) -> float:
    """Size on disk of a safetensors checkpoint in MB (1 MB = 10⁶ bytes).

    Args:
        path: a ``save_pretrained`` folder (its top-level ``*.safetensors`` files plus the
            ``*.safetensors.index.json`` of a sharded checkpoint; ``config.json`` and tokenizer
            files are left out), or a single ``.safetensors`` file.

    Raises:
        InvalidParameterError: the path does not exist, or holds no safetensors file.
    """
    path = Path(path)
    if path.is_file() and path.name.endswith(".safetensors"):
        return path.stat().st_size / BYTES_PER_MB
    if not path.is_dir():
        raise InvalidParameterError(
            f"path={str(path)!r}: expected a checkpoint folder or a .safetensors file"
        )
    files = [p for p in sorted(path.iterdir()) if p.is_file()]
    weights = [p for p in files if p.name.endswith(".safetensors")]
    if not weights:
        raise InvalidParameterError(
            f"path={str(path)!r}: no *.safetensors file in this folder; it holds "
            f"{[p.name for p in files][:10]}"
        )
    index = [p for p in files if p.name.endswith(".safetensors.index.json")]
    return sum(p.stat().st_size for p in weights + index) / BYTES_PER_MB


@dataclass(frozen=True)
class LatencyResult:
    """Forward-pass timings of one model on one input.

    Attributes:
        median_s: median seconds per forward pass.
        p10_s: 10th percentile (linear interpolation, as ``numpy.percentile``).
        p90_s: 90th percentile.
        min_s: fastest repeat.
        max_s: slowest repeat.
        tokens: tokens per forward pass, ``input_ids.numel()`` (batch × sequence, padding
            included); None for inputs without ``input_ids``.
        tokens_per_s: ``tokens / median_s``, or None.
        times_s: every repeat, in order.
    """

    median_s: float
    p10_s: float
    p90_s: float
    min_s: float
    max_s: float
    tokens: int | None
    tokens_per_s: float | None
    times_s: tuple[float, ...]


@dataclass(frozen=True)
class SpeedComparison:
    """Two models timed in the same run; ``speedup = reference.median_s / model.median_s``."""

    model: LatencyResult
    reference: LatencyResult
    speedup: float


def measure_latency(
    model: nn.Module,
    inputs: Inputs,
    warmup: int = 3,
    repeats: int = 10,
    *,
    progress: bool = True,
) -> LatencyResult:
    """Latency and throughput of ``model(**inputs)``.

    Args:
        model: any module called with keyword tensors; its train/eval state is restored.
        inputs: ``input_ids`` [batch, seq] or a mapping of model inputs; moved to the model's
            device once, before timing.
        warmup: untimed calls first (kernel selection, caches, lazy initialization).
        repeats: timed calls.
        progress: show a progress bar over the repeats.

    Raises:
        InvalidParameterError: ``warmup < 0``, ``repeats < 1`` or inputs that are not tensors.
    """
    _check_counts(warmup, repeats)
    call = _forward(model, inputs)
    times: list[float] = []
    with eval_mode(model):
        for _ in range(warmup):
            call()
        for _ in tqdm(range(repeats), desc="timing", unit="call", disable=not progress):
            times.append(_time(call, model_device(model)))
    return _summarize(times, _tokens(inputs))


def compare_speed(
    model: nn.Module,
    reference: nn.Module,
    inputs: Inputs,
    warmup: int = 3,
    repeats: int = 10,
    *,
    progress: bool = True,
) -> SpeedComparison:
    """Time ``model`` against ``reference`` (e.g. the uncompressed one) in the same run.

    Calls are interleaved, alternating which model goes first in each repeat, so clock-speed
    drift and cache effects hit both alike. Arguments as in :func:`measure_latency`.

    Returns:
        Both timings and ``speedup = reference median / model median`` (> 1: ``model`` is
        faster), the inference speedup IS of seed 003 §6.4.
    """
    _check_counts(warmup, repeats)
    calls = {"model": _forward(model, inputs), "reference": _forward(reference, inputs)}
    devices = {"model": model_device(model), "reference": model_device(reference)}
    times: dict[str, list[float]] = {"model": [], "reference": []}
    with eval_mode(model), eval_mode(reference):
        for _ in range(warmup):
            calls["reference"]()
            calls["model"]()
        for i in tqdm(range(repeats), desc="timing", unit="pair", disable=not progress):
            order = ("reference", "model") if i % 2 == 0 else ("model", "reference")
            for name in order:
                times[name].append(_time(calls[name], devices[name]))
    tokens = _tokens(inputs)
    measured = _summarize(times["model"], tokens)
    baseline = _summarize(times["reference"], tokens)
    return SpeedComparison(measured, baseline, baseline.median_s / measured.median_s)


def generation_call(
    model: nn.Module, input_ids: torch.Tensor, new_tokens: int
) -> Callable[[], torch.Tensor]:
    """A call of greedy ``generate`` of exactly ``new_tokens`` tokens (EOS ignored), with the KV
    cache, after ``input_ids`` [batch, prompt] (moved to the model's device once, here)."""
    ids = input_ids.to(model_device(model))
    config = getattr(model, "generation_config", None) or model.config
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        pad = getattr(config, "eos_token_id", None)
        pad = pad[0] if isinstance(pad, list) else pad

    def call() -> torch.Tensor:
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=pad if pad is not None else 0,
        )
        if out.shape[1] != ids.shape[1] + new_tokens:  # a decoder-only model returns the prompt too
            raise InvalidParameterError(
                f"generate returned {out.shape[1]} positions, expected prompt {ids.shape[1]} + "
                f"{new_tokens} new tokens (is this a decoder-only model?)"
            )
        return out

    return call


def measure_generation(
    model: nn.Module,
    input_ids: torch.Tensor,
    new_tokens: int = 32,
    reference: nn.Module | None = None,
    warmup: int = 1,
    repeats: int = 3,
    *,
    progress: bool = True,
) -> SpeedComparison | LatencyResult:
    """Decoding speed: greedy generation of exactly ``new_tokens`` tokens after ``input_ids``.

    ``tokens`` is ``batch × new_tokens`` (the prompt's prefill is inside the timed call).
    With ``reference``, the two are timed alternately in the same run, as in
    :func:`compare_speed`, and a :class:`SpeedComparison` is returned.

    Args:
        model: a decoder-only model with ``generate`` (``AutoModelForCausalLM``).
        input_ids: the prompt, [batch, prompt_length].
        new_tokens: tokens generated per call.
    """
    _check_counts(warmup, repeats)
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 1:
        raise InvalidParameterError(f"new_tokens={new_tokens!r}: expected an int ≥ 1")
    models = {"model": model} if reference is None else {"model": model, "reference": reference}
    for name, candidate in models.items():
        if not callable(getattr(candidate, "generate", None)):
            raise InvalidParameterError(
                f"{name}: {type(candidate).__name__} has no generate(); decoding speed needs a "
                "causal language model"
            )
    calls = {name: generation_call(m, input_ids, new_tokens) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    tokens = input_ids.shape[0] * new_tokens
    with ExitStack() as stack:
        for candidate in models.values():
            stack.enter_context(eval_mode(candidate))
        for _ in range(warmup):
            for call in calls.values():
                call()
        for i in tqdm(range(repeats), desc="generating", unit="round", disable=not progress):
            order = list(models) if i % 2 == 0 else list(reversed(models))
            for name in order:
                times[name].append(_time(calls[name], model_device(models[name])))
    measured = _summarize(times["model"], tokens)
    if reference is None:
        return measured
    baseline = _summarize(times["reference"], tokens)
    return SpeedComparison(measured, baseline, baseline.median_s / measured.median_s)


def compression_ratio(original_mb: float, compressed_mb: float) -> float:
    """CR = S_original / S_compressed of seed 003 §6.4 (sizes e.g. from checkpoint_size_mb).

    Raises:
        InvalidParameterError: a size that is not positive.
    """
    _check_positive("original_mb", original_mb)
    _check_positive("compressed_mb", compressed_mb)
    return original_mb / compressed_mb


def weighted_score(
    accuracy: float,
    compression_ratio: float,
    speedup: float,
    *,
    w_accuracy: float,
    w_compression_ratio: float,
    w_speedup: float,
) -> float:
    """WS = w_A·A + w_CR·CR + w_IS·IS, the weighted score of seed 003 §6.4.

    Source: Singh, Kapse, Rane, "An In-depth Assessment of Compression Methods on LLMs"
    (CSE598, ASU), §6.4 "Mathematical Formulation": A is the compressed model's accuracy,
    CR = S_original / S_compressed (sizes in MB), IS = T_original / T_compressed (inference
    times), and the weights are user-defined, reflecting the application's priorities; the
    method with the highest WS gives the best trade-off. The paper fixes no weights, so they
    have no defaults here. The terms are on different scales (A ≤ 1, CR and IS around 1–10),
    so weights are only comparable for one choice of scales: here A is a fraction in [0, 1]
    (multiply ``w_accuracy`` by 100 to score accuracy in percent, as the paper's tables print it).

    Args:
        accuracy: A, in [0, 1] (e.g. ``evaluate_classification(...)["accuracy"]``).
        compression_ratio: CR > 0 (see :func:`compression_ratio`).
        speedup: IS > 0 (``compare_speed(...).speedup``).
        w_accuracy: w_A ≥ 0.
        w_compression_ratio: w_CR ≥ 0.
        w_speedup: w_IS ≥ 0.

    Raises:
        InvalidParameterError: accuracy outside [0, 1], a ratio ≤ 0, a negative weight.
    """
    if not (isinstance(accuracy, int | float) and 0.0 <= accuracy <= 1.0):
        raise InvalidParameterError(
            f"accuracy={accuracy!r}: expected a fraction in [0, 1] (not a percentage)"
        )
    _check_positive("compression_ratio", compression_ratio)
    _check_positive("speedup", speedup)
    weights = {
        "w_accuracy": w_accuracy,
        "w_compression_ratio": w_compression_ratio,
        "w_speedup": w_speedup,
    }
    for name, weight in weights.items():
        if not (isinstance(weight, int | float) and math.isfinite(weight) and weight >= 0):
            raise InvalidParameterError(f"{name}={weight!r}: expected a finite weight ≥ 0")
    return w_accuracy * accuracy + w_compression_ratio * compression_ratio + w_speedup * speedup


def _forward(model: nn.Module, inputs: Inputs) -> Callable[[], object]:
    """``model(**inputs)`` with the inputs already on the model's device."""
    named = {"input_ids": inputs} if isinstance(inputs, torch.Tensor) else dict(inputs)
    for key, value in named.items():
        if not isinstance(value, torch.Tensor):
            raise InvalidParameterError(
                f"inputs[{key!r}]: expected a torch.Tensor, got {type(value).__name__}"
            )
    device = model_device(model)
    on_device = {key: value.to(device) for key, value in named.items()}
    return lambda: model(**on_device)


def _time(call: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    call()
    synchronize(device)
    return time.perf_counter() - start


def _summarize(times: list[float], tokens: int | None) -> LatencyResult:
    ordered = sorted(times)
    median = _quantile(ordered, 0.5)
    return LatencyResult(
        median_s=median,
        p10_s=_quantile(ordered, 0.1),
        p90_s=_quantile(ordered, 0.9),
        min_s=ordered[0],
        max_s=ordered[-1],
        tokens=tokens,
        tokens_per_s=tokens / median if tokens is not None and median > 0 else None,
        times_s=tuple(times),
    )


def _quantile(ordered: list[float], q: float) -> float:
    """The q-quantile of sorted values with linear interpolation (numpy's default)."""
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _tokens(inputs: Inputs) -> int | None:
    if isinstance(inputs, torch.Tensor):
        return inputs.numel()
    ids = inputs.get("input_ids")
    return ids.numel() if isinstance(ids, torch.Tensor) else None


def _check_counts(warmup: int, repeats: int) -> None:
    for name, value, minimum in (("warmup", warmup, 0), ("repeats", repeats, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise InvalidParameterError(f"{name}={value!r}: expected an int ≥ {minimum}")


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise InvalidParameterError(f"{name}={value!r}: expected a finite number > 0")
