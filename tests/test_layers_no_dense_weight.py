"""No compressed layer computes its dense W: [out, in] in a forward, on any architecture.

T5's feed-forward reads ``wo.weight.dtype`` on every forward; a low-rank or Kronecker ``weight``
must answer that without computing U·V or ΣA⊗B. Every op of a forward is recorded (a
``TorchDispatchMode``), and none may produce a tensor of a compressed layer's [out, in] shape.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import BLOCK_LINEARS, tiny_inputs, tiny_model
from hfcompress import compress_model
from hfcompress.layers import CompressedLayer, LazyWeight, LowRankLinear

FORMS = {
    "lowrank": {"method": "lowrank", "ratio": 0.5},
    "kronecker": {"method": "kronecker", "a_shape": [2, 2]},
    "prune": {"method": "prune", "sparsity": 0.5},
}


class _Shapes(TorchDispatchMode):
    """Records the shape of every new tensor an op returns (views of its inputs excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {
            a.untyped_storage().data_ptr()
            for a in (*args, *kwargs.values())
            if isinstance(a, torch.Tensor)
        }
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if (
                isinstance(tensor, torch.Tensor)
                and tensor.untyped_storage().data_ptr() not in inputs
            ):
                self.shapes.add(tuple(tensor.shape))
        return out


@pytest.mark.parametrize("form", list(FORMS))
def test_inference_forward_computes_no_dense_weight(arch, form):
    model = tiny_model(arch)
    compress_model(model, {"stages": [{**FORMS[form], "targets": BLOCK_LINEARS}]}, progress=False)
    model.eval()
    weights = {
        (m.out_features, m.in_features) for m in model.modules() if isinstance(m, CompressedLayer)
    }
    assert weights
    inputs = tiny_inputs(arch, model)
    recorder = _Shapes()
    with torch.no_grad(), recorder:
        model(**inputs)
    assert not weights & recorder.shapes, sorted(weights & recorder.shapes)


@pytest.mark.parametrize("form", ["lowrank", "kronecker"])
def test_training_forward_of_factored_layers_computes_no_dense_weight(form):
    model = tiny_model("t5")  # reads wo.weight on every forward
    compress_model(model, {"stages": [{**FORMS[form], "targets": BLOCK_LINEARS}]}, progress=False)
    weights = {
        (m.out_features, m.in_features) for m in model.modules() if isinstance(m, CompressedLayer)
    }
    recorder = _Shapes()
    with recorder:
        model(**tiny_inputs("t5", model))
    assert not weights & recorder.shapes


def test_lazy_weight_reads_metadata_for_free_and_values_on_use():
    layer = LowRankLinear.from_module(torch.nn.Linear(6, 5), rank=2)
    W = layer.weight
    assert isinstance(W, LazyWeight) and isinstance(W, torch.Tensor)
    assert (W.shape, W.dtype, W.device) == (torch.Size([5, 6]), torch.float32, torch.device("cpu"))
    reference = layer.u.weight @ layer.v.weight  # independent: the product of the factors
    torch.testing.assert_close(W + 0, reference)
    x = torch.randn(3, 6)
    torch.testing.assert_close(torch.nn.functional.linear(x, W), x @ reference.T)
