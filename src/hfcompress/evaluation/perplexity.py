"""Perplexity of a causal LM with the sliding-window method of the HF perplexity guide.

Source: "Perplexity of fixed-length models", https://huggingface.co/docs/transformers/perplexity.
A window of at most ``max_length`` tokens moves by ``stride``; each window scores only the tokens
that no earlier window scored, so every scored token sees up to ``max_length − stride`` tokens of
context. Unlike the guide, windows are weighted by the number of tokens they actually predict:
the guide subtracts ``batch_size`` from every window's label count, which is right only when the
first label of a window has no context (the first window, or disjoint chunks) and undercounts
every later window by one otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from hfcompress.errors import InvalidParameterError
from hfcompress.evaluation._common import check_column, eval_mode, model_device

if TYPE_CHECKING:
    from datasets import Dataset

IGNORE_INDEX = -100  # the label value HF losses skip
MAX_LENGTH_CAP = 2048  # default window cap: long-context models would otherwise need huge windows
_CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


@dataclass(frozen=True)
class PerplexityResult:
    """The outcome of a sliding-window perplexity evaluation.

    Attributes:
        perplexity: exp(nll).
        nll: mean negative log-likelihood per predicted token, in nats.
        tokens: number of predicted (scored) tokens; T − 1 whenever ``stride < max_length``.
        windows: number of forward passes.
    """

    perplexity: float
    nll: float
    tokens: int
    windows: int


@dataclass(frozen=True)
class Window:
    """One forward pass: tokens [begin, end) go in, tokens [first_scored, end) are scored."""

    begin: int
    end: int
    first_scored: int


def plan_windows(num_tokens: int, max_length: int, stride: int) -> list[Window]:
    """The windows ``perplexity`` runs over a sequence of ``num_tokens`` tokens.

    Windows begin at 0, stride, 2·stride, … and cover [begin, min(begin + max_length, T)); the
    last one reaches T. A window scores the tokens after the previous window's end, but never its
    own first token, which has no context inside the window. Hence with ``stride < max_length``
    the tokens 1 … T − 1 are each scored exactly once; with ``stride == max_length`` (disjoint
    chunks) the first token of every chunk is not scored. Windows that would score nothing are
    left out.

    Raises:
        InvalidParameterError: ``max_length < 2``, ``stride`` outside [1, max_length], T < 2.
    """
    _check_int("max_length", max_length, 2)
    _check_int("stride", stride, 1)
    if stride > max_length:
        raise InvalidParameterError(
            f"stride={stride}: expected 1 ≤ stride ≤ max_length (max_length={max_length})"
        )
    if num_tokens < 2:
        raise InvalidParameterError(
            f"input_ids: expected at least 2 tokens to predict one, got {num_tokens}"
        )
    windows: list[Window] = []
    previous_end = 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + max_length, num_tokens)
        first_scored = max(previous_end, begin + 1)
        if first_scored < end:
            windows.append(Window(begin, end, first_scored))
        previous_end = end
        if end == num_tokens:
            break
    return windows


def perplexity(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_length: int,
    stride: int,
    *,
    progress: bool = True,
) -> PerplexityResult:
    """Sliding-window perplexity of a causal LM on one token sequence (HF perplexity guide).

    Each window's mean loss (the model's own loss on labels that are ``-100`` except for the
    tokens scored in it) is multiplied by the number of tokens it predicts, counted from the
    labels after the causal shift; the sum is divided by the total number of predicted tokens.

    Args:
        model: a causal LM that returns ``.loss`` when called with ``labels`` (e.g. any
            ``AutoModelForCausalLM``). Its train/eval state is restored afterwards.
        input_ids: token ids, [T] or [1, T]; moved to the model's device.
        max_length: tokens per window, ≥ 2 (at most the model's context length).
        stride: how far the window moves, in [1, max_length]. Each scored token sees at least
            ``max_length − stride`` tokens of context; ``stride == max_length`` scores disjoint
            chunks.
        progress: show a progress bar over the windows.

    Returns:
        A :class:`PerplexityResult`.

    Raises:
        InvalidParameterError: a bad ``input_ids`` shape or dtype, ``max_length`` or ``stride``,
            or a model that is not a causal LM.

    Example:
        >>> ids = tokenizer(text, return_tensors="pt").input_ids
        >>> perplexity(model, ids, max_length=1024, stride=512).perplexity
    """
    ids = _as_sequence(input_ids)
    windows = plan_windows(ids.shape[1], max_length, stride)
    _check_causal(model)
    ids = ids.to(model_device(model))
    nll_sum = 0.0
    tokens = 0
    with eval_mode(model):
        for window in tqdm(windows, desc="perplexity", unit="window", disable=not progress):
            window_nll, predicted = _window_nll(model, ids, window)
            nll_sum += window_nll * predicted
            tokens += predicted
    nll = nll_sum / tokens
    return PerplexityResult(perplexity=math.exp(nll), nll=nll, tokens=tokens, windows=len(windows))


def perplexity_of_text(
    model: nn.Module,
    tokenizer: Any,
    text: str,
    max_length: int | None = None,
    stride: int | None = None,
    *,
    progress: bool = True,
) -> PerplexityResult:
    """:func:`perplexity` of ``text`` tokenized with ``tokenizer`` as one sequence.

    Args:
        model: a causal LM.
        tokenizer: the model's tokenizer (a ``transformers`` tokenizer).
        text: the text to score.
        max_length: tokens per window; defaults to the model's context length
            (``config.max_position_embeddings`` or ``n_positions``), capped at 2048.
        stride: defaults to ``max_length // 2``.
        progress: show a progress bar over the windows.

    Raises:
        InvalidParameterError: empty ``text``, or no ``max_length`` given and none in the config.
    """
    if not isinstance(text, str) or not text:
        raise InvalidParameterError(f"text: expected a non-empty str, got {text!r:.60}")
    input_ids = tokenizer(text, return_tensors="pt")["input_ids"]
    max_length = default_max_length(model) if max_length is None else max_length
    stride = max(1, max_length // 2) if stride is None else stride
    return perplexity(model, input_ids, max_length, stride, progress=progress)


def perplexity_of_dataset(
    model: nn.Module,
    tokenizer: Any,
    dataset: Dataset,
    text_column: str = "text",
    max_length: int | None = None,
    stride: int | None = None,
    *,
    separator: str = "\n\n",
    progress: bool = True,
) -> PerplexityResult:
    """:func:`perplexity_of_text` of a dataset's texts joined with ``"\\n\\n"`` (as the guide does).

    Args:
        model: a causal LM.
        tokenizer: the model's tokenizer.
        dataset: a ``datasets.Dataset`` (one split), e.g. wikitext-2-raw-v1's test split.
        text_column: the column holding the texts.
        max_length: see :func:`perplexity_of_text`.
        stride: see :func:`perplexity_of_text`.
        separator: joins consecutive texts.
        progress: show a progress bar over the windows.

    Raises:
        InvalidParameterError: ``dataset`` is not a ``datasets.Dataset``, or has no
            ``text_column`` (the message lists its columns).
        MissingDependencyError: ``datasets`` is not installed.
    """
    check_column(dataset, text_column, "text_column")
    text = separator.join(dataset[text_column])
    return perplexity_of_text(model, tokenizer, text, max_length, stride, progress=progress)


def default_max_length(model: nn.Module) -> int:
    """The model's context length from its config, capped at ``MAX_LENGTH_CAP`` (2048).

    Raises:
        InvalidParameterError: the config names no context length; pass ``max_length``.
    """
    config = getattr(model, "config", None)
    for field in _CONTEXT_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, int) and value >= 2:
            return min(value, MAX_LENGTH_CAP)
    raise InvalidParameterError(
        f"max_length=None: the model's config has none of {list(_CONTEXT_FIELDS)}; "
        "pass max_length explicitly"
    )


def _window_nll(model: nn.Module, ids: torch.Tensor, window: Window) -> tuple[float, int]:
    """Mean NLL of the tokens ``window`` scores, and how many it predicts."""
    window_ids = ids[:, window.begin : window.end]
    labels = window_ids.clone()
    labels[:, : window.first_scored - window.begin] = IGNORE_INDEX
    loss = model(input_ids=window_ids, labels=labels).loss
    if loss is None:
        raise InvalidParameterError(
            f"model: {type(model).__name__} returned no loss for labels; expected a causal LM "
            "such as AutoModelForCausalLM"
        )
    predicted = int((labels[:, 1:] != IGNORE_INDEX).sum())  # labels shift left by one
    return float(loss), predicted


def _as_sequence(input_ids: torch.Tensor) -> torch.Tensor:
    """[T] or [1, T] integer ids as [1, T]."""
    if not isinstance(input_ids, torch.Tensor):
        raise InvalidParameterError(
            f"input_ids: expected a torch.Tensor, got {type(input_ids).__name__}"
        )
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise InvalidParameterError(f"input_ids: expected integer token ids, got {input_ids.dtype}")
    if input_ids.dim() == 1:
        return input_ids.unsqueeze(0)
    if input_ids.dim() == 2 and input_ids.shape[0] == 1:
        return input_ids
    raise InvalidParameterError(
        f"input_ids: expected shape [T] or [1, T] (one sequence; concatenate texts first), "
        f"got {list(input_ids.shape)}"
    )


def _check_causal(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise InvalidParameterError(
            f"model: {type(model).__name__} is an encoder-decoder; perplexity needs a causal LM"
        )


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParameterError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise InvalidParameterError(f"{name}={value}: expected ≥ {minimum}")
