"""int8 on top of the compressed forms: every Linear that is not tied gets int8 weights, pruned
zeros stay zero, the error stays within a bound computed from the quantization steps, bytes
count as computed by hand, and the int8 form refuses to save."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
from transformers.pytorch_utils import Conv1D

from conftest import BLOCK_LINEARS, model_output, tiny_inputs, tiny_model
from hfcompress import HfCompressError, compress_model, freeze, model_bytes, quantize_int8
from hfcompress.layers import KroneckerLinear, LowRankLinear, PrunedLinear
from hfcompress.validation import tied_modules

FORMS = {
    "dense": [],
    "prune": [{"method": "prune", "targets": BLOCK_LINEARS, "sparsity": 0.5}],
    "prune-2:4": [{"method": "prune", "targets": BLOCK_LINEARS, "pattern": "2:4"}],
    "lowrank": [{"method": "lowrank", "targets": BLOCK_LINEARS, "rank": 8}],
    "lowrank+prune": [
        {"method": "lowrank", "targets": BLOCK_LINEARS, "rank": 8},
        {"method": "prune", "targets": BLOCK_LINEARS, "sparsity": 0.5},
    ],
    "kronecker": [{"method": "kronecker", "targets": BLOCK_LINEARS, "a_shape": [8, 8]}],
}


def _compressed(arch: str, form: str) -> nn.Module:
    model = tiny_model(arch)
    if FORMS[form]:
        compress_model(model, {"stages": FORMS[form]}, progress=False)
    return model.eval()


def _pruned_zeros(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: module.weight.detach() == 0
        for name, module in model.named_modules()
        if isinstance(module, PrunedLinear)
    }


def _int8_values(module: DynamicLinear) -> torch.Tensor:
    weight, _ = module._packed_params._weight_bias()
    return weight.int_repr()


def test_one_layer_error_is_within_the_bound_of_the_quantization_steps():
    # y = W·x with W and x quantized: |Δyᵢ| ≤ Σⱼ (|xⱼ|·sᵢ/2 + |Wᵢⱼ|·s_x/2 + sᵢ·s_x/4), where sᵢ is
    # the weight scale of row i and s_x the activation step (asymmetric per tensor; 127 levels
    # when fbgemm reduces the range, the coarser of the two cases).
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    with torch.no_grad():
        linear.weight.mul_(torch.logspace(-2, 1, 48).unsqueeze(1))  # very different row scales
    model = nn.Sequential(linear)
    W, b = linear.weight.detach().clone(), linear.bias.detach().clone()
    x = torch.randn(5, 64)
    quantize_int8(model)
    quantized = model[0]
    assert isinstance(quantized, DynamicLinear)
    weight, _ = quantized._packed_params._weight_bias()
    s_w = weight.q_per_channel_scales().float()
    assert torch.equal(weight.q_per_channel_zero_points(), torch.zeros(48, dtype=torch.long))
    with torch.no_grad():
        got = model(x)
    reference = F.linear(x, W, b)
    for row in range(x.shape[0]):
        xr = x[row]
        s_x = float(xr.max().clamp_min(0) - xr.min().clamp_max(0)) / 127
        bound = (
            xr.abs().sum() * s_w / 2 + W.abs().sum(1) * s_x / 2 + 64 * s_w * s_x / 4
        ) * 1.001 + 1e-6
        error = (got[row] - reference[row]).abs()
        assert (error <= bound).all(), float((error / bound).max())
        assert error.max() > 0  # it was quantized


@pytest.mark.parametrize("form", list(FORMS))
def test_every_untied_linear_is_int8_and_pruned_zeros_stay_zero(arch, form):
    model = _compressed(arch, form)
    inputs = tiny_inputs(arch, model)
    zeros = _pruned_zeros(model)
    kron = {
        name: (module.A.detach().clone(), module.B.detach().clone())
        for name, module in model.named_modules()
        if isinstance(module, KroneckerLinear)
    }
    tied = set(tied_modules(model))
    with torch.no_grad():
        before = model_output(model, inputs)
    if kron:
        with pytest.warns(UserWarning, match=r"Kronecker layer.*stay in floating point"):
            quantize_int8(model)
    else:
        quantize_int8(model)
    with torch.no_grad():
        after = model_output(model, inputs)

    modules = dict(model.named_modules())
    assert not any(isinstance(m, PrunedLinear) for m in modules.values())
    left_float = [n for n, m in modules.items() if type(m) in (nn.Linear, Conv1D) and n not in tied]
    assert not left_float, left_float
    for name, zero in zeros.items():
        values = _int8_values(modules[name])
        assert torch.equal(values == 0, zero | (values == 0))  # every pruned zero is an int8 zero
        assert not values[zero].any()
    for name, (A, B) in kron.items():
        assert torch.equal(modules[name].A, A) and torch.equal(modules[name].B, B)
    relative = float((after - before).norm() / before.norm())
    assert relative < 0.08, relative
    quantized = any(isinstance(m, DynamicLinear) for m in modules.values())
    assert (relative > 0) == quantized  # only a Kronecker-only block stack has nothing to quantize


def test_low_rank_factors_are_quantized_in_place():
    model = _compressed("llama", "lowrank")
    quantize_int8(model)
    layers = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert layers
    for layer in layers:
        assert isinstance(layer.u, DynamicLinear) and isinstance(layer.v, DynamicLinear)
    repr(model)  # the compressed layers still describe themselves


def _int8_bytes_by_hand(model: nn.Module) -> int:
    """int8 values + (float32 scale, int32 zero point) per row + bias, for each int8 Linear;
    every other parameter and buffer at its own size."""
    total = 0
    for module in model.modules():
        if isinstance(module, DynamicLinear):
            weight, bias = module._packed_params._weight_bias()
            out_features, in_features = weight.shape
            total += out_features * in_features + out_features * 8
            total += 0 if bias is None else bias.numel() * 4
    seen: set[int] = set()
    for tensor in (*model.parameters(), *model.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


@pytest.mark.parametrize("form", ["dense", "prune", "lowrank"])
def test_int8_bytes_are_counted_by_hand(form):
    model = _compressed("gpt2", form)
    freeze(model)
    before = model_bytes(model)
    quantize_int8(model)
    assert model_bytes(model) == _int8_bytes_by_hand(model)
    assert model_bytes(model) < before


def test_saving_the_int8_form_is_refused_with_the_route(tmp_path):
    model = _compressed("llama", "prune")
    quantize_int8(model)
    with pytest.raises(HfCompressError, match=r"quantize_int8.*save the compressed model"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bf16_on_cpu_is_refused_and_the_model_is_left_as_it_was():
    model = _compressed("llama", "prune").to(torch.bfloat16)
    names = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(HfCompressError, match=r"float32.*model\.float"):
        quantize_int8(model)
    assert [(n, type(m)) for n, m in model.named_modules()] == names


def test_quantizing_twice_is_refused():
    model = _compressed("gpt2", "prune")
    quantize_int8(model)
    with pytest.raises(HfCompressError, match="already quantized"):
        quantize_int8(model)


def test_a_torchao_config_quantizes_pruned_and_factored_layers():
    torchao = pytest.importorskip("torchao.quantization")
    model = _compressed("llama", "lowrank+prune")
    inputs = tiny_inputs("llama", model)
    zeros = _pruned_zeros(model)
    with torch.no_grad():
        before = model_output(model, inputs)
    bytes_before = model_bytes(model)
    quantize_int8(model, torchao.Int8WeightOnlyConfig())
    with torch.no_grad():
        after = model_output(model, inputs)
    modules = dict(model.named_modules())
    for name, zero in zeros.items():
        weight = modules[name].weight
        assert type(weight).__module__.startswith("torchao"), type(weight)
        assert not weight.qdata[zero].any()
    assert model_bytes(model) < bytes_before
    relative = float((after - before).norm() / before.norm())
    assert 0 < relative < 0.05, relative
