"""Parameter counts, checkpoint size, latency and the weighted score against hand formulas."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from conftest import BLOCK_LINEARS, tiny_model
from hfcompress.errors import InvalidParameterError
from hfcompress.evaluation import (
    ParameterCount,
    checkpoint_size_mb,
    compare_speed,
    compression_ratio,
    count_parameters,
    measure_latency,
    weighted_score,
)
from hfcompress.layers import PrunedLinear
from hfcompress.surgery import compress_model

D, V, P, INNER, LAYERS = 64, 128, 64, 256, 2  # the tiny GPT-2: width, vocab, positions, MLP
BLOCK_WEIGHTS = D * 3 * D + D * D + D * INNER + INNER * D  # c_attn, attn c_proj, c_fc, mlp c_proj
GPT2_PARAMS = (
    V * D  # wte, tied to lm_head: counted once
    + P * D  # wpe
    + LAYERS * (BLOCK_WEIGHTS + 3 * D + D + INNER + D + 4 * D)  # weights, biases, ln_1/ln_2
    + 2 * D  # ln_f
)


def test_dense_count_matches_hand_formula():
    count = count_parameters(tiny_model("gpt2"))
    assert count == ParameterCount(total=GPT2_PARAMS, nonzero=GPT2_PARAMS)
    assert count.sparsity == 0.0


@pytest.mark.parametrize(
    "stage",
    [{"sparsity": 0.5}, {"pattern": "2:4"}, {"sparsity": 0.3}],
    ids=["unstructured-0.5", "2:4", "unstructured-0.3"],
)
def test_pruned_count_excludes_masked_entries(stage):
    model = tiny_model("gpt2")
    compress_model(
        model, {"stages": [{"method": "prune", "targets": BLOCK_LINEARS, **stage}]}, progress=False
    )
    sparsity = stage.get("sparsity", 0.5)
    shapes = [(3 * D, D), (D, D), (INNER, D), (D, INNER)] * LAYERS
    masked = sum(round(sparsity * out * inp) for out, inp in shapes)
    assert masked == sum(
        int((~m.mask).sum()) for m in model.modules() if isinstance(m, PrunedLinear)
    )
    count = count_parameters(model)
    assert count.total == GPT2_PARAMS  # a pruned layer still stores its full weight
    assert count.nonzero == GPT2_PARAMS - masked
    assert count.sparsity == pytest.approx(masked / GPT2_PARAMS)


def test_low_rank_count_matches_hand_formula():
    model = tiny_model("llama")
    dense = count_parameters(model).total
    rank = 8
    compress_model(
        model,
        {"stages": [{"method": "lowrank", "targets": r".*\.mlp\..*", "rank": rank}]},
        progress=False,
    )
    # per layer: gate and up [128, 64], down [64, 128], no biases; W -> U [out, r] + V [r, in]
    saved = LAYERS * 3 * (128 * 64 - rank * (128 + 64))
    assert count_parameters(model) == ParameterCount(dense - saved, dense - saved)


def test_checkpoint_size_sums_safetensors_and_index(tmp_path):
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"x" * 1_500_000)
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"x" * 250_000)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    (tmp_path / "config.json").write_bytes(b"y" * 10_000)  # not weights: left out
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "other.safetensors").write_bytes(b"z" * 10_000)  # not top level
    index_bytes = (tmp_path / "model.safetensors.index.json").stat().st_size
    assert checkpoint_size_mb(tmp_path) == pytest.approx((1_750_000 + index_bytes) / 1e6)
    assert checkpoint_size_mb(tmp_path / "model-00002-of-00002.safetensors") == 0.25


def test_checkpoint_size_of_save_pretrained(tmp_path):
    model = tiny_model("gpt2")
    model.save_pretrained(tmp_path)
    size = (tmp_path / "model.safetensors").stat().st_size
    assert checkpoint_size_mb(tmp_path) == size / 1e6
    assert size > 4 * GPT2_PARAMS  # fp32 values plus the header


def test_checkpoint_size_errors_name_the_path(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(
        InvalidParameterError, match=r"path=.*: no \*.safetensors file .*'config.json'"
    ):
        checkpoint_size_mb(tmp_path)
    with pytest.raises(
        InvalidParameterError, match=r"path=.*missing.*: expected a checkpoint folder"
    ):
        checkpoint_size_mb(tmp_path / "missing")


class Counting(nn.Module):
    """Wraps a model and appends ``name`` to a shared log on every call."""

    def __init__(self, model: nn.Module, name: str, log: list[str]) -> None:
        super().__init__()
        self.model, self.name, self.log = model, name, log

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        self.log.append(self.name)
        return self.model(**inputs).logits


def check_summary(result, repeats: int, tokens: int | None) -> None:
    times = np.array(result.times_s)
    assert len(times) == repeats and (times > 0).all()
    assert result.min_s <= result.p10_s <= result.median_s <= result.p90_s <= result.max_s
    assert (result.min_s, result.max_s) == (times.min(), times.max())
    assert result.median_s == pytest.approx(np.median(times))
    assert result.p10_s == pytest.approx(np.percentile(times, 10))
    assert result.p90_s == pytest.approx(np.percentile(times, 90))
    assert result.tokens == tokens
    if tokens is not None:
        assert result.tokens_per_s == pytest.approx(tokens / result.median_s)


def test_latency_warms_up_then_repeats():
    log: list[str] = []
    model = Counting(tiny_model("gpt2"), "model", log).train()
    ids = torch.randint(0, V, (2, 16))
    result = measure_latency(model, ids, warmup=2, repeats=7, progress=False)
    assert len(log) == 9
    check_summary(result, 7, tokens=32)
    assert all(m.training for m in model.modules())  # eval mode was restored


def test_latency_accepts_a_mapping_without_input_ids():
    model = tiny_model("llama")
    embeds = torch.randn(1, 8, D)
    result = measure_latency(model, {"inputs_embeds": embeds}, warmup=0, repeats=3, progress=False)
    check_summary(result, 3, tokens=None)
    assert result.tokens_per_s is None


def test_compare_speed_interleaves_and_divides_medians():
    log: list[str] = []
    model = Counting(tiny_model("llama"), "model", log)
    reference = Counting(tiny_model("gpt2"), "reference", log)
    inputs = {"input_ids": torch.randint(0, V, (1, 16))}
    result = compare_speed(model, reference, inputs, warmup=1, repeats=4, progress=False)
    assert log == ["reference", "model"] + ["reference", "model", "model", "reference"] * 2
    check_summary(result.model, 4, tokens=16)
    check_summary(result.reference, 4, tokens=16)
    assert result.speedup == result.reference.median_s / result.model.median_s


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"repeats": 0}, r"repeats=0: expected an int ≥ 1"),
        ({"warmup": -1}, r"warmup=-1: expected an int ≥ 0"),
        (
            {"inputs": {"input_ids": [[1, 2]]}},
            r"inputs\['input_ids'\]: expected a torch.Tensor, got list",
        ),
    ],
)
def test_latency_errors_name_the_argument(kwargs, match):
    arguments = {"inputs": torch.ones(1, 4, dtype=torch.long)} | kwargs
    with pytest.raises(InvalidParameterError, match=match):
        measure_latency(tiny_model("gpt2"), progress=False, **arguments)


def test_weighted_score_is_the_seed_formula():
    # seed 003, Table 1, BERT + Pruning: 90.33 %, 97.62 MB against 154.32 MB, speedup 1.37
    cr = compression_ratio(154.32, 97.62)
    assert cr == pytest.approx(154.32 / 97.62)
    score = weighted_score(0.9033, cr, 1.37, w_accuracy=1.0, w_compression_ratio=0.2, w_speedup=0.5)
    assert score == pytest.approx(1.0 * 0.9033 + 0.2 * 154.32 / 97.62 + 0.5 * 1.37)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda: weighted_score(
                90.33, 1.5, 1.3, w_accuracy=1, w_compression_ratio=1, w_speedup=1
            ),
            r"accuracy=90.33: expected a fraction in \[0, 1\]",
        ),
        (
            lambda: weighted_score(0.9, 0.0, 1.3, w_accuracy=1, w_compression_ratio=1, w_speedup=1),
            r"compression_ratio=0.0: expected a finite number > 0",
        ),
        (
            lambda: weighted_score(
                0.9, 1.5, 1.3, w_accuracy=1, w_compression_ratio=-1, w_speedup=1
            ),
            r"w_compression_ratio=-1: expected a finite weight ≥ 0",
        ),
        (
            lambda: compression_ratio(100.0, -1.0),
            r"compressed_mb=-1.0: expected a finite number > 0",
        ),
    ],
    ids=["percent-accuracy", "zero-ratio", "negative-weight", "negative-size"],
)
def test_weighted_score_errors_name_the_argument(call, match):
    with pytest.raises(InvalidParameterError, match=match):
        call()


@pytest.mark.gpu
def test_counts_and_latency_on_cuda():
    model = tiny_model("gpt2")
    compress_model(
        model,
        {"stages": [{"method": "prune", "targets": BLOCK_LINEARS, "pattern": "2:4"}]},
        progress=False,
    )
    cpu_count = count_parameters(model)
    model.to("cuda")
    assert count_parameters(model) == cpu_count
    result = measure_latency(
        model, torch.randint(0, V, (2, 16)), warmup=1, repeats=3, progress=False
    )
    check_summary(result, 3, tokens=32)
