"""``depth``: removing whole transformer blocks, against references built here."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import hfcompress.methods.depth.build as depth_build
from conftest import assert_unchanged, model_output, snapshot, tiny_inputs, tiny_model
from hfcompress import HfCompressError, compress_model
from hfcompress.recipe import Recipe, RecipeError
from hfcompress.registry import needs_calibration

# tiny matrices gain nothing from threads; on a busy machine their spin-waits dominate
pytestmark = pytest.mark.usefixtures("one_thread")

CALIBRATION = torch.randint(1, 128, (8, 16), generator=torch.Generator().manual_seed(5))
ARCHS = ["gpt2", "llama", "opt", "bert", "t5"]
CAUSAL = ["gpt2", "llama", "opt"]
BLOCKS = 4
STACKS = {
    "gpt2": "transformer.h",
    "llama": "model.layers",
    "opt": "model.decoder.layers",
    "bert": "bert.encoder.layer",
    "t5": "decoder.block",  # T5 has two stacks; the tests prune the decoder's
}
# The config field that counts each fixture's pruned stack in config.json.
COUNT_KEYS = {
    "gpt2": "n_layer",
    "llama": "num_hidden_layers",
    "opt": "num_hidden_layers",
    "bert": "num_hidden_layers",
    "t5": "num_decoder_layers",
}
# The Linears that write into the residual stream: zeroed, the block is exactly the identity.
RESIDUAL_WRITERS = {
    "gpt2": ["attn.c_proj", "mlp.c_proj"],
    "llama": ["self_attn.o_proj", "mlp.down_proj"],
    "opt": ["self_attn.out_proj", "fc2"],
    "bert": ["attention.output.dense", "output.dense"],
    "t5": ["layer.0.SelfAttention.o", "layer.1.EncDecAttention.o", "layer.2.DenseReluDense.wo"],
}
# Blocks the tests drop by index (T5's block 0 holds the position bias and must stay).
GIVEN = {"t5": [1, 2]}


def build(arch: str) -> nn.Module:
    """The conftest fixture of ``arch`` with ``BLOCKS`` blocks per stack (seed 0, eval mode)."""
    dense = tiny_model(arch)
    config = dense.config
    config.num_hidden_layers = BLOCKS
    if arch == "t5":
        config.num_decoder_layers = BLOCKS
    torch.manual_seed(0)
    return type(dense)(config).eval()


def stack(model: nn.Module, arch: str) -> nn.ModuleList:
    return model.get_submodule(STACKS[arch])


def recipe(arch: str, **settings) -> dict:
    targets = {"targets": r"decoder\.block"} if arch == "t5" else {}
    return {"stages": [{"method": "depth", **targets, **settings}]}


def by_hand(model: nn.Module, arch: str, dropped: list[int]) -> nn.Module:
    """A copy of the dense model with blocks ``dropped`` removed, config and KV-cache slots
    fixed by hand."""
    pruned = copy.deepcopy(model)
    blocks = stack(pruned, arch)
    kept = [block for i, block in enumerate(blocks) if i not in dropped]
    parent, _, child = STACKS[arch].rpartition(".")
    setattr(pruned.get_submodule(parent), child, nn.ModuleList(kept))
    setattr(pruned.config, COUNT_KEYS[arch], len(kept))
    for index, block in enumerate(kept):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = index
    return pruned


def make_identity(model: nn.Module, arch: str, index: int) -> None:
    """Zero what block ``index`` adds to the residual stream: it then returns its input."""
    block = stack(model, arch)[index]
    with torch.no_grad():
        for name in RESIDUAL_WRITERS[arch]:
            linear = block.get_submodule(name)
            linear.weight.zero_()
            if linear.bias is not None:
                linear.bias.zero_()


# --- what the pruned model computes -----------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_given_layers_equal_the_kept_blocks_run_by_hand(arch):
    model = build(arch)
    layers = GIVEN.get(arch, [0, 2])
    x = tiny_inputs(arch, model)
    expected = model_output(by_hand(model, arch, layers), x)
    params = [sum(p.numel() for p in stack(model, arch)[i].parameters()) for i in layers]
    report = compress_model(model, recipe(arch, layers=layers), progress=False)
    assert len(stack(model, arch)) == BLOCKS - len(layers)
    assert getattr(model.config, COUNT_KEYS[arch]) == BLOCKS - len(layers)
    torch.testing.assert_close(model_output(model, x), expected, atol=1e-5, rtol=1e-5)
    assert [m.name for m in report.modules] == [f"{STACKS[arch]}.{i}" for i in layers]
    assert [m.params_before for m in report.modules] == params
    assert all(m.params_after == 0 for m in report.modules)
    assert all(m.shape == (BLOCKS,) and m.shape_after == (BLOCKS - 2,) for m in report.modules)
    assert report.modules[0].settings == {"criterion": "given", "score": None}
    assert report.model_params_before - report.model_params_after == sum(params)


def test_llama_is_embed_then_kept_blocks_then_norm_then_head():
    model = build("llama")
    ids = tiny_inputs("llama", model)["input_ids"]
    inner = model.model
    kept = [inner.layers[1], inner.layers[3]]
    with torch.no_grad():
        positions = torch.arange(ids.shape[1])[None]
        hidden = inner.embed_tokens(ids)
        rotary = inner.rotary_emb(hidden, positions)
        for block in kept:
            # no mask: the attention is then causal
            hidden = block(hidden, position_embeddings=rotary, position_ids=positions)
        expected = model.lm_head(inner.norm(hidden))
    compress_model(model, recipe("llama", layers=[0, 2]), progress=False)
    assert list(model.model.layers) == kept
    assert [b.self_attn.layer_idx for b in model.model.layers] == [0, 1]
    torch.testing.assert_close(
        model_output(model, {"input_ids": ids}), expected, atol=1e-5, rtol=1e-5
    )


def _greedy_without_cache(model: nn.Module, ids: torch.Tensor, steps: int) -> torch.Tensor:
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids, use_cache=False).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("arch", CAUSAL)
def test_generation_with_the_kv_cache_equals_greedy_without(arch):
    model = build(arch)
    compress_model(model, recipe(arch, layers=[0, 2]), progress=False)
    ids = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(2))
    expected = _greedy_without_cache(model, ids, 5)
    with torch.no_grad():
        got = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False
        )
    assert torch.equal(got, expected)


def test_qwen2_layer_types_follow_the_kept_blocks():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=2,
    )
    model = Qwen2ForCausalLM(config).eval()
    assert model.config.layer_types[1:3] == ["full_attention", "sliding_attention"]
    compress_model(model, {"stages": [{"method": "depth", "layers": [0, 3]}]}, progress=False)
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    ids = torch.randint(1, 128, (1, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(got, _greedy_without_cache(model, ids, 5))


# --- saving -----------------------------------------------------------------------------------

_LOAD_ALL = """
import json, sys, torch, transformers
folder = sys.argv[1]
for arch, cls in json.load(open(f"{folder}/classes.json")).items():
    m = getattr(transformers, cls).from_pretrained(f"{folder}/{arch}").eval()
    ids = torch.load(f"{folder}/ids.pt")
    kw = {"decoder_input_ids": ids[:, :6]} if m.config.is_encoder_decoder else {}
    with torch.no_grad():
        torch.save(m(input_ids=ids, **kw).logits, f"{folder}/{arch}.pt")
assert "hfcompress" not in sys.modules
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple:
    """Every architecture pruned and saved, then loaded by transformers alone (one process)."""
    folder = tmp_path_factory.mktemp("depth")
    expected, classes = {}, {}
    ids = tiny_inputs("llama", None)["input_ids"]
    torch.save(ids, folder / "ids.pt")
    for arch in ARCHS:
        model = build(arch)
        compress_model(model, recipe(arch, drop=2), calibration=CALIBRATION, progress=False)
        expected[arch] = model_output(model, tiny_inputs(arch, model))
        model.save_pretrained(folder / arch)
        classes[arch] = type(model).__name__
    (folder / "classes.json").write_text(json.dumps(classes))
    subprocess.run([sys.executable, "-c", _LOAD_ALL, str(folder)], check=True, capture_output=True)
    return folder, expected


@pytest.mark.parametrize("arch", ARCHS)
def test_saves_a_plain_checkpoint_that_transformers_loads(arch, saved):
    folder, expected = saved
    config = json.loads((folder / arch / "config.json").read_text())
    assert "quantization_config" not in config
    assert config[COUNT_KEYS[arch]] == BLOCKS - 2
    if arch == "t5":
        assert config["num_layers"] == BLOCKS  # the encoder keeps its blocks
    got = torch.load(folder / f"{arch}.pt")
    torch.testing.assert_close(got, expected[arch], atol=1e-5, rtol=1e-5)


def test_depth_then_lowrank_composes_and_reloads(tmp_path):
    model = build("llama")
    x = tiny_inputs("llama", model)
    stages = [
        {"method": "depth", "layers": [1]},
        {"method": "lowrank", "targets": r".*mlp\.down_proj", "rank": 8},
    ]
    report = compress_model(model, {"stages": stages}, progress=False)
    assert [m.methods for m in report.modules] == [["depth"]] + [["lowrank"]] * 3
    assert model.model.layers[2].mlp.down_proj.rank == 8
    expected = model_output(model, x)
    model.save_pretrained(tmp_path / "out")
    loaded = type(model).from_pretrained(tmp_path / "out").eval()
    assert len(loaded.model.layers) == 3
    torch.testing.assert_close(model_output(loaded, x), expected, atol=1e-5, rtol=1e-5)


# --- choosing the blocks ----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_block_influence_drops_the_identity_block(arch):
    model = build(arch)
    make_identity(model, arch, 2)
    x = tiny_inputs(arch, model)
    expected = model_output(model, x)
    report = compress_model(model, recipe(arch, drop=1), calibration=CALIBRATION, progress=False)
    assert [m.name for m in report.modules] == [f"{STACKS[arch]}.2"]
    assert report.modules[0].settings["criterion"] == "block_influence"
    assert report.modules[0].settings["score"] == pytest.approx(0.0, abs=1e-5)
    # an identity block is no loss: the outputs stay
    torch.testing.assert_close(model_output(model, x), expected, atol=1e-5, rtol=1e-5)


def test_block_influence_is_one_minus_the_cosine_of_consecutive_hidden_states():
    model = build("llama")
    with torch.no_grad():
        states = model(input_ids=CALIBRATION, output_hidden_states=True).hidden_states
    # hidden_states[i] is block i's input, [i + 1] its output (the last is after the norm)
    expected = [
        float((1 - torch.cosine_similarity(states[i], states[i + 1], dim=-1)).mean())
        for i in range(BLOCKS - 1)
    ]
    batches = [{"input_ids": b} for b in CALIBRATION.split(3)]
    scores = depth_build.block_influence_scores(model, "model.layers", [], batches, False)
    assert scores.shape == (BLOCKS,)
    torch.testing.assert_close(scores[:-1].tolist(), expected, atol=1e-5, rtol=1e-4)


def test_block_influence_ignores_padding():
    model = build("llama")
    mask = torch.ones_like(CALIBRATION)
    mask[:, 10:] = 0
    batches = [{"input_ids": CALIBRATION, "attention_mask": mask}]
    padded = depth_build.block_influence_scores(model, "model.layers", [], batches, False)
    # causal attention: the first 10 tokens do not see the padding after them
    short = [{"input_ids": CALIBRATION[:, :10]}]
    unpadded = depth_build.block_influence_scores(model, "model.layers", [], short, False)
    torch.testing.assert_close(padded, unpadded, atol=1e-5, rtol=1e-4)


def _lm_loss(model: nn.Module) -> float:
    with torch.no_grad():
        return float(model(input_ids=CALIBRATION, labels=CALIBRATION).loss)


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_loss_scores_are_the_loss_rise_of_each_model_without_one_block(arch):
    model = build(arch)
    candidates = [1, 2, 3] if arch == "t5" else list(range(BLOCKS))
    base = _lm_loss(model)
    expected = [_lm_loss(by_hand(model, arch, [i])) - base for i in candidates]
    batches = [{"input_ids": CALIBRATION}]
    scores = depth_build.loss_scores(model, STACKS[arch], candidates, batches, False)
    torch.testing.assert_close(scores[candidates].tolist(), expected, atol=1e-5, rtol=1e-4)
    if arch == "t5":
        assert torch.isnan(scores[0])  # block 0 is never a candidate
    report = compress_model(
        model, recipe(arch, drop=1, criterion="loss"), calibration=CALIBRATION, progress=False
    )
    lowest = candidates[min(range(len(expected)), key=expected.__getitem__)]
    assert [m.name for m in report.modules] == [f"{STACKS[arch]}.{lowest}"]
    assert report.modules[0].settings["score"] == pytest.approx(min(expected), abs=1e-5)


def test_excluded_blocks_stay():
    model = build("llama")
    make_identity(model, "llama", 2)
    report = compress_model(
        model,
        recipe("llama", drop=1, exclude=r"model\.layers\.2"),
        calibration=CALIBRATION,
        progress=False,
    )
    assert report.modules[0].name != "model.layers.2"


def test_t5_never_drops_the_block_holding_the_position_bias():
    model = build("t5")
    make_identity(model, "t5", 0)  # the lowest influence, but block 0 computes the position bias
    report = compress_model(model, recipe("t5", drop=1), calibration=CALIBRATION, progress=False)
    assert report.modules[0].name != "decoder.block.0"
    first = model.decoder.block[0].layer[0].SelfAttention
    assert first.has_relative_attention_bias


def test_dry_run_changes_nothing_and_reports():
    model = build("llama")
    before = snapshot(model)
    report = compress_model(model, recipe("llama", layers=[1, 2]), dry_run=True, progress=False)
    assert_unchanged(model, before)
    assert [m.shape_after for m in report.modules] == [(2,), (2,)]
    assert report.model_params_after < report.model_params_before


# --- refusals and failures --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "settings", "calibrated", "message"),
    [
        ("llama", {"drop": 4}, True, r"\(depth\)\.drop: 4 drops every block.*at least one"),
        ("llama", {"layers": [0, 1, 2, 3]}, True, r"\(depth\)\.layers: drops every block"),
        ("llama", {"layers": [1, 4]}, True, r"\(depth\)\.layers: \[4\] out of range.*4 blocks"),
        ("llama", {"layers": [-1]}, True, r"\(depth\)\.layers: \[-1\] out of range"),
        ("llama", {"layers": [1, 1]}, True, r"\(depth\)\.layers: \[1\] listed more than once"),
        ("llama", {"drop": 1}, False, r"\(depth\)\.criterion: 'block_influence' \(the default"),
        ("llama", {"drop": 1, "criterion": "loss"}, False, r"\(depth\)\.criterion: 'loss' needs"),
        ("llama", {"drop": 0}, True, r"\(depth\)\.drop: Input should be greater than or equal"),
        ("llama", {"drop": True}, True, r"\(depth\)\.drop: Input should be a valid integer"),
        ("llama", {}, True, r"\(depth\)\.layers: give exactly one of `drop`"),
        ("llama", {"drop": 1, "layers": [0]}, True, r"\(depth\)\.layers: give exactly one"),
        ("llama", {"layers": [0], "criterion": "loss"}, True, r"\(depth\)\.criterion: 'loss' ch"),
        ("llama", {"drop": 1, "overrides": {"x": {}}}, True, r"\(depth\)\.overrides: depth acts"),
        ("llama", {"drop": 1, "targets": "nothing"}, True, r"\(depth\)\.targets: 'nothing' mu"),
        (
            "llama",
            {"drop": 1, "targets": r"model\.layers\.0"},
            True,
            r"\(depth\).*no nn\.ModuleList",
        ),
        ("bert", {"drop": 1, "criterion": "loss"}, True, r"\(depth\)\.criterion: 'loss'.*no lan"),
        ("t5", {"drop": 1}, True, r"\(depth\)\.targets: .*2 stacks of blocks \['enc"),
        (
            "t5",
            {"layers": [0], "targets": r"decoder\.block"},
            True,
            r"\(depth\)\.layers: .*relative_a",
        ),
    ],
)
def test_bad_stages_are_refused_and_the_model_is_untouched(arch, settings, calibrated, message):
    model = build(arch)
    before = snapshot(model)
    with pytest.raises(RecipeError, match=r"stages\[0\]" + message):
        compress_model(
            model,
            {"stages": [{"method": "depth", **settings}]},
            calibration=CALIBRATION if calibrated else None,
            progress=False,
        )
    assert_unchanged(model, before)


def test_an_index_dependent_attention_drops_only_the_last_blocks():
    model = build("gpt2")
    model.config.scale_attn_by_inverse_layer_idx = True
    for settings in ({"layers": [0]}, {"drop": 1}):
        field = next(iter(settings))
        with pytest.raises(RecipeError, match=rf"\.{field}: .*scale_attn_by_inverse_layer_idx"):
            compress_model(model, recipe("gpt2", **settings), calibration=CALIBRATION)
    x = tiny_inputs("gpt2", model)
    expected = model_output(by_hand(model, "gpt2", [2, 3]), x)
    compress_model(model, recipe("gpt2", layers=[3, 2]), progress=False)
    torch.testing.assert_close(model_output(model, x), expected, atol=1e-5, rtol=1e-5)


def test_a_model_without_stacks_is_refused():
    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])

    with pytest.raises(RecipeError, match=r"\(depth\)\.targets: Flat has no stack of blocks"):
        compress_model(Flat(), {"stages": [{"method": "depth", "layers": [0]}]})


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, RuntimeError])
def test_an_interrupt_while_applying_restores_the_model(monkeypatch, interrupt):
    model = build("llama")
    before = snapshot(model)
    calls = []
    real = depth_build.renumber

    def failing(*args, **kwargs):
        real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # the stack and config are replaced, a block renumbered
            raise interrupt("stop")

    monkeypatch.setattr(depth_build, "renumber", failing)
    with pytest.raises(interrupt if interrupt is KeyboardInterrupt else Exception):
        compress_model(model, recipe("llama", layers=[0]), progress=False)
    assert len(calls) == 2
    assert_unchanged(model, before)
    assert [b.self_attn.layer_idx for b in model.model.layers] == [0, 1, 2, 3]


def test_an_interrupt_while_scoring_restores_the_model_and_removes_the_hooks(monkeypatch):
    model = build("llama")
    model.train()
    before = snapshot(model)
    calls = []
    real = depth_build.cosine_distance

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(depth_build, "cosine_distance", failing)
    with pytest.raises(KeyboardInterrupt):
        compress_model(model, recipe("llama", drop=1), calibration=CALIBRATION, progress=False)
    assert_unchanged(model, before)
    assert model.training
    assert not any(block._forward_hooks for block in model.model.layers)


def test_a_second_depth_stage_acts_on_the_stack_the_first_left():
    model = build("llama")
    x = tiny_inputs("llama", model)
    expected = model_output(by_hand(model, "llama", [0, 1]), x)
    stages = [{"method": "depth", "layers": [0]}, {"method": "depth", "layers": [0]}]
    compress_model(model, {"stages": stages}, progress=False)
    torch.testing.assert_close(model_output(model, x), expected, atol=1e-5, rtol=1e-5)
    # checked against the dense model, index 3 fits; after the first stage it no longer does
    model = build("llama")
    before = snapshot(model)
    stages = [{"method": "depth", "layers": [3]}, {"method": "depth", "layers": [3]}]
    with pytest.raises(HfCompressError, match=r"stages\[1\]\(depth\)\.layers: \[3\] out of range"):
        compress_model(model, {"stages": stages}, progress=False)
    assert_unchanged(model, before)


def test_the_stage_round_trips_through_the_recipe_and_names_its_criterion():
    stages = [{"method": "depth", "drop": 2, "criterion": "loss", "targets": r"model\.layers"}]
    recipe = Recipe.load({"stages": stages})
    assert Recipe.load(recipe.to_dict()) == recipe
    assert recipe.stages[0].criterion_name == "loss"
    assert Recipe.load({"stages": [{"method": "depth", "drop": 1}]}).stages[0].criterion_name == (
        "block_influence"
    )
    assert Recipe.load({"stages": [{"method": "depth", "layers": [1]}]}).stages[
        0
    ].criterion_name == ("given")
    given = Recipe.load({"stages": [{"method": "depth", "layers": [1]}]}).stages[0]
    assert not needs_calibration(given)
    assert needs_calibration(recipe.stages[0])
