"""Sliding-window perplexity against hand-written references computed from the logits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import tiny_model
from conftest import word_tokenizer as shared_word_tokenizer
from hfcompress.errors import InvalidParameterError
from hfcompress.evaluation import (
    perplexity,
    perplexity_of_dataset,
    perplexity_of_text,
    plan_windows,
)

CAUSAL = ["gpt2", "llama"]
T = 40


def token_ids(length: int = T) -> torch.Tensor:
    return torch.randint(1, 128, (1, length), generator=torch.Generator().manual_seed(2))


def token_nll(model: nn.Module, chunk: torch.Tensor) -> torch.Tensor:
    """-log p(chunk[j] | chunk[:j]) for j = 1 … len − 1, from the logits: [len − 1]."""
    with torch.no_grad():
        logits = model(input_ids=chunk.unsqueeze(0)).logits[0].double()
    log_probs = F.log_softmax(logits[:-1], dim=-1)
    return -log_probs.gather(-1, chunk[1:, None])[:, 0]


def hand_sliding_window(
    model: nn.Module, ids: torch.Tensor, max_length: int, stride: int
) -> dict[int, float]:
    """{position t: NLL of token t}, each from the first window that reaches t with context."""
    scored: dict[int, float] = {}
    begin = 0
    while True:
        end = min(begin + max_length, len(ids))
        nll = token_nll(model, ids[begin:end])
        for t in range(begin + 1, end):
            if t not in scored:
                scored[t] = float(nll[t - begin - 1])
        if end == len(ids):
            return scored
        begin += stride


def guide_method(model: nn.Module, ids: torch.Tensor, max_length: int, stride: int) -> tuple:
    """The HF perplexity guide's loop verbatim, including ``num_valid_tokens - batch_size``."""
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    seq_len = ids.size(1)
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = ids[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        num_loss_tokens = (target_ids != -100).sum().item() - target_ids.size(0)
        nll_sum += float(loss) * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return nll_sum / n_tokens, n_tokens


@pytest.mark.parametrize("arch", CAUSAL)
def test_disjoint_chunks_equal_mean_nll_by_hand(arch):
    model, ids = tiny_model(arch), token_ids()
    max_length = 16
    chunks = [ids[0, b : b + max_length] for b in range(0, T, max_length)]
    # Within each chunk, token j is predicted from chunk[:j]; a chunk's first token is not scored.
    nll = torch.cat([token_nll(model, chunk) for chunk in chunks])
    result = perplexity(model, ids, max_length=max_length, stride=max_length, progress=False)
    assert result.tokens == len(nll) == T - len(chunks)
    assert result.windows == len(chunks)
    assert result.nll == pytest.approx(float(nll.mean()), rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(float(nll.mean())), rel=1e-5)


@pytest.mark.parametrize("arch", CAUSAL)
@pytest.mark.parametrize(("max_length", "stride"), [(16, 4), (16, 15), (8, 1), (64, 8)])
def test_sliding_window_matches_hand_loop(arch, max_length, stride):
    model, ids = tiny_model(arch), token_ids()
    scored = hand_sliding_window(model, ids[0], max_length, stride)
    assert sorted(scored) == list(range(1, T))
    expected = sum(scored.values()) / len(scored)
    result = perplexity(model, ids, max_length=max_length, stride=stride, progress=False)
    assert result.tokens == T - 1
    assert result.nll == pytest.approx(expected, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(expected), rel=1e-5)


def test_windows_score_every_token_once():
    for num_tokens in range(2, 30):
        for max_length in range(2, 12):
            for stride in range(1, max_length + 1):
                windows = plan_windows(num_tokens, max_length, stride)
                scored = [t for w in windows for t in range(w.first_scored, w.end)]
                assert len(scored) == len(set(scored))
                assert all(
                    w.end - w.begin <= max_length and w.begin < w.first_scored for w in windows
                )
                if stride < max_length:
                    assert scored == list(range(1, num_tokens))
                else:  # disjoint chunks: each chunk's first token has no context
                    starts = set(range(0, num_tokens, max_length))
                    assert scored == [t for t in range(num_tokens) if t not in starts]


def test_guide_undercount_is_not_reproduced():
    model, ids = tiny_model("gpt2"), token_ids()
    max_length, stride = 16, 4
    guide_nll, guide_tokens = guide_method(model, ids, max_length, stride)
    result = perplexity(model, ids, max_length=max_length, stride=stride, progress=False)
    # The guide drops one token per window after the first from its count (and its weights).
    assert guide_tokens == T - 1 - (result.windows - 1)
    assert result.tokens == T - 1
    expected = sum(hand_sliding_window(model, ids[0], max_length, stride).values()) / (T - 1)
    assert result.nll == pytest.approx(expected, rel=1e-5)
    assert abs(guide_nll - expected) > 1e-4


def test_one_dimensional_ids_and_training_mode_are_handled():
    model, ids = tiny_model("gpt2"), token_ids()
    expected = perplexity(model, ids, max_length=16, stride=8, progress=False)
    model.train()  # dropout on: perplexity must switch it off and restore the mode
    result = perplexity(model, ids[0], max_length=16, stride=8, progress=False)
    assert model.training and all(m.training for m in model.modules())
    assert result.nll == pytest.approx(expected.nll, rel=1e-6)


def test_max_length_longer_than_text_is_one_window():
    model, ids = tiny_model("llama"), token_ids(10)
    nll = token_nll(model, ids[0])
    result = perplexity(model, ids, max_length=64, stride=32, progress=False)
    assert (result.windows, result.tokens) == (1, 9)
    assert result.nll == pytest.approx(float(nll.mean()), rel=1e-5)


@pytest.mark.parametrize(
    ("ids", "max_length", "stride", "match"),
    [
        (token_ids(), 1, 1, r"max_length=1: expected ≥ 2"),
        (token_ids(), 16, 0, r"stride=0: expected ≥ 1"),
        (token_ids(), 16, 17, r"stride=17: expected 1 ≤ stride ≤ max_length \(max_length=16\)"),
        (token_ids(), 16.0, 8, r"max_length: expected an int, got float"),
        (token_ids(1), 16, 8, r"input_ids: expected at least 2 tokens"),
        (token_ids().float(), 16, 8, r"input_ids: expected integer token ids, got torch.float32"),
        (
            token_ids().repeat(2, 1),
            16,
            8,
            r"input_ids: expected shape \[T\] or \[1, T\].*\[2, 40\]",
        ),
        ([1, 2, 3], 16, 8, r"input_ids: expected a torch.Tensor, got list"),
    ],
    ids=[
        "max_length",
        "stride-zero",
        "stride-too-big",
        "max_length-float",
        "one-token",
        "float-ids",
        "batch",
        "list",
    ],
)
def test_bad_arguments_name_the_argument(ids, max_length, stride, match):
    with pytest.raises(InvalidParameterError, match=match):
        perplexity(tiny_model("gpt2"), ids, max_length, stride, progress=False)


def test_encoder_decoder_is_refused():
    with pytest.raises(
        InvalidParameterError, match=r"model: T5ForConditionalGeneration is an encoder-decoder"
    ):
        perplexity(tiny_model("t5"), token_ids(), 16, 8, progress=False)


# --- text and dataset conveniences ---------------------------------------------------------------

WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "ran",
    "on",
    "mat",
    "and",
    "then",
    "it",
    "was",
    "good",
    "bad",
    "very",
    "not",
]


def word_tokenizer():
    return shared_word_tokenizer(WORDS)


TEXTS = ["the cat sat on the mat", "", "then the dog ran and it was very good", "a cat was not bad"]


def test_text_convenience_defaults_to_the_config_context():
    model, tokenizer = tiny_model("gpt2"), word_tokenizer()
    text = " ".join(TEXTS * 8)
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert ids.shape[1] > 64  # longer than the context, so the defaults matter
    result = perplexity_of_text(model, tokenizer, text, progress=False)
    expected = perplexity(model, ids, max_length=64, stride=32, progress=False)  # n_positions
    assert result == expected


def test_dataset_convenience_joins_texts_like_the_guide():
    datasets = pytest.importorskip("datasets")
    model, tokenizer = tiny_model("llama"), word_tokenizer()
    dataset = datasets.Dataset.from_dict({"text": TEXTS, "id": list(range(len(TEXTS)))})
    result = perplexity_of_dataset(
        model, tokenizer, dataset, max_length=8, stride=4, progress=False
    )
    expected = perplexity_of_text(model, tokenizer, "\n\n".join(TEXTS), 8, 4, progress=False)
    assert result == expected
    with pytest.raises(
        InvalidParameterError, match=r"text_column='sentence': .*columns are \['text', 'id'\]"
    ):
        perplexity_of_dataset(model, tokenizer, dataset, text_column="sentence")
    with pytest.raises(
        InvalidParameterError,
        match=r"dataset: expected a datasets.Dataset, got DatasetDict; pick a split",
    ):
        perplexity_of_dataset(model, tokenizer, datasets.DatasetDict(test=dataset))


class Wrapped(nn.Module):
    """A causal LM behind a module without a ``config``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **inputs: torch.Tensor):
        return self.model(**inputs)


def test_missing_context_length_asks_for_max_length():
    model = Wrapped(tiny_model("gpt2"))
    assert perplexity_of_text(model, word_tokenizer(), "the cat sat", 8, progress=False).tokens == 2
    with pytest.raises(
        InvalidParameterError, match=r"max_length=None: .*pass max_length explicitly"
    ):
        perplexity_of_text(model, word_tokenizer(), "the cat sat", progress=False)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", CAUSAL)
def test_cuda_matches_cpu(arch):
    model, ids = tiny_model(arch), token_ids()
    expected = perplexity(model, ids, max_length=16, stride=4, progress=False)
    result = perplexity(model.to("cuda"), ids, max_length=16, stride=4, progress=False)
    assert (result.tokens, result.windows) == (expected.tokens, expected.windows)
    assert result.nll == pytest.approx(expected.nll, rel=1e-4)
