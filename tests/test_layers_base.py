"""What all three layers share: Linear/Conv1D equivalence, to_dense, dtypes, devices, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from conftest import devices, linear_and_conv1d
from hfcompress import (
    CompressedLayer,
    HfCompressError,
    KroneckerLinear,
    LowRankLinear,
    PrunedLinear,
    UnsupportedModuleError,
)
from hfcompress.layers import get_layer_class, register_layer, registered_methods

OUT, IN = 24, 32

LAYERS = [
    pytest.param(PrunedLinear, {"sparsity": 0.5}, id="pruned-unstructured"),
    pytest.param(PrunedLinear, {"pattern": "2:4"}, id="pruned-2:4"),
    pytest.param(LowRankLinear, {"rank": 6}, id="lowrank-rank"),
    pytest.param(LowRankLinear, {"ratio": 0.3}, id="lowrank-ratio"),
    pytest.param(KroneckerLinear, {"a_shape": (6, 8)}, id="kronecker-1"),
    pytest.param(KroneckerLinear, {"a_shape": (4, 4), "terms": 3}, id="kronecker-3"),
]


@pytest.mark.parametrize(("cls", "params"), LAYERS)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_equals_dense_matmul_of_effective_weight(cls, params, bias):
    linear, _ = linear_and_conv1d(OUT, IN, bias=bias)
    layer = cls.from_module(linear, **params)
    x = torch.randn(3, 5, IN)
    W = layer.dense_weight().detach()
    expected = x @ W.T + (linear.bias if bias else 0)
    assert torch.allclose(layer(x), expected, atol=1e-5)


@pytest.mark.parametrize(("cls", "params"), LAYERS)
def test_linear_and_conv1d_give_same_outputs(cls, params):
    linear, conv = linear_and_conv1d(OUT, IN)
    x = torch.randn(7, IN)
    assert torch.allclose(linear(x), conv(x), atol=1e-6)  # same logical W
    from_linear = cls.from_module(linear, **params)
    from_conv = cls.from_module(conv, **params)
    assert torch.allclose(from_linear(x), from_conv(x), atol=1e-5)
    assert from_linear.source == "linear" and from_conv.source == "conv1d"


@pytest.mark.parametrize(("cls", "params"), LAYERS)
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_to_dense_returns_original_class_and_layout(cls, params, kind):
    linear, conv = linear_and_conv1d(OUT, IN)
    source = linear if kind == "linear" else conv
    layer = cls.from_module(source, **params)
    dense = layer.to_dense()
    assert type(dense) is type(source)
    assert dense.weight.shape == source.weight.shape  # Conv1D: [in, out]
    assert torch.equal(dense.bias, source.bias)
    x = torch.randn(4, IN)
    assert torch.allclose(dense(x), layer(x), atol=1e-5)
    W = dense.weight.T if kind == "conv1d" else dense.weight
    assert torch.allclose(W, layer.dense_weight(), atol=1e-6)


@pytest.mark.parametrize(("cls", "params"), LAYERS)
def test_from_module_does_not_touch_source(cls, params):
    linear, _ = linear_and_conv1d(OUT, IN)
    before = {k: v.clone() for k, v in linear.state_dict().items()}
    layer = cls.from_module(linear, **params)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(1.0)
    for k, v in linear.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize(("cls", "params"), LAYERS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_decomposes_in_fp32_outputs_input_dtype(cls, params, dtype):
    linear, _ = linear_and_conv1d(OUT, IN)
    reference = cls.from_module(linear, **params)  # fp32 all the way
    layer = cls.from_module(linear.to(dtype), **params)
    assert all(p.dtype == dtype for p in layer.parameters())
    x = torch.randn(4, IN)
    y = layer(x.to(dtype))
    assert y.dtype == dtype
    tol = 0.05 * reference(x).abs().max().item()
    assert torch.allclose(y.float(), reference(x), atol=tol)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize(("cls", "params"), LAYERS)
def test_device_agnostic(cls, params, device):
    linear, conv = linear_and_conv1d(OUT, IN)
    for source in (linear.to(device), conv.to(device)):
        layer = cls.from_module(source, **params)
        assert all(p.device.type == device for p in layer.parameters())
        assert all(b.device.type == device for b in layer.buffers())
        x = torch.randn(3, IN, device=device)
        W = layer.dense_weight()
        assert torch.allclose(layer(x), x @ W.T + source.bias, atol=1e-4)
        assert layer.to_dense().weight.device.type == device


@pytest.mark.gpu
@pytest.mark.parametrize(("cls", "params"), LAYERS)
def test_cuda_bf16_matches_cpu_fp32(cls, params):
    linear, _ = linear_and_conv1d(OUT, IN)
    reference = cls.from_module(linear, **params)
    layer = cls.from_module(linear.to("cuda", torch.bfloat16), **params)
    x = torch.randn(8, IN)
    y = layer(x.to("cuda", torch.bfloat16))
    assert y.dtype == torch.bfloat16
    tol = 0.05 * reference(x).abs().max().item()
    assert torch.allclose(y.float().cpu(), reference(x), atol=tol)


@pytest.mark.parametrize(("cls", "params"), LAYERS)
def test_rejects_modules_that_are_not_linear(cls, params):
    with pytest.raises(
        UnsupportedModuleError, match=r"nn\.Linear or transformers\.pytorch_utils\.Conv1D"
    ) as info:
        cls.from_module(nn.Conv2d(3, 3, 1), **params)
    assert isinstance(info.value, ValueError)
    assert "Conv2d" in str(info.value)


@pytest.mark.parametrize(("cls", "params"), LAYERS)
def test_gradients_reach_trainable_parameters(cls, params):
    linear, _ = linear_and_conv1d(OUT, IN)
    layer = cls.from_module(linear, **params)
    layer(torch.randn(5, IN)).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_registry_lists_methods_and_refuses_duplicates():
    assert set(registered_methods()) >= {"prune", "lowrank", "kronecker"}
    assert get_layer_class("lowrank") is LowRankLinear
    with pytest.raises(HfCompressError, match=r"known methods: \['kronecker', 'lowrank', 'prune'"):
        get_layer_class("quantize")
    with pytest.raises(HfCompressError, match="already registered"):
        register_layer("prune")(PrunedLinear)


def test_every_registered_layer_replaces_a_conv1d_exactly_at_full_size():
    _, conv = linear_and_conv1d(OUT, IN)
    x = torch.randn(3, IN)
    reference = x @ conv.weight + conv.bias  # Conv1D's own layout: W is [in, out]
    full = {
        "prune": {"sparsity": 0.0},
        "lowrank": {"rank": min(OUT, IN)},
        "kronecker": {"a_shape": (OUT, IN)},
    }
    for method, params in full.items():
        layer = get_layer_class(method).from_module(conv, **params)
        assert isinstance(layer, CompressedLayer) and layer.source == "conv1d"
        torch.testing.assert_close(layer(x), reference, rtol=1e-4, atol=1e-5, msg=method)
        assert isinstance(layer.to_dense(), Conv1D)
