"""PEFT LoRA on compressed layers: injection, "all-linear", training, merging, save/load."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

pytest.importorskip("peft")

from peft import get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer

import hfcompress
from conftest import model_output, tiny_inputs, tiny_model
from hfcompress.errors import HfCompressError, InvalidParameterError
from hfcompress.integrations.peft import (
    CompressedLoraLinear,
    LoraMergeError,
    all_linear_names,
    load_adapter,
    lora_config,
    merge_and_unload,
)
from hfcompress.layers import (
    CompressedLayer,
    KroneckerLinear,
    LowRankLinear,
    PrunedLinear,
    dense_weight_of,
)

ARCHS = ["gpt2", "llama"]
# the target of each form, as a PEFT target_modules suffix
TARGETS = {
    "gpt2": {"prune": "attn.c_proj", "lowrank": "mlp.c_fc", "kronecker": "mlp.c_proj"},
    "llama": {"prune": "gate_proj", "lowrank": "up_proj", "kronecker": "down_proj"},
}
DENSE = {"gpt2": Conv1D, "llama": nn.Linear}
R = 4


def recipe(arch: str) -> dict:
    t = TARGETS[arch]
    return {
        "stages": [
            {"method": "prune", "targets": rf".*\.{t['prune']}", "sparsity": 0.5},
            {"method": "lowrank", "targets": rf".*\.{t['lowrank']}", "rank": 8},
            {"method": "kronecker", "targets": rf".*\.{t['kronecker']}", "a_shape": [8, 8]},
        ]
    }


def compressed(arch: str) -> nn.Module:
    model = tiny_model(arch)
    hfcompress.compress_model(model, recipe(arch), progress=False)
    return model


def with_lora(model: nn.Module, targets, **options):
    # init_lora_weights=False keeps nn.Linear's random B, so s·B·A is not zero
    # GPT-2's dense layers are Conv1D: PEFT wants fan_in_fan_out there (hfcompress layers ignore it)
    conv1d = any(isinstance(m, Conv1D) for m in model.modules())
    kwargs = {"r": R, "lora_alpha": 2 * R, "init_lora_weights": False, "fan_in_fan_out": conv1d}
    kwargs.update(options)
    torch.manual_seed(1)
    return get_peft_model(model, lora_config(model, target_modules=targets, **kwargs))


def lora_layers(peft_model) -> dict[str, BaseTunerLayer]:
    base = peft_model.get_base_model()
    return {n: m for n, m in base.named_modules() if isinstance(m, BaseTunerLayer)}


def factors(layer) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, s) of the default adapter, detached copies."""
    return (
        layer.lora_A["default"].weight.detach().clone(),
        layer.lora_B["default"].weight.detach().clone(),
        layer.scaling["default"],
    )


class Reference(nn.Module):
    """y = base(x) + s·(x·Aᵀ)·Bᵀ, written out without PEFT."""

    def __init__(self, base: nn.Module, A: torch.Tensor, B: torch.Tensor, s: float) -> None:
        super().__init__()
        self.base, self.A, self.B, self.s = base, A, B, s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.s * (x @ self.A.T) @ self.B.T


def of_form(peft_model, form_class: type) -> dict[str, CompressedLoraLinear]:
    return {
        n: m
        for n, m in lora_layers(peft_model).items()
        if isinstance(m.get_base_layer(), form_class)
    }


@pytest.fixture(params=ARCHS)
def arch(request: pytest.FixtureRequest) -> str:
    return request.param


# --- injection --------------------------------------------------------------------------------


def test_named_targets_get_lora_on_every_form(arch):
    model = compressed(arch)
    peft_model = with_lora(model, list(TARGETS[arch].values()))
    layers = lora_layers(peft_model)
    assert len(layers) == 3 * 2  # three forms, two blocks
    assert all(type(m) is CompressedLoraLinear for m in layers.values())
    kinds = {type(m.get_base_layer()) for m in layers.values()}
    assert kinds == {PrunedLinear, LowRankLinear, KroneckerLinear}


def test_all_linear_covers_compressed_layers_not_their_factors(arch):
    model = compressed(arch)
    names = all_linear_names(model)
    compressed_names = {n for n, m in model.named_modules() if isinstance(m, CompressedLayer)}
    assert compressed_names <= names
    assert not any(n.endswith((".u", ".v")) for n in names)  # low-rank factors
    assert "lm_head" not in names
    dense = {
        n
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, Conv1D)) and not any(n.startswith(c + ".") for c in names)
    }
    assert names == compressed_names | (dense - {"lm_head"})

    peft_model = with_lora(model, "all-linear")
    assert set(lora_layers(peft_model)) == names
    wrapped = [m for m in lora_layers(peft_model).values() if type(m) is CompressedLoraLinear]
    assert len(wrapped) == len(compressed_names)


def test_all_linear_needs_the_model():
    with pytest.raises(InvalidParameterError, match="pass the model"):
        lora_config(target_modules="all-linear")


def test_lora_config_leaves_a_given_config_alone():
    from peft import LoraConfig

    from hfcompress.integrations.peft import prepare_lora_config

    model = compressed("llama")
    config = LoraConfig(r=R, target_modules="all-linear")
    prepared = prepare_lora_config(config, model)
    assert config.target_modules == "all-linear" and not config._custom_modules
    assert prepared._custom_modules == {CompressedLayer: CompressedLoraLinear}


@pytest.mark.parametrize(
    ("option", "match"),
    [({"init_lora_weights": "pissa"}, "init_lora_weights"), ({"use_dora": True}, "plain LoRA")],
    ids=["pissa", "dora"],
)
def test_lora_variants_that_rewrite_the_base_weight_are_refused(option, match):
    model = compressed("llama")
    with pytest.raises(InvalidParameterError, match=rf"model\.layers\.0\.mlp\.up_proj.*{match}"):
        with_lora(model, ["up_proj"], **option)


# --- forward and training ---------------------------------------------------------------------


def test_forward_is_base_plus_scaled_BAx(arch):
    model = compressed(arch)
    reference = copy.deepcopy(model)
    inputs = tiny_inputs(arch, model)
    base_out = model_output(model, inputs)
    peft_model = with_lora(model, "all-linear")
    for name, layer in lora_layers(peft_model).items():
        parent, _, child = name.rpartition(".")
        holder = reference.get_submodule(parent)
        setattr(holder, child, Reference(getattr(holder, child), *factors(layer)))
    expected = model_output(reference, inputs)
    got = model_output(peft_model, inputs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - base_out).abs().max() > 1e-3  # the adapters do something


def test_training_step_updates_only_lora_params(arch):
    model = compressed(arch)
    inputs = tiny_inputs(arch, model)
    peft_model = with_lora(model, "all-linear")
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    before = {k: v.clone() for k, v in peft_model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    peft_model(**inputs, labels=inputs["input_ids"]).loss.backward()
    optimizer.step()
    after = peft_model.state_dict()
    for key, value in before.items():
        changed = not torch.equal(value, after[key])
        assert changed == (".lora_" in key), key
    for layer in of_form(peft_model, PrunedLinear).values():
        pruned = layer.get_base_layer()
        assert not pruned.weight[~pruned.mask].any()


# --- merging ----------------------------------------------------------------------------------


def test_merge_into_lowrank_is_exact_and_grows_the_rank(arch):
    model = compressed(arch)
    inputs = tiny_inputs(arch, model)
    peft_model = with_lora(model, [TARGETS[arch]["lowrank"]])
    expected_out = model_output(peft_model, inputs)
    expected = {}
    for name, layer in of_form(peft_model, LowRankLinear).items():
        base = layer.get_base_layer()
        A, B, s = factors(layer)
        U, V = base.u.weight.detach().clone(), base.v.weight.detach().clone()
        expected[name] = (U, V, U @ V + s * B @ A, base.rank)
    merged = merge_and_unload(peft_model)
    for name, (U, V, W_eff, rank) in expected.items():
        layer = merged.get_submodule(name)
        assert type(layer) is LowRankLinear and layer.rank == rank + R
        assert torch.equal(layer.u.weight[:, :rank], U) and torch.equal(layer.v.weight[:rank], V)
        torch.testing.assert_close(layer.dense_weight(), W_eff, rtol=1e-5, atol=1e-6)
        x = torch.randn(3, layer.in_features)
        bias = 0 if layer.bias is None else layer.bias
        torch.testing.assert_close(layer(x), x @ W_eff.T + bias, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model_output(merged, inputs), expected_out, rtol=1e-5, atol=1e-5)


def test_merge_into_pruned_keeps_the_mask_and_is_not_exact(arch):
    model = compressed(arch)
    inputs = tiny_inputs(arch, model)
    peft_model = with_lora(model, [TARGETS[arch]["prune"]])
    unmerged_out = model_output(peft_model, inputs)
    expected = {}
    for name, layer in of_form(peft_model, PrunedLinear).items():
        base = layer.get_base_layer()
        A, B, s = factors(layer)
        mask = base.mask.clone()
        expected[name] = (mask, mask * (base.weight.detach() + s * B @ A))
    merged = merge_and_unload(peft_model)
    for name, (mask, W_masked) in expected.items():
        layer = merged.get_submodule(name)
        assert type(layer) is PrunedLinear
        assert torch.equal(layer.mask, mask)
        torch.testing.assert_close(layer.weight, W_masked, rtol=1e-5, atol=1e-6)
        assert not layer.weight[~mask].any()  # the sparsity is kept
    # the part of s·B·A on pruned entries is gone: outputs differ from the unmerged model
    assert (model_output(merged, inputs) - unmerged_out).abs().max() > 1e-4


@pytest.mark.parametrize("form", ["prune", "lowrank", "kronecker"])
def test_dense_merge_is_exact_for_every_form(arch, form):
    model = compressed(arch)
    inputs = tiny_inputs(arch, model)
    peft_model = with_lora(model, [TARGETS[arch][form]])
    expected_out = model_output(peft_model, inputs)
    expected = {}
    for name, layer in lora_layers(peft_model).items():
        A, B, s = factors(layer)
        expected[name] = layer.get_base_layer().dense_weight().detach() + s * B @ A
    merged = merge_and_unload(peft_model, dense=[form])
    for name, W_eff in expected.items():
        layer = merged.get_submodule(name)
        assert type(layer) is DENSE[arch]
        torch.testing.assert_close(dense_weight_of(layer), W_eff, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model_output(merged, inputs), expected_out, rtol=1e-5, atol=1e-5)


def test_merge_into_kronecker_is_refused_before_anything_changes(arch):
    model = compressed(arch)
    inputs = tiny_inputs(arch, model)
    peft_model = with_lora(model, [TARGETS[arch]["prune"], TARGETS[arch]["kronecker"]])
    out = model_output(peft_model, inputs)
    state = {k: v.clone() for k, v in peft_model.state_dict().items()}
    name = next(iter(of_form(peft_model, KroneckerLinear)))
    with pytest.raises(LoraMergeError, match=rf"{name}: .*Kronecker.*dense=\['kronecker'\]"):
        merge_and_unload(peft_model)
    after = peft_model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in state.items())
    assert not any(m.merged for m in lora_layers(peft_model).values())
    torch.testing.assert_close(model_output(peft_model, inputs), out, rtol=0, atol=0)
    # PEFT's own merge goes through the same layers and refuses too
    with pytest.raises(LoraMergeError):
        peft_model.merge_and_unload()


def test_unknown_method_in_dense_lists_the_known_ones():
    peft_model = with_lora(compressed("llama"), ["up_proj"])
    with pytest.raises(HfCompressError, match="known methods"):
        merge_and_unload(peft_model, dense=["svd"])


def test_merge_then_unmerge_gives_back_the_adapter_model(arch):
    model = compressed(arch)
    inputs = tiny_inputs(arch, model)
    peft_model = with_lora(model, "all-linear")
    out = model_output(peft_model, inputs)
    state = {k: v.clone() for k, v in peft_model.state_dict().items()}
    for layer in of_form(peft_model, KroneckerLinear).values():
        layer.merge_dense = True
    peft_model.merge_adapter()
    assert all(m.merged for m in lora_layers(peft_model).values())
    assert not of_form(peft_model, KroneckerLinear)  # merged into dense layers
    peft_model.unmerge_adapter()
    after = peft_model.state_dict()
    assert after.keys() == state.keys()
    for key, value in state.items():
        torch.testing.assert_close(after[key], value, rtol=1e-5, atol=1e-6, msg=key)
    for layer in of_form(peft_model, PrunedLinear).values():
        assert not layer.get_base_layer().weight[~layer.get_base_layer().mask].any()
    torch.testing.assert_close(model_output(peft_model, inputs), out, rtol=1e-5, atol=1e-5)


# --- saving and loading -----------------------------------------------------------------------


def test_adapter_saves_and_loads_onto_the_compressed_base(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    model = compressed(arch)
    inputs = tiny_inputs(arch, model)
    model.save_pretrained(tmp_path / "base")
    fresh = copy.deepcopy(model)
    peft_model = with_lora(model, "all-linear")
    out = model_output(peft_model, inputs)
    peft_model.save_pretrained(tmp_path / "adapter")

    loaded = load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(model_output(loaded, inputs), out)
    # and onto the compressed checkpoint, reloaded through transformers
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    loaded = load_adapter(base, tmp_path / "adapter")
    torch.testing.assert_close(model_output(loaded, inputs), out, rtol=1e-6, atol=1e-6)


def test_merged_model_saves_and_reloads(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    model = compressed(arch)
    inputs = tiny_inputs(arch, model)
    merged = merge_and_unload(with_lora(model, "all-linear"), dense=["kronecker"])
    out = model_output(merged, inputs)
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    types = {n: type(m) for n, m in merged.named_modules()}
    assert {n: type(m) for n, m in reloaded.named_modules()} == types
    assert torch.equal(model_output(reloaded, inputs), out)


def test_fully_dense_merge_drops_the_hfcompress_config(tmp_path):
    model = compressed("llama")
    merged = merge_and_unload(with_lora(model, "all-linear"), dense=True)
    assert not any(isinstance(m, CompressedLayer) for m in merged.modules())
    assert getattr(merged.config, "quantization_config", None) is None


def test_issue_config_works_once_prepared():
    from peft import LoraConfig

    from hfcompress.integrations.peft import prepare_lora_config

    model = compressed("llama")
    config = LoraConfig(r=R, target_modules=["gate_proj", "up_proj"])
    peft_model = get_peft_model(model, prepare_lora_config(config))
    kinds = {type(m.get_base_layer()) for m in lora_layers(peft_model).values()}
    assert kinds == {PrunedLinear, LowRankLinear}


def test_lora_bias_is_merged_into_the_layer_bias():
    model = compressed("gpt2")
    inputs = tiny_inputs("gpt2", model)
    peft_model = with_lora(model, ["mlp.c_fc", "attn.c_proj"], lora_bias=True)
    for layer in lora_layers(peft_model).values():
        torch.nn.init.normal_(layer.lora_B["default"].bias)
    out = model_output(peft_model, inputs)
    merged = merge_and_unload(peft_model, dense=["prune"])
    torch.testing.assert_close(model_output(merged, inputs), out, rtol=1e-5, atol=1e-5)


def test_lowrank_merge_past_full_rank_is_refused():
    peft_model = with_lora(compressed("llama"), ["up_proj"], r=60)  # 8 + 60 > min(128, 64)
    with pytest.raises(LoraMergeError, match=r"up_proj: merged rank .* = 68 .*dense=\['lowrank'\]"):
        merge_and_unload(peft_model)
    merged = merge_and_unload(peft_model, dense="lowrank")
    assert type(merged.model.layers[0].mlp.up_proj) is nn.Linear
