"""``heads``: structured pruning of attention heads and GQA groups, against references built
here (dense models with dead heads, smaller models built from configs by hand, lstsq)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import hfcompress.structured.refit as refit_module
from conftest import (
    assert_unchanged,
    logits_without_hfcompress,
    model_output,
    snapshot,
    tiny_inputs,
    tiny_model,
)
from hfcompress import compress_model
from hfcompress.recipe import RecipeError
from hfcompress.structured import dense_weight

# tiny matrices gain nothing from threads; on a busy machine their spin-waits dominate
pytestmark = pytest.mark.usefixtures("one_thread")

CALIBRATION = torch.randint(1, 128, (8, 16), generator=torch.Generator().manual_seed(5))
TARGETS = r"model\.layers\.\d+\.self_attn"
# (family, query heads, KV heads): hidden size 64 throughout, so head_dim = 64 / heads
SHAPES = {
    "llama": ("llama", 4, 2),  # the conftest fixture's shape
    "llama-gqa4": ("llama", 8, 2),  # groups of 4 query heads
    "llama-kv4": ("llama", 8, 4),
    "llama-mha": ("llama", 4, 4),
    "llama-bias": ("llama", 4, 2),  # attention_bias: q/k/v/o all have a bias
    "qwen2": ("qwen2", 4, 2),  # q/k/v biases, none on o_proj
}


def build(name: str = "llama", layers: int = 2) -> nn.Module:
    """A tiny causal LM of shape ``SHAPES[name]`` (seed 0, eval mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    family, heads, kv_heads = SHAPES[name]
    common = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": 128,
        "max_position_embeddings": 64,
    }
    torch.manual_seed(0)
    if family == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    config = LlamaConfig(**common, attention_bias=name == "llama-bias")
    return LlamaForCausalLM(config).eval()


def inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    return tiny_inputs("llama", model)


def stage(**settings) -> dict:
    return {"stages": [{"method": "heads", "targets": TARGETS, **settings}]}


def attentions(model: nn.Module) -> list[nn.Module]:
    return [layer.self_attn for layer in model.model.layers]


def head_dim(model: nn.Module) -> int:
    return attentions(model)[0].head_dim


def kill_query_heads(model: nn.Module, heads: list[int]) -> None:
    """Zero o_proj's columns of query heads ``heads`` in every layer: they then add exactly
    nothing to the attention's output."""
    d = head_dim(model)
    for attention in attentions(model):
        with torch.no_grad():
            for h in heads:
                attention.o_proj.weight[:, h * d : (h + 1) * d] = 0.0


def kill_kv_values(model: nn.Module, kv_heads: list[int]) -> None:
    """Zero v_proj's rows (and bias) of KV heads ``kv_heads``: every query head of those groups
    then outputs exactly 0, so o_proj's input is 0 there."""
    d = head_dim(model)
    for attention in attentions(model):
        with torch.no_grad():
            for g in kv_heads:
                attention.v_proj.weight[g * d : (g + 1) * d] = 0.0
                if attention.v_proj.bias is not None:
                    attention.v_proj.bias[g * d : (g + 1) * d] = 0.0


def kept_heads(old: nn.Linear, new: nn.Linear, d: int) -> list[int]:
    """Which heads of ``old`` (a q/k/v projection) the heads of ``new`` are (exact copies)."""
    old_heads = dense_weight(old).detach().reshape(-1, d * old.in_features)
    new_heads = dense_weight(new).detach().reshape(-1, d * new.in_features)
    distance = torch.cdist(new_heads.double(), old_heads.double())
    assert float(distance.min(1).values.max()) < 1e-6
    return distance.argmin(1).tolist()


def rows(heads: list[int], d: int) -> torch.Tensor:
    return torch.tensor([h * d + i for h in heads for i in range(d)])


# --- dead heads go, outputs stay --------------------------------------------------------------


@pytest.mark.parametrize("criterion", ["magnitude", "activation", "taylor"])
@pytest.mark.parametrize("name", ["llama", "llama-gqa4", "qwen2"])
def test_dead_groups_go_and_outputs_stay(name, criterion):
    model = build(name)
    _, heads, kv_heads = SHAPES[name]
    size = heads // kv_heads
    kill_query_heads(model, list(range(size)))  # all of group 0
    x = inputs(model)
    expected = model_output(model, x)
    calibration = None if criterion == "magnitude" else CALIBRATION
    report = compress_model(
        model,
        stage(keep=0.5, criterion=criterion, refit=False),
        calibration=calibration,
        progress=False,
    )
    for attention in attentions(model):
        assert attention.q_proj.out_features == heads // 2 * attention.head_dim
        assert attention.num_key_value_groups == size
    torch.testing.assert_close(model_output(model, x), expected, atol=1e-5, rtol=1e-5)
    assert [(m.shape, m.shape_after) for m in report.modules] == [
        ((heads, kv_heads), (heads // 2, kv_heads // 2))
    ] * 2


@pytest.mark.parametrize("name", ["llama-gqa4", "qwen2"])
def test_zero_attention_output_is_what_activation_removes(name):
    # v rows zero: o_proj's input is exactly 0 for the group; its weights are not small
    model = build(name)
    kill_kv_values(model, [1])
    x = inputs(model)
    expected = model_output(model, x)
    compress_model(
        model,
        stage(keep=0.5, criterion="activation", refit=False),
        calibration=CALIBRATION,
        progress=False,
    )
    torch.testing.assert_close(model_output(model, x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("criterion", ["magnitude", "activation", "taylor"])
def test_dead_query_heads_go_evenly_per_group(criterion):
    model = build("llama-gqa4")  # 8 query heads in 2 groups of 4
    kill_query_heads(model, [0, 2, 5, 7])  # two in each group
    x = inputs(model)
    expected = model_output(model, x)
    compress_model(
        model,
        stage(keep=0.5, groups="query", criterion=criterion, refit=False),
        calibration=None if criterion == "magnitude" else CALIBRATION,
        progress=False,
    )
    for attention in attentions(model):
        assert attention.num_key_value_groups == 2
        assert attention.k_proj.out_features == 2 * attention.head_dim  # every KV head stays
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (4, 2)
    torch.testing.assert_close(model_output(model, x), expected, atol=1e-5, rtol=1e-5)


# --- the pruned attention is an ordinary smaller attention ------------------------------------


def smaller_by_hand(dense: nn.Module, pruned: nn.Module) -> nn.Module:
    """A fresh model from a config with the pruned head counts (head_dim given), holding the
    dense weights and, per layer, the kept heads' q/k/v rows and o_proj columns, by hand."""
    d = head_dim(dense)
    kept = []
    for old, new in zip(attentions(dense), attentions(pruned), strict=True):
        kept.append((kept_heads(old.q_proj, new.q_proj, d), kept_heads(old.k_proj, new.k_proj, d)))
    config = copy.deepcopy(dense.config)
    config.num_attention_heads = len(kept[0][0])
    config.num_key_value_heads = len(kept[0][1])
    config.head_dim = d
    torch.manual_seed(1)
    reference = type(dense)(config).eval()
    state = dense.state_dict()
    for index, (query, kv) in enumerate(kept):
        prefix = f"model.layers.{index}.self_attn."
        for proj, heads in (("q_proj", query), ("k_proj", kv), ("v_proj", kv)):
            for kind in ("weight", "bias"):
                key = prefix + f"{proj}.{kind}"
                if key in state:
                    state[key] = state[key][rows(heads, d)]
        state[prefix + "o_proj.weight"] = state[prefix + "o_proj.weight"][:, rows(query, d)]
    reference.load_state_dict(state)
    return reference


@pytest.mark.parametrize("groups", ["kv", "query"])
@pytest.mark.parametrize("name", ["llama-gqa4", "llama-kv4", "qwen2"])
def test_pruned_attention_equals_a_smaller_model_built_by_hand(name, groups):
    if groups == "query" and SHAPES[name][1] // SHAPES[name][2] < 2:
        pytest.skip("no GQA groups to thin")
    model = build(name)
    dense = copy.deepcopy(model)
    compress_model(model, stage(keep=0.5, groups=groups, criterion="magnitude"), progress=False)
    reference = smaller_by_hand(dense, model)
    x = inputs(model)
    torch.testing.assert_close(model_output(model, x), model_output(reference, x))


# --- the refit --------------------------------------------------------------------------------


def o_proj_inputs(model: nn.Module, calibration: torch.Tensor) -> torch.Tensor:
    """o_proj's inputs X [tokens, heads·d] of the first layer over the calibration data."""
    seen = []
    o_proj = attentions(model)[0].o_proj
    handle = o_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            for batch in calibration.split(8):
                model(input_ids=batch, use_cache=False)
    finally:
        handle.remove()
    return torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]).double()


def sharpen(model: nn.Module, scale: float = 5.0) -> None:
    """Scale q/k up: at initialization attention is nearly uniform, so the query heads of one
    group average the same values and their outputs are almost collinear (cond(X_K) ≈ 300);
    sharper attention makes the least-squares problem well conditioned (≈ 10)."""
    with torch.no_grad():
        for attention in attentions(model):
            attention.q_proj.weight.mul_(scale)
            attention.k_proj.weight.mul_(scale)


@pytest.mark.parametrize("groups", ["kv", "query"])
@pytest.mark.parametrize("name", ["llama-gqa4", "llama-bias"])  # o_proj without / with bias
def test_refit_is_the_least_squares_solution(name, groups):
    model = build(name)
    sharpen(model)
    d = head_dim(model)
    # more tokens than kept columns (+ bias): the least-squares problem is determined
    calibration = torch.randint(1, 128, (16, 32), generator=torch.Generator().manual_seed(7))
    X = o_proj_inputs(model, calibration)  # the first layer's inputs depend on no pruning
    o_proj = attentions(model)[0].o_proj
    W, b = o_proj.weight.detach().double(), o_proj.bias
    Y = X @ W.T + (0 if b is None else b.detach().double())
    q_before = copy.deepcopy(attentions(model)[0].q_proj)
    report = compress_model(
        model,
        stage(keep=0.5, groups=groups, criterion="activation", refit=True, refit_damping=0.0),
        calibration=calibration,
        progress=False,
    )
    kept = rows(kept_heads(q_before, attentions(model)[0].q_proj, d), d)
    regressors = X[:, kept]
    if b is not None:
        regressors = torch.cat([regressors, torch.ones(len(X), 1, dtype=X.dtype)], 1)
    solution = torch.linalg.lstsq(regressors, Y).solution.T  # [out, |K| (+1)]
    new = attentions(model)[0].o_proj
    torch.testing.assert_close(
        new.weight.detach().double(), solution[:, : len(kept)], atol=2e-4, rtol=1e-3
    )
    if b is not None:
        torch.testing.assert_close(
            new.bias.detach().double(), solution[:, -1], atol=2e-4, rtol=1e-3
        )
    assert report.modules[0].settings["refit"] is True
    assert report.modules[0].output_error is not None


def test_refit_lowers_the_output_error():
    calibration = torch.randint(1, 128, (32, 32), generator=torch.Generator().manual_seed(6))
    errors = {}
    for refit in (False, True):
        model = build("llama-gqa4")
        x = inputs(model)
        dense = model_output(model, x)
        compress_model(
            model,
            stage(keep=0.5, groups="query", refit=refit),
            calibration=calibration,
            progress=False,
        )
        errors[refit] = float((model_output(model, x) - dense).norm())
    assert errors[True] < errors[False]


# --- checkpoints and generation ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "groups", "counts"),
    [("llama", "kv", (2, 1)), ("qwen2", "kv", (2, 1)), ("llama-gqa4", "query", (4, 2))],
)
def test_uniform_heads_save_a_plain_checkpoint(name, groups, counts, tmp_path):
    model = build(name)
    x = inputs(model)
    compress_model(model, stage(keep=0.5, groups=groups), calibration=CALIBRATION, progress=False)
    expected = model_output(model, x)
    model.save_pretrained(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == counts
    assert config["head_dim"] == 64 // SHAPES[name][1]  # not its default, 64 // heads
    got = logits_without_hfcompress(
        tmp_path / "out", type(model).__name__, x["input_ids"], tmp_path
    )
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _greedy_without_cache(model: nn.Module, ids: torch.Tensor, steps: int) -> torch.Tensor:
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids, use_cache=False).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


@pytest.mark.parametrize(("name", "groups"), [("llama", "kv"), ("llama-gqa4", "query")])
def test_generate_with_the_kv_cache_after_pruning(name, groups):
    model = build(name)
    compress_model(model, stage(keep=0.5, groups=groups), calibration=CALIBRATION, progress=False)
    ids = inputs(model)["input_ids"]
    with torch.no_grad():
        generated = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=6,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
        )
    assert torch.equal(generated, _greedy_without_cache(model, ids, 6))


@pytest.mark.parametrize("groups", ["kv", "query"])
def test_per_layer_heads_reload_with_hfcompress(groups, tmp_path):
    from transformers import AutoConfig

    model = build("llama-kv4" if groups == "kv" else "llama-gqa4")
    x = inputs(model)
    keep = {"kv": (0.5, 0.75), "query": (0.5, 0.25)}[groups]
    recipe = stage(
        keep=keep[1], groups=groups, overrides={r"model\.layers\.0\..*": {"keep": keep[0]}}
    )
    compress_model(model, recipe, calibration=CALIBRATION, progress=False)
    counts = [(a.q_proj.out_features, a.num_key_value_groups) for a in attentions(model)]
    assert counts[0] != counts[1]
    assert model.config.num_attention_heads == 8  # the config keeps its value
    expected = model_output(model, x)
    model.save_pretrained(tmp_path / "out")
    config = AutoConfig.from_pretrained(tmp_path / "out")
    assert config.quantization_config["shapes"]
    assert bool(config.quantization_config.get("settings")) == (groups == "query")
    loaded = type(model).from_pretrained(tmp_path / "out").eval()
    assert [(a.q_proj.out_features, a.num_key_value_groups) for a in attentions(loaded)] == counts
    torch.testing.assert_close(model_output(loaded, x), expected, atol=1e-5, rtol=1e-5)


def test_some_layers_only_keep_the_config():
    model = build("llama")
    compress_model(
        model,
        {
            "stages": [
                {
                    "method": "heads",
                    "targets": r"model\.layers\.1\.self_attn",
                    "keep": 0.5,
                    "criterion": "magnitude",
                }
            ]
        },
        progress=False,
    )
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (4, 2)
    assert [a.q_proj.out_features for a in attentions(model)] == [64, 32]


def test_heads_then_width_then_lowrank_composes_and_reloads(tmp_path):
    model = build("llama")
    x = inputs(model)
    recipe = {
        "stages": [
            {"method": "heads", "targets": TARGETS, "keep": 0.5},
            {"method": "width", "targets": r"model\.layers\.\d+\.mlp", "keep": 0.5},
            {"method": "lowrank", "targets": r".*self_attn\.o_proj", "rank": 8},
        ]
    }
    report = compress_model(model, recipe, calibration=CALIBRATION, progress=False)
    assert [m.methods for m in report.modules] == (
        [["heads"]] * 2 + [["width"]] * 2 + [["lowrank"]] * 2
    )
    o_proj = attentions(model)[0].o_proj
    assert (o_proj.in_features, o_proj.out_features, o_proj.rank) == (32, 64, 8)
    expected = model_output(model, x)
    model.save_pretrained(tmp_path / "out")
    loaded = type(model).from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(model_output(loaded, x), expected, atol=1e-5, rtol=1e-5)


# --- the report -------------------------------------------------------------------------------


def test_report_lists_head_counts_before_and_after():
    model = build("llama-gqa4")
    report = compress_model(
        model, stage(keep=0.5, groups="query"), calibration=CALIBRATION, progress=False
    )
    assert [m.name for m in report.modules] == [
        "model.layers.0.self_attn",
        "model.layers.1.self_attn",
    ]
    assert [(m.shape, m.shape_after) for m in report.modules] == [((8, 2), (4, 2))] * 2
    assert all(m.params_after < m.params_before for m in report.modules)
    assert all(m.settings["groups"] == "query" for m in report.modules)
    assert "[8, 2] → [4, 2]" in str(report)
    assert report.to_dict()["modules"][0]["shape_after"] == [4, 2]
    # q/o lose half their heads, k/v none: 4 × 64 × 64 + 2 × 64 × 16 → 2 × 64 × 32 + 2 × 64 × 16
    assert report.modules[0].params_after == 2 * 64 * 32 + 2 * 64 * 16


def test_dry_run_changes_nothing_and_reports():
    model = build("llama")
    before = snapshot(model)
    report = compress_model(
        model, stage(keep=0.5, criterion="magnitude"), dry_run=True, progress=False
    )
    assert_unchanged(model, before)
    assert [m.shape_after for m in report.modules] == [(2, 1), (2, 1)]
    assert report.model_params_after < report.model_params_before


# --- errors: named, and the model untouched ---------------------------------------------------


@pytest.mark.parametrize(
    ("name", "settings", "calibrated", "message"),
    [
        ("llama", {"keep": 0.0}, True, r"stages\[0\]\(heads\)\.keep: Input should be greater"),
        ("llama", {"keep": 1.5}, True, r"stages\[0\]\(heads\)\.keep: Input should be less"),
        (
            "llama",
            {"keep": 0.2},
            True,
            r"stages\[0\]\(heads\)\.keep: 0\.2 keeps none of the 2 KV groups of "
            r"'model\.layers\.0\.self_attn' \(and 1 more\)",
        ),
        ("llama", {"keep": 0.8}, True, r"stages\[0\]\(heads\)\.keep: 0\.8 removes none of the 2"),
        (
            "llama-gqa4",
            {"keep": 0.1, "groups": "query"},
            True,
            r"stages\[0\]\(heads\)\.keep: 0\.1 keeps none of the 4 query heads per KV group",
        ),
        (
            "llama-mha",
            {"keep": 0.5, "groups": "query"},
            True,
            r"stages\[0\]\(heads\)\.groups: 'query' .* one query head per KV head",
        ),
        ("llama", {"keep": 0.5, "groups": "all"}, True, r"stages\[0\]\(heads\)\.groups: Input"),
        ("llama", {"keep": 0.5}, False, r"stages\[0\]\(heads\)\.criterion: 'activation' needs"),
        (
            "llama",
            {"keep": 0.5, "criterion": "magnitude", "refit": True},
            False,
            r"stages\[0\]\(heads\)\.refit: the least-squares refit needs calibration",
        ),
        (
            "llama",
            {"keep": 0.5, "targets": r"model\.layers\.\d+"},
            True,
            r"stages\[0\]\(heads\)\.targets: .* is a LlamaDecoderLayer",
        ),
        ("llama", {"keep": 0.5, "targets": "nothing"}, True, r"fully matches no module"),
        (
            "llama",
            {"keep": 0.5, "overrides": {r"model\.layers\.1\..*": {"keep": 0.1}}},
            True,
            r"stages\[0\]\(heads\)\.keep: 0\.1 keeps none .* 'model\.layers\.1\.self_attn'",
        ),
    ],
)
def test_bad_stages_are_refused_and_the_model_is_untouched(name, settings, calibrated, message):
    model = build(name)
    before = snapshot(model)
    with pytest.raises(RecipeError, match=message):
        compress_model(
            model,
            stage(**settings),
            calibration=CALIBRATION if calibrated else None,
            progress=False,
        )
    assert_unchanged(model, before)


def test_groups_that_do_not_divide_are_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    # 6 query heads over 4 KV heads: transformers builds it, but it is no GQA layout
    config = LlamaConfig(
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=6,
        num_key_value_heads=4,
        head_dim=8,
        vocab_size=128,
    )
    model = LlamaForCausalLM(config).eval()
    before = snapshot(model)
    with pytest.raises(RecipeError, match=r"heads\)\.targets: .* 6 query heads do not split"):
        compress_model(model, stage(keep=0.5, criterion="magnitude"), progress=False)
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    ("arch", "targets", "cls"),
    [
        ("gpt2", r"transformer\.h\.\d+\.attn", "GPT2Attention"),
        ("opt", r"model\.decoder\.layers\.\d+\.self_attn", "OPTAttention"),
        ("bert", r"bert\.encoder\.layer\.\d+\.attention\.self", "BertSelfAttention"),
        ("t5", r"encoder\.block\.\d+\.layer\.0\.SelfAttention", "T5Attention"),
    ],
)
def test_other_attention_layouts_are_refused_naming_the_class(arch, targets, cls):
    model = tiny_model(arch)
    before = snapshot(model)
    recipe = {
        "stages": [{"method": "heads", "targets": targets, "keep": 0.5, "criterion": "magnitude"}]
    }
    with pytest.raises(RecipeError, match=rf"stages\[0\]\(heads\)\.targets: .* is a {cls}"):
        compress_model(model, recipe, progress=False)
    assert_unchanged(model, before)


def test_compressed_children_are_refused():
    model = build("llama")
    compress_model(
        model,
        {"stages": [{"method": "lowrank", "targets": r".*q_proj", "rank": 8}]},
        progress=False,
    )
    before = snapshot(model)
    with pytest.raises(RecipeError, match=r"heads\)\.targets: .* holds \['LowRankLinear'\]"):
        compress_model(model, stage(keep=0.5, criterion="magnitude"), progress=False)
    assert_unchanged(model, before)


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, RuntimeError])
def test_a_failure_midway_restores_the_model(monkeypatch, interrupt):
    model = build("llama-gqa4")
    before = snapshot(model)
    calls = []
    real = refit_module.refit_consumer

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the first attention is already pruned, its group size changed
            raise interrupt("stop")
        return real(*args, **kwargs)

    monkeypatch.setattr(refit_module, "refit_consumer", failing)
    recipe = stage(keep=0.5, groups="query")
    with pytest.raises(interrupt):
        compress_model(model, recipe, calibration=CALIBRATION, progress=False)
    assert len(calls) == 2
    assert_unchanged(model, before)
    assert all(a.num_key_value_groups == 4 for a in attentions(model))


def test_keep_one_leaves_an_attention_as_it_is():
    model = build("llama")
    first = copy.deepcopy(attentions(model)[0])
    recipe = stage(keep=0.5, criterion="magnitude", overrides={r".*\.0\..*": {"keep": 1.0}})
    report = compress_model(model, recipe, progress=False)
    assert [m.name for m in report.modules] == ["model.layers.1.self_attn"]
    kept = attentions(model)[0]
    for child in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert torch.equal(getattr(kept, child).weight, getattr(first, child).weight)
    assert attentions(model)[1].q_proj.out_features == 32
