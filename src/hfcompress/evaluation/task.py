"""Task evaluation for sequence classification: accuracy and F1 on a ``datasets.Dataset``.

The built-in ``"accuracy"`` and ``"f1"`` compute what the ``evaluate`` metrics of those names
compute (both wrap scikit-learn): accuracy = mean(prediction == reference); F1 = 2·TP / (2·TP +
FP + FN) of class 1 (``average="binary"``; 0 when class 1 never occurs, as scikit-learn's
``zero_division``), or its unweighted mean over the classes present in the references or
predictions (``average="macro"``). They are computed here because ``evaluate.load`` fetches every
metric script from the Hub, so it fails offline; any other metric is taken from ``evaluate`` (a
loaded ``EvaluationModule``, or a name passed to ``evaluate.load``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from hfcompress.errors import InvalidParameterError
from hfcompress.evaluation._common import check_column, eval_mode, model_device, require

if TYPE_CHECKING:
    from datasets import Dataset

BUILTIN_METRICS = ("accuracy", "f1")
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
F1Average = Literal["auto", "binary", "macro"]


def accuracy(predictions: Sequence[int], references: Sequence[int]) -> float:
    """Fraction of predictions equal to their reference (``evaluate``'s ``"accuracy"``)."""
    _check_pairs(predictions, references)
    return sum(p == r for p, r in zip(predictions, references, strict=True)) / len(references)


def f1_score(
    predictions: Sequence[int],
    references: Sequence[int],
    average: Literal["binary", "macro"] = "binary",
) -> float:
    """F1 as ``evaluate``'s ``"f1"`` (scikit-learn ``f1_score``) computes it.

    Args:
        predictions: predicted class ids.
        references: true class ids.
        average: ``"binary"``: F1 of class 1, labels must be 0/1. ``"macro"``: the unweighted
            mean of per-class F1 over the classes in ``references`` or ``predictions``.

    Raises:
        InvalidParameterError: lengths differ, empty input, an unknown ``average``, or
            non-binary labels with ``average="binary"``.
    """
    _check_pairs(predictions, references)
    if average == "binary":
        extra = (set(predictions) | set(references)) - {0, 1}
        if extra:
            raise InvalidParameterError(
                f"average='binary': expected labels in {{0, 1}}, found {sorted(extra)}; "
                "use average='macro' for multiclass"
            )
        return _class_f1(predictions, references, 1)
    if average == "macro":
        classes = sorted(set(predictions) | set(references))
        return sum(_class_f1(predictions, references, c) for c in classes) / len(classes)
    raise InvalidParameterError(f"average={average!r}: expected 'binary' or 'macro'")


def predict_classes(
    model: nn.Module,
    dataset: Dataset,
    tokenizer: Any = None,
    text_column: str | tuple[str, str] = "text",
    label_column: str = "label",
    batch_size: int = 32,
    *,
    max_length: int | None = None,
    progress: bool = True,
) -> tuple[list[int], list[int]]:
    """Argmax predictions of a sequence classifier over ``dataset``, with the references.

    Feed the result to any ``evaluate`` metric: ``metric.compute(predictions=p, references=r)``.
    Arguments as in :func:`evaluate_classification`.

    Returns:
        (predictions, references), each a list of ``len(dataset)`` class ids.
    """
    predictions, references, _ = _predict(
        model, dataset, tokenizer, text_column, label_column, batch_size, max_length, progress
    )
    return predictions, references


def evaluate_classification(
    model: nn.Module,
    dataset: Dataset,
    tokenizer: Any = None,
    text_column: str | tuple[str, str] = "text",
    label_column: str = "label",
    batch_size: int = 32,
    metrics: Sequence[Any] = BUILTIN_METRICS,
    *,
    f1_average: F1Average = "auto",
    max_length: int | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Evaluate a sequence classifier (e.g. ``AutoModelForSequenceClassification``) on a dataset.

    Args:
        model: returns ``.logits`` [batch, num_labels]; its train/eval state is restored.
        dataset: a ``datasets.Dataset`` with ``label_column`` and either ``text_column`` or
            already tokenized ``input_ids`` (then ``tokenizer`` may be None).
        tokenizer: tokenizes ``text_column`` (truncating to ``max_length``); with a tokenized
            dataset it only pads, else padding is on the right with ``config.pad_token_id``.
        text_column: a column of texts, or two columns for sentence pairs (GLUE MRPC, RTE).
        label_column: the column of class ids in [0, num_labels).
        batch_size: examples per forward pass.
        metrics: ``"accuracy"``, ``"f1"`` (built in, offline), other ``evaluate`` metric
            names, or loaded ``evaluate.EvaluationModule`` objects.
        f1_average: ``"binary"`` (class 1), ``"macro"``, or ``"auto"``: binary for a model
            with two labels, macro otherwise.
        max_length: truncation length for the tokenizer; its own maximum when None.
        progress: show a progress bar over the batches.

    Returns:
        {metric name: value}, e.g. ``{"accuracy": 0.91, "f1": 0.90}``.

    Raises:
        InvalidParameterError: a missing column (the message lists the columns), labels out of
            range, no tokenizer for raw text, a bad ``batch_size`` or metric.

    Example:
        >>> evaluate_classification(model, load_dataset("glue", "sst2")["validation"],
        ...                         tokenizer, text_column="sentence")
    """
    loaded = [_load_metric(metric) for metric in metrics]
    predictions, references, num_labels = _predict(
        model, dataset, tokenizer, text_column, label_column, batch_size, max_length, progress
    )
    average = ("binary" if num_labels == 2 else "macro") if f1_average == "auto" else f1_average
    results: dict[str, float] = {}
    for metric in loaded:
        if metric == "accuracy":
            results["accuracy"] = accuracy(predictions, references)
        elif metric == "f1":
            results["f1"] = f1_score(predictions, references, average)
        else:
            results.update(metric.compute(predictions=predictions, references=references))
    return results


def _predict(
    model: nn.Module,
    dataset: Dataset,
    tokenizer: Any,
    text_column: str | tuple[str, str],
    label_column: str,
    batch_size: int,
    max_length: int | None,
    progress: bool,
) -> tuple[list[int], list[int], int]:
    """Predictions, references and the number of classes the model scores."""
    check_column(dataset, label_column, "label_column")
    tokenized = "input_ids" in dataset.column_names
    if not tokenized:
        _check_text_columns(dataset, text_column, tokenizer)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidParameterError(f"batch_size={batch_size!r}: expected an int ≥ 1")
    if len(dataset) == 0:
        raise InvalidParameterError("dataset: expected at least one example, got an empty one")
    device = model_device(model)
    predictions: list[int] = []
    references: list[int] = []
    num_labels = 0
    with eval_mode(model):
        for batch in tqdm(
            _batches(dataset, batch_size),
            total=-(-len(dataset) // batch_size),
            desc="classifying",
            unit="batch",
            disable=not progress,
        ):
            if tokenized:
                inputs = _pad(batch, tokenizer, model)
            else:
                inputs = _tokenize(batch, tokenizer, text_column, max_length)
            logits = model(**{k: v.to(device) for k, v in inputs.items()}).logits
            num_labels = logits.shape[-1]
            labels = [int(label) for label in batch[label_column]]
            _check_labels(labels, num_labels, label_column)
            predictions += logits.argmax(dim=-1).tolist()
            references += labels
    return predictions, references, num_labels


def _batches(dataset: Dataset, batch_size: int) -> Iterator[dict[str, list[Any]]]:
    """Consecutive slices of ``dataset`` as {column: list of values}."""
    plain = dataset.with_format(None)
    for start in range(0, len(plain), batch_size):
        yield plain[start : start + batch_size]


def _tokenize(
    batch: dict[str, list[Any]],
    tokenizer: Any,
    text_column: str | tuple[str, str],
    max_length: int | None,
) -> dict[str, torch.Tensor]:
    columns = (text_column,) if isinstance(text_column, str) else tuple(text_column)
    texts = [batch[column] for column in columns]
    encoded = tokenizer(
        *texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    return {k: v for k, v in encoded.items() if k in MODEL_INPUTS}


def _pad(batch: dict[str, list[Any]], tokenizer: Any, model: nn.Module) -> dict[str, torch.Tensor]:
    """Already tokenized rows padded to the longest: with ``tokenizer.pad``, else on the right."""
    present = [k for k in MODEL_INPUTS if k in batch]
    if tokenizer is not None:
        rows = [{k: batch[k][i] for k in present} for i in range(len(batch["input_ids"]))]
        return dict(tokenizer.pad(rows, return_tensors="pt"))
    pad_id = getattr(getattr(model, "config", None), "pad_token_id", None) or 0
    length = max(len(ids) for ids in batch["input_ids"])
    padded = {}
    for key in present:
        fill = pad_id if key == "input_ids" else 0
        padded[key] = torch.tensor([list(row) + [fill] * (length - len(row)) for row in batch[key]])
    if "attention_mask" not in padded:
        sizes = [len(ids) for ids in batch["input_ids"]]
        padded["attention_mask"] = torch.tensor([[1] * n + [0] * (length - n) for n in sizes])
    return padded


def _check_text_columns(
    dataset: Dataset, text_column: str | tuple[str, str], tokenizer: Any
) -> None:
    columns = (text_column,) if isinstance(text_column, str) else tuple(text_column)
    if not 1 <= len(columns) <= 2:
        raise InvalidParameterError(
            f"text_column={text_column!r}: expected one column name or a pair of them"
        )
    for column in columns:
        check_column(dataset, column, "text_column")
    if tokenizer is None:
        raise InvalidParameterError(
            "tokenizer=None: the dataset has no 'input_ids' column, so its text column "
            f"{text_column!r} needs a tokenizer"
        )


def _check_labels(labels: list[int], num_labels: int, label_column: str) -> None:
    if num_labels < 2:
        raise InvalidParameterError(
            f"model: {num_labels} output per example is regression; expected a classifier"
        )
    bad = sorted({label for label in labels if not 0 <= label < num_labels})
    if bad:
        raise InvalidParameterError(
            f"label_column={label_column!r}: labels {bad} are outside [0, {num_labels}) (the "
            "model's classes); unlabeled test splits (label -1) cannot be evaluated"
        )


def _load_metric(metric: Any) -> Any:
    """A built-in metric name as itself, any other name through ``evaluate.load``."""
    if isinstance(metric, str) and metric in BUILTIN_METRICS:
        return metric
    evaluate = require("evaluate", f"metric {metric!r}")
    if isinstance(metric, evaluate.EvaluationModule):
        return metric
    if not isinstance(metric, str):
        raise InvalidParameterError(
            f"metrics: expected names or evaluate.EvaluationModule objects, got "
            f"{type(metric).__name__}"
        )
    try:
        return evaluate.load(metric)
    except Exception as error:
        raise InvalidParameterError(
            f"metrics: evaluate.load({metric!r}) failed (metric scripts come from the Hub, so "
            f"this needs the network or a cached copy; {BUILTIN_METRICS} work offline): {error}"
        ) from error


def _class_f1(predictions: Sequence[int], references: Sequence[int], positive: int) -> float:
    pairs = list(zip(predictions, references, strict=True))
    tp = sum(p == positive and r == positive for p, r in pairs)
    fp = sum(p == positive and r != positive for p, r in pairs)
    fn = sum(p != positive and r == positive for p, r in pairs)
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def _check_pairs(predictions: Sequence[int], references: Sequence[int]) -> None:
    if len(predictions) != len(references):
        raise InvalidParameterError(
            f"predictions: expected as many as references ({len(references)}), "
            f"got {len(predictions)}"
        )
    if not references:
        raise InvalidParameterError("references: expected at least one, got none")
