"""Turn a text dataset into causal-LM training blocks (tokenize, concatenate, chunk)."""

from __future__ import annotations

from typing import Any

from hfcompress.errors import InvalidParameterError


def causal_lm_blocks(
    dataset: Any,
    tokenizer: Any,
    block_size: int,
    text_column: str = "text",
    num_proc: int | None = None,
) -> Any:
    """Tokenize ``dataset[text_column]``, concatenate and cut into blocks of ``block_size``.

    The result has ``input_ids``, ``attention_mask`` and ``labels`` (a copy of ``input_ids``:
    the model shifts them), as in transformers' ``run_clm`` example. The tail shorter than a
    block is dropped.

    Args:
        dataset: a ``datasets.Dataset`` with a text column.
        tokenizer: any HF tokenizer.
        block_size: tokens per block (≥ 2).
        text_column: the column holding the text.
        num_proc: worker processes for ``Dataset.map``.

    Raises:
        InvalidParameterError: the column is missing (the message lists the dataset's columns),
            or ``block_size`` < 2.
    """
    if text_column not in dataset.column_names:
        raise InvalidParameterError(
            f"text_column={text_column!r}: not a column of the dataset; "
            f"it has {dataset.column_names}"
        )
    if block_size < 2:
        raise InvalidParameterError(f"block_size={block_size}: expected ≥ 2")

    def tokenize(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        return tokenizer(batch[text_column])

    def group(batch: dict[str, list[list[int]]]) -> dict[str, list[list[int]]]:
        keys = [k for k in ("input_ids", "attention_mask") if k in batch]
        joined = {k: [token for row in batch[k] for token in row] for k in keys}
        usable = (len(joined["input_ids"]) // block_size) * block_size
        blocks = {
            k: [v[i : i + block_size] for i in range(0, usable, block_size)]
            for k, v in joined.items()
        }
        blocks["labels"] = [list(b) for b in blocks["input_ids"]]
        return blocks

    tokenized = dataset.map(
        tokenize, batched=True, remove_columns=dataset.column_names, num_proc=num_proc
    )
    return tokenized.map(group, batched=True, num_proc=num_proc)
