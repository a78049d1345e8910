"""int8 on top of the compressed forms: every Linear that is not tied gets int8 weights, pruned
zeros stay zero, the error stays within a bound computed from the quantization steps, bytes
count as computed by hand, and the int8 form refuses to save."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
from transformers.pytorch_utils import Conv1D

from conftest import BLOCK_LINEARS, model_output, tiny_inputs, tiny_model
from hfcompress import HfCompressError, compress_model, freeze, model_bytes, quantize_int8
from hfcompress.evaluation import count_parameters
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


def _int8_values(module: nn.Module) -> torch.Tensor | None:
    """The int8 weight values of a torch.ao int8 Linear or a torchao int8 nn.Linear, or None."""
    if isinstance(module, DynamicLinear):
        return module._packed_params._weight_bias()[0].int_repr()
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.Linear) and type(weight).__module__.startswith("torchao"):
        return weight.qdata
    return None


MODES = ["weight-only", "dynamic"]


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
    quantize_int8(model, "dynamic")
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


def test_weight_only_error_is_within_half_a_step_per_weight():
    # only W is rounded: |Δyᵢ| ≤ (sᵢ/2)·Σⱼ|xⱼ| with sᵢ the scale of row i, read from the weight
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    with torch.no_grad():
        linear.weight.mul_(torch.logspace(-2, 1, 48).unsqueeze(1))
    model = nn.Sequential(linear)
    W, b = linear.weight.detach().clone(), linear.bias.detach().clone()
    x = torch.randn(5, 64)
    quantize_int8(model)  # weight-only, the default
    weight = model[0].weight
    s_w = weight.scale.float().reshape(-1)
    assert not weight.zero_point.any()  # symmetric: 0 stays 0
    assert ((weight.qdata.float() * s_w[:, None] - W).abs() <= s_w[:, None] / 2 * 1.0001).all()
    with torch.no_grad():
        got = model(x)
    reference = F.linear(x, W, b)
    bound = x.abs().sum(1, keepdim=True) * s_w / 2 * 1.001 + 1e-6
    error = (got - reference).abs()
    assert (error <= bound).all() and error.max() > 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("form", list(FORMS))
def test_every_untied_linear_is_int8_and_pruned_zeros_stay_zero(arch, form, mode):
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
            quantize_int8(model, mode)
    else:
        quantize_int8(model, mode)
    with torch.no_grad():
        after = model_output(model, inputs)

    modules = dict(model.named_modules())
    assert not any(isinstance(m, PrunedLinear) for m in modules.values())
    left_float = [
        n
        for n, m in modules.items()
        if type(m) in (nn.Linear, Conv1D) and n not in tied and _int8_values(m) is None
    ]
    assert not left_float, left_float
    for name, zero in zeros.items():
        values = _int8_values(modules[name])
        assert torch.equal(values == 0, zero | (values == 0))  # every pruned zero is an int8 zero
        assert not values[zero].any()
    for name, (A, B) in kron.items():
        assert torch.equal(modules[name].A, A) and torch.equal(modules[name].B, B)
    relative = float((after - before).norm() / before.norm())
    assert relative < 0.08, relative
    quantized = any(_int8_values(m) is not None for m in modules.values())
    assert (relative > 0) == quantized  # only a Kronecker-only block stack has nothing to quantize


@pytest.mark.parametrize("mode", MODES)
def test_low_rank_factors_are_quantized_in_place(mode):
    model = _compressed("llama", "lowrank")
    quantize_int8(model, mode)
    layers = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert layers
    for layer in layers:
        assert _int8_values(layer.u) is not None and _int8_values(layer.v) is not None
    repr(model)  # the compressed layers still describe themselves


def _int8_bytes_by_hand(model: nn.Module) -> int:
    """Each int8 weight: its int8 values plus per row, torch.ao: a float32 scale and an int32
    zero point; torchao: a float32 scale and an int8 zero point. Biases and every other
    parameter and buffer at their own size."""
    total = 0
    seen: set[int] = set()
    for module in model.modules():
        values = _int8_values(module)
        if values is None:
            continue
        rows = values.shape[0]
        total += values.numel() + rows * (8 if isinstance(module, DynamicLinear) else 5)
        if isinstance(module, DynamicLinear):
            bias = module._packed_params._weight_bias()[1]
            total += 0 if bias is None else bias.numel() * 4
        else:
            seen.add(id(module.weight))
    for tensor in (*model.parameters(), *model.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("form", ["dense", "prune", "lowrank"])
def test_int8_bytes_are_counted_by_hand(form, mode):
    model = _compressed("gpt2", form)
    freeze(model)
    before = model_bytes(model)
    quantize_int8(model, mode)
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
        quantize_int8(model, "dynamic")
    assert [(n, type(m)) for n, m in model.named_modules()] == names


def test_quantizing_twice_is_refused():
    model = _compressed("gpt2", "prune")
    quantize_int8(model)
    with pytest.raises(HfCompressError, match="already quantized"):
        quantize_int8(model)


def test_a_torchao_config_quantizes_pruned_and_factored_layers():
    # any torchao config: here int8 activations per token too
    torchao = pytest.importorskip("torchao.quantization")
    model = _compressed("llama", "lowrank+prune")
    inputs = tiny_inputs("llama", model)
    zeros = _pruned_zeros(model)
    with torch.no_grad():
        before = model_output(model, inputs)
    bytes_before = model_bytes(model)
    quantize_int8(model, config=torchao.Int8DynamicActivationInt8WeightConfig())
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


def test_excluded_modules_and_their_factors_stay_float():
    model = _compressed("llama", "lowrank+prune")
    quantize_int8(model, exclude=r".*mlp\.down_proj")
    for name, module in model.named_modules():
        if type(module) in (nn.Linear, DynamicLinear) and name.startswith("model.layers"):
            assert (_int8_values(module) is None) == (".down_proj." in name), name


def test_a_bad_exclude_pattern_is_refused_and_the_model_is_left_as_it_was():
    model = _compressed("llama", "prune")
    names = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(HfCompressError, match="exclude="):
        quantize_int8(model, exclude="(unclosed")
    assert [(n, type(m)) for n, m in model.named_modules()] == names


@pytest.mark.parametrize("mode", MODES)
def test_parameter_counts_see_the_int8_weights(mode):
    model = _compressed("gpt2", "prune")
    quantize_int8(model, mode)
    total = nonzero = 0
    seen: set[int] = set()
    for module in model.modules():
        values = _int8_values(module)
        if values is not None:
            total += values.numel()
            nonzero += int((values != 0).sum())
            seen.add(id(getattr(module, "weight", None)))
            if isinstance(module, DynamicLinear):
                bias = module._packed_params._weight_bias()[1]
                total, nonzero = total + bias.numel(), nonzero + bias.numel()
    rest = sum(
        p.numel() for p in {id(p): p for p in model.parameters()}.values() if id(p) not in seen
    )
    counted = count_parameters(model)
    assert (counted.total, counted.nonzero) == (total + rest, nonzero + rest)
    assert counted.nonzero < counted.total  # the pruned zeros are still visible


def test_an_unknown_mode_is_refused_and_the_model_is_left_as_it_was():
    model = _compressed("llama", "prune")
    names = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(HfCompressError, match=r"mode='int4'.*weight-only.*dynamic"):
        quantize_int8(model, "int4")
    assert [(n, type(m)) for n, m in model.named_modules()] == names


def test_without_torchao_weight_only_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # import fails
    model = _compressed("llama", "prune")
    names = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(HfCompressError, match=r"hfcompress\[int8\].*dynamic"):
        quantize_int8(model)
    assert [(n, type(m)) for n, m in model.named_modules()] == names
