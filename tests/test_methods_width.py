"""``width``: structured pruning of MLP intermediate channels, against references built here."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import hfcompress.methods.width.build as width_build
import hfcompress.structured.refit as refit_module
from conftest import (
    TINY_MODELS,
    assert_unchanged,
    logits_without_hfcompress,
    model_output,
    snapshot,
    tiny_inputs,
    tiny_model,
)
from hfcompress import compress_model
from hfcompress.recipe import RecipeError
from hfcompress.structured import dense_weight, find_mlps, mlp_parts

CALIBRATION = torch.randint(1, 128, (8, 16), generator=torch.Generator().manual_seed(5))


def _qwen2() -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(
        Qwen2Config(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
            max_position_embeddings=64,
        )
    )


ARCHS = [*TINY_MODELS, "qwen2"]
MLP_TARGETS = {
    "gpt2": r"transformer\.h\.\d+\.mlp",
    "llama": r"model\.layers\.\d+\.mlp",
    "qwen2": r"model\.layers\.\d+\.mlp",
    "bert": r"bert\.encoder\.layer\.\d+",
    "opt": r"model\.decoder\.layers\.\d+",
    "t5": r"(encoder|decoder)\.block\.\d+\.layer\.\d+\.DenseReluDense",
}


def build(arch: str) -> nn.Module:
    if arch == "qwen2":
        torch.manual_seed(0)
        return _qwen2().eval()
    return tiny_model(arch)


def inputs(arch: str, model: nn.Module) -> dict[str, torch.Tensor]:
    return tiny_inputs("llama" if arch == "qwen2" else arch, model)


def stage(arch: str, **settings) -> dict:
    return {"stages": [{"method": "width", "targets": MLP_TARGETS[arch], **settings}]}


def kill_channels(model: nn.Module, fraction: float = 0.5) -> dict[str, torch.Tensor]:
    """Zero the producer rows (and biases) of the first ``fraction`` of every MLP's channels:
    their activations are exactly 0 (act(0) = 0 for ReLU/GELU/SiLU), so removing them must
    leave every output unchanged. Returns {mlp: the live channel indices}."""
    live = {}
    for name in find_mlps(model):
        parts = mlp_parts(model, name)
        dead = torch.arange(int(parts.width * fraction))
        live[name] = torch.arange(int(parts.width * fraction), parts.width)
        for producer in parts.producer_names():
            module = model.get_submodule(producer)
            with torch.no_grad():
                dense_weight(module)[dead] = 0.0
                if module.bias is not None:
                    module.bias[dead] = 0.0
    return live


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("criterion", ["magnitude", "activation", "taylor", "reconstruction"])
def test_dead_channels_go_and_outputs_stay(arch, criterion):
    if criterion == "taylor" and arch == "bert":
        pytest.skip("taylor needs a language-model head; the BERT fixture is a classifier")
    model = build(arch)
    kill_channels(model)
    widths = {n: mlp_parts(model, n).width for n in find_mlps(model)}
    x = inputs(arch, model)
    expected = model_output(model, x)
    calibration = None if criterion == "magnitude" else CALIBRATION
    report = compress_model(
        model,
        stage(arch, keep=0.5, criterion=criterion, refit=False),
        calibration=calibration,
        progress=False,
    )
    for name, width in widths.items():
        assert mlp_parts(model, name).width == width // 2
    torch.testing.assert_close(model_output(model, x), expected, atol=1e-5, rtol=1e-5)
    assert [(m.shape, m.shape_after) for m in report.modules] == [
        ((w,), (w // 2,)) for w in widths.values()
    ]
    width = next(iter(widths.values()))
    assert f"[{width}] → [{width // 2}]" in str(report)


def _down_inputs(model: nn.Module, mlp: str, calibration: torch.Tensor) -> torch.Tensor:
    """The down projection's inputs X [tokens, width] over the calibration data (dense model)."""
    consumer = model.get_submodule(mlp_parts(model, mlp).consumer_name)
    seen = []
    handle = consumer.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            for batch in calibration.split(8):
                model(input_ids=batch, use_cache=False)
    finally:
        handle.remove()
    return torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]).double()


def _kept_rows(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Which rows of ``old`` the rows of ``new`` are (exact copies)."""
    distance = torch.cdist(new.double(), old.double())
    assert float(distance.min(1).values.max()) < 1e-6
    return distance.argmin(1)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])  # with and without a bias on the consumer
def test_refit_is_the_least_squares_solution(arch):
    model = build(arch)
    mlp = find_mlps(model)[0]  # the first block's inputs do not depend on any pruning
    parts = mlp_parts(model, mlp)
    # more tokens than kept channels (+ bias): the least-squares problem is determined
    calibration = torch.randint(1, 128, (16, 32), generator=torch.Generator().manual_seed(7))
    X = _down_inputs(model, mlp, calibration)
    consumer = model.get_submodule(parts.consumer_name)
    W, b = dense_weight(consumer).detach().double(), consumer.bias
    Y = X @ W.T + (0 if b is None else b.detach().double())
    producer_before = dense_weight(model.get_submodule(parts.producer_names()[0])).detach().clone()
    compress_model(
        model,
        stage(arch, keep=0.5, criterion="activation", refit=True, refit_damping=0.0),
        calibration=calibration,
        progress=False,
    )
    producer_after = dense_weight(model.get_submodule(parts.producer_names()[0])).detach()
    kept = _kept_rows(producer_before, producer_after)
    regressors = X[:, kept]
    if b is not None:
        regressors = torch.cat([regressors, torch.ones(len(X), 1, dtype=X.dtype)], 1)
    solution = torch.linalg.lstsq(regressors, Y).solution.T  # [out, |K| (+1)]
    new = model.get_submodule(parts.consumer_name)
    torch.testing.assert_close(
        dense_weight(new).detach().double(), solution[:, : len(kept)], atol=2e-4, rtol=1e-3
    )
    if b is not None:
        torch.testing.assert_close(
            new.bias.detach().double(), solution[:, -1], atol=2e-4, rtol=1e-3
        )


def test_refit_lowers_the_output_error():
    # enough tokens for the 64 kept channels' regression to generalize to other inputs
    calibration = torch.randint(1, 128, (32, 32), generator=torch.Generator().manual_seed(6))
    errors = {}
    for refit in (False, True):
        model = build("llama")
        x = inputs("llama", model)
        dense = model_output(model, x)
        compress_model(
            model,
            stage("llama", keep=0.5, refit=refit),
            calibration=calibration,
            progress=False,
        )
        errors[refit] = float((model_output(model, x) - dense).norm())
    assert errors[True] < errors[False]


@pytest.mark.parametrize("arch", ARCHS)
def test_uniform_width_saves_a_plain_checkpoint(arch, tmp_path):
    model = build(arch)
    x = inputs(arch, model)
    compress_model(model, stage(arch, keep=0.5), calibration=CALIBRATION, progress=False)
    expected = model_output(model, x)
    model.save_pretrained(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config
    got = logits_without_hfcompress(
        tmp_path / "out", type(model).__name__, x["input_ids"], tmp_path
    )
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "t5"])
def test_per_layer_widths_reload_with_hfcompress(arch, tmp_path):
    from transformers import AutoConfig

    model = build(arch)
    x = inputs(arch, model)
    first = find_mlps(model)[0]
    width = mlp_parts(model, first).width
    recipe = stage(arch, keep=0.5, overrides={first.replace(".", r"\."): {"keep": 0.25}})
    compress_model(model, recipe, calibration=CALIBRATION, progress=False)
    expected = model_output(model, x)
    model.save_pretrained(tmp_path / "out")
    config = AutoConfig.from_pretrained(tmp_path / "out")
    assert config.quantization_config["shapes"]
    loaded = type(model).from_pretrained(tmp_path / "out").eval()
    assert mlp_parts(loaded, first).width == width // 4
    torch.testing.assert_close(model_output(loaded, x), expected, atol=1e-5, rtol=1e-5)


def test_width_then_lowrank_composes_and_reloads(tmp_path):
    model = build("llama")
    x = inputs("llama", model)
    recipe = {
        "stages": [
            {"method": "width", "targets": MLP_TARGETS["llama"], "keep": 0.5},
            {"method": "lowrank", "targets": r".*mlp\.down_proj", "rank": 8},
        ]
    }
    report = compress_model(model, recipe, calibration=CALIBRATION, progress=False)
    assert [m.methods for m in report.modules] == [["width"]] * 2 + [["lowrank"]] * 2
    down = model.model.layers[0].mlp.down_proj
    assert (down.in_features, down.out_features, down.rank) == (64, 64, 8)
    expected = model_output(model, x)
    model.save_pretrained(tmp_path / "out")
    loaded = type(model).from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(model_output(loaded, x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("settings", "calibrated", "message"),
    [
        ({"keep": 0.0}, True, r"stages\[0\]\(width\)\.keep: Input should be greater than 0"),
        ({"keep": 1.5}, True, r"stages\[0\]\(width\)\.keep: Input should be less than or equal"),
        ({"keep": 0.5, "criterion": "activation"}, False, r"\.criterion: 'activation' needs"),
        ({"keep": 0.5, "refit": True, "criterion": "magnitude"}, False, r"\.refit: "),
        ({"keep": 0.5, "targets": r"model\.layers\.\d+"}, True, r"LlamaDecoderLayer.*no MLP"),
        ({"keep": 0.5, "targets": r"model\.layers\.\d+\.self_attn"}, True, r"LlamaAttention"),
        ({"keep": 0.5, "targets": r"nothing"}, True, r"fully matches no module"),
    ],
)
def test_bad_stages_are_refused_and_the_model_is_untouched(settings, calibrated, message):
    model = build("llama")
    before = snapshot(model)
    recipe = {"stages": [{"method": "width", "targets": MLP_TARGETS["llama"], **settings}]}
    with pytest.raises(RecipeError, match=message):
        compress_model(
            model, recipe, calibration=CALIBRATION if calibrated else None, progress=False
        )
    assert_unchanged(model, before)


def test_unknown_architecture_names_the_class():
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 8))])

    with pytest.raises(RecipeError, match=r"is a Sequential, whose children match no MLP"):
        compress_model(
            Odd(),
            {
                "stages": [
                    {
                        "method": "width",
                        "targets": r"layers\.0",
                        "keep": 0.5,
                        "criterion": "magnitude",
                    }
                ]
            },
        )


def test_a_structured_stage_after_a_per_linear_stage_is_refused():
    model = build("llama")
    before = snapshot(model)
    recipe = {
        "stages": [
            {"method": "prune", "targets": r".*down_proj", "sparsity": 0.5},
            {"method": "width", "targets": MLP_TARGETS["llama"], "keep": 0.5},
        ]
    }
    with pytest.raises(RecipeError, match=r"stages\[1\]\(width\).*move it before stages\[0\]"):
        compress_model(model, recipe)
    assert_unchanged(model, before)


def test_taylor_on_a_classifier_is_refused():
    model = build("bert")
    with pytest.raises(RecipeError, match=r"criterion: 'taylor' needs .*language-model head"):
        compress_model(model, stage("bert", keep=0.5, criterion="taylor"), calibration=CALIBRATION)


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, RuntimeError])
def test_a_failure_midway_restores_the_model(monkeypatch, interrupt):
    model = build("llama")
    before = snapshot(model)
    calls = []
    real = refit_module.refit_consumer

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the first MLP is already pruned
            raise interrupt("stop")
        return real(*args, **kwargs)

    monkeypatch.setattr(refit_module, "refit_consumer", failing)
    with pytest.raises((interrupt, RecipeError, Exception)):
        compress_model(model, stage("llama", keep=0.5), calibration=CALIBRATION, progress=False)
    assert len(calls) == 2
    assert_unchanged(model, before)


def test_a_later_stage_failing_restores_the_structured_changes():
    model = build("llama")
    before = snapshot(model)
    recipe = {
        "stages": [
            {
                "method": "width",
                "targets": MLP_TARGETS["llama"],
                "keep": 0.5,
                "criterion": "magnitude",
            },
            # fits the dense down_proj [64, 128] but not the pruned one [64, 64]
            {"method": "kronecker", "targets": r".*down_proj", "a_shape": [8, 128]},
        ]
    }
    with pytest.raises(RecipeError, match=r"stages\[1\]\(kronecker\)"):
        compress_model(model, recipe, progress=False)
    assert_unchanged(model, before)


def test_dry_run_changes_nothing_and_reports():
    model = build("llama")
    before = snapshot(model)
    report = compress_model(
        model, stage("llama", keep=0.25, criterion="magnitude"), dry_run=True, progress=False
    )
    assert_unchanged(model, before)
    assert [m.shape_after for m in report.modules] == [(32,), (32,)]
    assert report.model_params_after < report.model_params_before


def test_per_layer_keep_and_multiple_of():
    model = build("llama")
    recipe = stage(
        "llama",
        keep=0.3,
        criterion="magnitude",
        multiple_of=16,
        overrides={r"model\.layers\.1\.mlp": {"keep": 0.9}},
    )
    compress_model(model, recipe, progress=False)
    assert [mlp_parts(model, n).width for n in find_mlps(model)] == [32, 112]
    # per-layer widths: the config keeps its value, the module its own
    assert model.config.intermediate_size == 128
    assert model.model.layers[0].mlp.intermediate_size == 32


@pytest.mark.parametrize("arch", ["llama", "bert", "t5"])
def test_next_block_inputs_by_output_shift_equal_a_second_pass(arch, monkeypatch):
    """The shortcut (outputs + the MLPs' change) gives the pruning a full re-run gives."""
    results = []
    for shortcut in (True, False):
        model = build(arch)
        if not shortcut:
            monkeypatch.setattr(width_build, "_same_hidden", lambda a, b: False)
        compress_model(model, stage(arch, keep=0.5), calibration=CALIBRATION, progress=False)
        results.append(model.state_dict())
    assert results[0].keys() == results[1].keys()
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key], atol=1e-5, rtol=1e-4)
