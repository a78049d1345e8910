"""The inference form: frozen models hold no masks, compute the same outputs, refuse training,
save and reload; compressed layers compile with fullgraph=True."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import hfcompress
from conftest import BLOCK_LINEARS, model_output, tiny_inputs, tiny_model
from hfcompress import HfCompressError, compress_model, freeze, model_bytes, unfreeze
from hfcompress.layers import KroneckerLinear, LowRankLinear, PrunedLinear

FORMS = {
    "prune": [{"method": "prune", "targets": BLOCK_LINEARS, "sparsity": 0.5}],
    "prune-2:4": [{"method": "prune", "targets": BLOCK_LINEARS, "pattern": "2:4"}],
    "lowrank+prune": [
        {"method": "lowrank", "targets": BLOCK_LINEARS, "rank": 8},
        {"method": "prune", "targets": BLOCK_LINEARS, "sparsity": 0.5},
    ],
    "kronecker": [{"method": "kronecker", "targets": BLOCK_LINEARS, "a_shape": [8, 8]}],
}


def _compressed(arch: str, form: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    model = tiny_model(arch).to(dtype)
    compress_model(model, {"stages": FORMS[form]}, progress=False)
    return model.eval()


def _dense_bytes_by_hand(model: nn.Module) -> int:
    """What the same model takes with every hfcompress layer made dense again: for each
    compressed layer out·in (+ out) elements of its dtype, plus everything outside them."""
    total, inside = 0, set()
    for module in model.modules():
        if isinstance(module, (PrunedLinear, LowRankLinear, KroneckerLinear)) and not any(
            module is getattr(parent, "u", None) or module is getattr(parent, "v", None)
            for parent in model.modules()
            if isinstance(parent, LowRankLinear)
        ):
            size = next(module.parameters()).element_size()
            total += module.dense_param_count() * size
            inside.update(id(t) for t in (*module.parameters(), *module.buffers()))
    seen: set[int] = set()
    for tensor in (*model.parameters(), *model.buffers()):
        if id(tensor) not in inside and id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


@pytest.mark.parametrize("form", list(FORMS))
def test_frozen_equals_unfrozen(arch, form):
    model = _compressed(arch, form)
    inputs = tiny_inputs(arch, model)
    with torch.no_grad():
        before = model_output(model, inputs)
        freeze(model)
        after = model_output(model, inputs)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    assert not any("mask" in name for name, _ in model.named_buffers())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frozen_pruned_model_takes_the_dense_bytes(dtype):
    model = _compressed("llama", "prune", dtype)
    dense = tiny_model("llama").to(dtype)
    dense_bytes = sum(p.numel() * p.element_size() for p in dense.parameters())
    dense_bytes += sum(b.numel() * b.element_size() for b in dense.buffers())
    masks = sum(m.mask.numel() for m in model.modules() if isinstance(m, PrunedLinear))
    assert model_bytes(model) == dense_bytes + masks  # a bool mask: one byte per weight
    assert _dense_bytes_by_hand(model) == dense_bytes
    freeze(model)
    assert model_bytes(model) == dense_bytes  # ≤ 1.0× dense: exactly its bytes


def test_frozen_low_rank_keeps_its_factors():
    model = _compressed("llama", "lowrank+prune")
    factors_before = model_bytes(model)
    masks = sum(m.mask.numel() for m in model.modules() if isinstance(m, PrunedLinear))
    freeze(model)
    assert model_bytes(model) == factors_before - masks
    assert model_bytes(model) < _dense_bytes_by_hand(model)


def test_training_a_frozen_model_is_refused_until_unfrozen():
    model = _compressed("llama", "prune")
    freeze(model).train()
    inputs = tiny_inputs("llama", model)
    with pytest.raises(HfCompressError, match=r"frozen for inference.*hfcompress\.unfreeze"):
        model(**inputs, labels=inputs["input_ids"])
    unfreeze(model)
    layer = model.model.layers[0].mlp.up_proj
    assert layer.mask.dtype == torch.bool and torch.equal(layer.mask, layer.weight != 0)
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert layer.weight.grad is not None
    assert torch.all(layer.weight.grad[~layer.mask] == 0)  # the pattern lock is back


def test_frozen_model_saves_and_reloads_identically(tmp_path):
    model = _compressed("llama", "prune")
    freeze(model)
    inputs = tiny_inputs("llama", model)
    with torch.no_grad():
        expected = model_output(model, inputs)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(model_output(loaded, inputs), expected, rtol=0, atol=0)
    assert not hfcompress.inference.is_frozen(loaded)  # a checkpoint loads trainable


def test_frozen_model_generates_identically():
    model = _compressed("llama", "prune")
    prompt = torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    config = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    before = model.generate(prompt, **config)
    after = freeze(model).generate(prompt, **config)
    assert torch.equal(before, after)


def test_no_grad_forward_of_a_pruned_layer_equals_the_masked_matmul():
    layer = PrunedLinear.from_module(nn.Linear(32, 16), sparsity=0.5)
    x = torch.randn(4, 32)
    reference = x @ (layer.weight * layer.mask).T + layer.bias  # explicit W ⊙ M
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference)


def test_loading_a_dense_weight_into_a_pruned_layer_keeps_masked_zeros():
    layer = PrunedLinear.from_module(nn.Linear(32, 16), sparsity=0.5)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["weight"] = torch.randn(16, 32)  # non-zero where the mask is False
    layer.load_state_dict(state)
    assert torch.all(layer.weight[~layer.mask] == 0)


@pytest.mark.parametrize(
    "layer",
    [
        pytest.param(lambda: PrunedLinear.from_module(nn.Linear(32, 16), sparsity=0.5), id="prune"),
        pytest.param(lambda: LowRankLinear.from_module(nn.Linear(32, 16), rank=4), id="lowrank"),
        pytest.param(
            lambda: KroneckerLinear.from_module(nn.Linear(32, 16), a_shape=(4, 8), terms=2),
            id="kronecker",
        ),
    ],
)
@pytest.mark.parametrize("frozen", [False, True])
def test_layers_compile_without_graph_breaks(layer, frozen):
    module = layer()
    if frozen:
        freeze(module)
    x = torch.randn(3, 32)
    with torch.no_grad():
        expected = module(x)
        compiled = torch.compile(module, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(x), expected)
