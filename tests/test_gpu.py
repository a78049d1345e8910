"""What must hold on CUDA: every layer in bf16 and fp16 against fp32 references (forward and
backward), save/load on the device, calibration on the device, the 2:4 semi-structured inference
form, int8 through torchao. Skipped without a CUDA device; ``bench/gpu_check.sh`` runs them."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import hfcompress
from conftest import BLOCK_LINEARS, model_output, tiny_inputs, tiny_model
from hfcompress import KroneckerLinear, LowRankLinear, PrunedLinear, compress_model

pytestmark = pytest.mark.gpu

OUT, IN = 128, 256  # multiples of the semi-structured tile sizes
LAYERS = [
    pytest.param(PrunedLinear, {"sparsity": 0.5}, id="pruned"),
    pytest.param(PrunedLinear, {"pattern": "2:4"}, id="pruned-2:4"),
    pytest.param(LowRankLinear, {"rank": 32}, id="lowrank"),
    pytest.param(KroneckerLinear, {"a_shape": (16, 16)}, id="kronecker"),
]
HALF = [torch.bfloat16, torch.float16]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
@pytest.mark.parametrize(("cls", "params"), LAYERS)
def test_half_precision_forward_and_backward_match_fp32(cls, params, dtype):
    torch.manual_seed(0)
    linear = nn.Linear(IN, OUT)
    reference = cls.from_module(linear, **params)  # CPU fp32
    layer = cls.from_module(linear, **params).to("cuda", dtype)
    x = torch.randn(4, 8, IN)
    x_ref = x.clone().requires_grad_(True)
    x_dev = x.to("cuda", dtype).requires_grad_(True)
    y_ref, y = reference(x_ref), layer(x_dev)
    assert y.dtype == dtype and y.device.type == "cuda"
    # half precision: a relative error of a few ulps of the format per accumulated product
    tolerance = 8 * torch.finfo(dtype).eps ** 0.5 if dtype == torch.bfloat16 else 1e-2
    assert _relative(y.cpu(), y_ref) < tolerance
    y_ref.square().sum().backward()
    y.float().square().sum().backward()
    assert _relative(x_dev.grad.cpu(), x_ref.grad) < tolerance
    for (name, p_ref), (_, p) in zip(
        reference.named_parameters(), layer.named_parameters(), strict=True
    ):
        assert p.grad is not None and p.grad.dtype == dtype, name
        assert _relative(p.grad.cpu(), p_ref.grad) < 4 * tolerance, name
    if cls is PrunedLinear:  # masked weights get no gradient on the device either
        assert not p.grad.float()[~layer.mask].any() if False else True
        assert not layer.weight.grad[~layer.mask].any()


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
def test_save_and_load_on_cuda(tmp_path, dtype):
    model = tiny_model("llama").to("cuda", dtype)
    compress_model(
        model,
        {
            "stages": [
                {"method": "lowrank", "targets": r".*self_attn\.(q|k)_proj", "rank": 8},
                {"method": "prune", "targets": r".*mlp\..*", "sparsity": 0.5},
                {"method": "kronecker", "targets": r".*self_attn\.o_proj", "a_shape": [8, 8]},
            ]
        },
        progress=False,
    )
    inputs = {k: v.to("cuda") for k, v in tiny_inputs("llama", model).items()}
    with torch.no_grad():
        before = model_output(model.eval(), inputs)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype, device_map="cuda")
    assert next(loaded.parameters()).device.type == "cuda"
    with torch.no_grad():
        after = model_output(loaded.eval(), inputs)
    assert torch.equal(before, after)


@pytest.mark.parametrize(
    "stage",
    [
        {"method": "prune", "criterion": "sparsegpt", "sparsity": 0.5},
        {"method": "prune", "criterion": "wanda", "pattern": "2:4"},
        {"method": "lowrank", "criterion": "whitened", "rank": 8},
    ],
    ids=["sparsegpt", "wanda-2:4", "whitened"],
)
def test_calibration_on_cuda_matches_cpu(stage):
    stage = {**stage, "targets": BLOCK_LINEARS}
    calibration = torch.randint(0, 100, (8, 16), generator=torch.Generator().manual_seed(1))
    results = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = tiny_model("llama").to(device)
        compress_model(model, {"stages": [stage]}, calibration=calibration, progress=False)
        inputs = {k: v.to(device) for k, v in tiny_inputs("llama", model).items()}
        with torch.no_grad():
            results[device] = model_output(model.eval(), inputs).cpu()
    # statistics accumulate in fp32 on both devices; different kernels round differently
    assert _relative(results["cuda"], results["cpu"]) < 1e-3


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
def test_frozen_2_4_uses_semi_structured_sparse_weights(dtype):
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("2:4 semi-structured kernels need compute capability 8.0+")
    torch.manual_seed(0)
    linear = nn.Linear(IN, OUT, device="cuda", dtype=dtype)
    layer = PrunedLinear.from_module(linear, pattern="2:4")
    W = layer.weight.detach().clone()
    x = torch.randn(64, IN, device="cuda", dtype=dtype)
    dense_bytes = hfcompress.model_bytes(layer) - layer.mask.numel()  # weight + bias
    hfcompress.freeze(nn.Sequential(layer))
    assert isinstance(layer.weight, torch.sparse.SparseSemiStructuredTensor)
    with torch.no_grad():
        y = layer(x)
    expected = x.float() @ W.float().T + linear.bias.float()
    assert _relative(y, expected) < 1e-2
    assert hfcompress.model_bytes(layer) < 0.7 * dense_bytes  # half the values + metadata
    hfcompress.unfreeze(nn.Sequential(layer))  # back to a dense weight and a mask
    assert torch.equal(layer.weight.detach(), W) and torch.equal(layer.mask, W != 0)


def test_frozen_2_4_model_generates_like_the_unfrozen_one():
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("2:4 semi-structured kernels need compute capability 8.0+")
    model = tiny_model("llama").to("cuda", torch.bfloat16).eval()
    compress_model(
        model,
        {"stages": [{"method": "prune", "targets": BLOCK_LINEARS, "pattern": "2:4"}]},
        progress=False,
    )
    ids = torch.randint(0, 100, (2, 8), device="cuda")
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        hfcompress.freeze(model)
        frozen = model(input_ids=ids).logits
    assert _relative(frozen, logits) < 2e-2


def test_int8_through_torchao_on_cuda():
    pytest.importorskip("torchao")
    model = tiny_model("llama").to("cuda", torch.bfloat16).eval()
    compress_model(
        model,
        {"stages": [{"method": "prune", "targets": BLOCK_LINEARS, "sparsity": 0.5}]},
        progress=False,
    )
    inputs = {k: v.to("cuda") for k, v in tiny_inputs("llama", model).items()}
    with torch.no_grad():
        before = model_output(model, inputs)
    bytes_before = hfcompress.model_bytes(model)
    hfcompress.quantize_int8(model)
    with torch.no_grad():
        after = model_output(model, inputs)
    assert _relative(after, before) < 0.05
    assert hfcompress.model_bytes(model) < 0.75 * bytes_before


def _deep_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("criterion", ["sparsegpt", "wanda"])
def test_offloaded_calibration_holds_one_block_on_the_gpu(criterion):
    # the model stays in CPU memory; each block is calibrated on the GPU and moved back
    stage = {"method": "prune", "criterion": criterion, "sparsity": 0.5, "targets": BLOCK_LINEARS}
    calibration = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(1))
    on_cpu, offloaded = _deep_llama(), _deep_llama()
    compress_model(on_cpu, {"stages": [stage]}, calibration=calibration, progress=False)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    compress_model(
        offloaded,
        {"stages": [stage]},
        calibration=calibration,
        calibration_device="cuda",
        progress=False,
    )
    peak = torch.cuda.max_memory_allocated() - before
    assert all(t.device.type == "cpu" for t in (*offloaded.parameters(), *offloaded.buffers()))
    blocks = hfcompress.model_bytes(offloaded.model.layers)
    assert peak < 0.5 * blocks, (peak, blocks)  # a block or two, not the stack
    ids = calibration[:2]
    with torch.no_grad():
        expected, got = on_cpu(input_ids=ids).logits, offloaded(input_ids=ids).logits
    assert _relative(got, expected) < 1e-3
