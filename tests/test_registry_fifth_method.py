"""A method defined entirely here, registered through the public API, with no edit under src/.

``rowscale``: W ≈ diag(s)·Q/L with s the per-row max |W| and Q the integers round(L·W/s) in
[-L, L] (stored as floats), a data-free builder. It runs through recipe parsing and validation,
``compress_model``, the report, ``save_pretrained``, a fresh-process ``from_pretrained`` and
``decompress``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from pydantic import Field
from torch import nn
from transformers import AutoModelForCausalLM

import hfcompress
from conftest import tiny_inputs, tiny_model
from hfcompress import Criterion, Method, RecipeError, compress_model, decompress
from hfcompress.errors import InvalidParameterError
from hfcompress.layers import CompressedLayer, dense_weight_of, source_kind
from hfcompress.layers.base import Planned
from hfcompress.registry import unregister_method
from hfcompress.stage import StageBase

TARGETS = r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj"


class RowScaledLinear(CompressedLayer):
    """y = ((x·Qᵀ) ⊙ s/L) + b with Q: [out, in] integer-valued, s: [out]."""

    method = "rowscale"

    def __init__(self, in_features, out_features, levels, bias=True, *, source="linear",
                 device=None, dtype=None) -> None:  # fmt: skip
        super().__init__()
        self._init_common(in_features, out_features, source)
        if not 1 <= levels <= 127:
            raise InvalidParameterError(f"levels={levels}: expected 1 ≤ levels ≤ 127")
        self.levels = levels
        factory = {"device": device, "dtype": dtype}
        self.q = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.scale = nn.Parameter(torch.empty(out_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None

    @classmethod
    def from_module(cls, module: nn.Module, *, levels: int = 127) -> RowScaledLinear:
        W = dense_weight_of(module).detach().float()
        s = W.abs().amax(dim=1).clamp_min(1e-12)
        layer = cls(W.shape[1], W.shape[0], levels, module.bias is not None,
                    source=source_kind(module), device=W.device, dtype=module.bias.dtype
                    if module.bias is not None else W.dtype)  # fmt: skip
        with torch.no_grad():
            layer.q.copy_(torch.round(W / s[:, None] * levels))
            layer.scale.copy_(s)
            if module.bias is not None:
                layer.bias.copy_(module.bias)
        return layer

    @classmethod
    def from_spec(cls, spec: dict[str, Any], device, dtype) -> RowScaledLinear:
        return cls(spec["in_features"], spec["out_features"], spec["levels"], spec["bias"],
                   source=spec["source"], device=device, dtype=dtype)  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x @ self.q.T) * (self.scale / self.levels)
        return y if self.bias is None else y + self.bias

    def dense_weight(self) -> torch.Tensor:
        return self.q * (self.scale / self.levels)[:, None]

    def dense_bias(self) -> torch.Tensor | None:
        return self.bias

    def compression_params(self) -> dict[str, object]:
        return {"levels": self.levels}


class RowScaleStage(StageBase):
    method: Literal["rowscale"] = "rowscale"
    levels: int = Field(default=127, ge=1, le=127, strict=True, description="Q's range ±L.")
    criterion: Literal["absmax"] = "absmax"

    def layer_params(self) -> dict[str, Any]:
        return {"levels": self.levels}


def build_absmax(module: nn.Module, stage: RowScaleStage, stats: object) -> RowScaledLinear:
    return RowScaledLinear.from_module(module, **stage.layer_params())


def plan_rowscale(stage: RowScaleStage, planned: Planned) -> Planned:
    RowScaledLinear(planned.in_features, planned.out_features, stage.levels, device="meta")
    return Planned("rowscale", planned.out_features, planned.in_features)


METHOD = Method(
    name="rowscale",
    stage=RowScaleStage,
    criteria={"absmax": Criterion(build_absmax)},
    plan=plan_rowscale,
    layers=(RowScaledLinear,),
    description="per-row scaled integer weights (test-only)",
)


def register() -> None:
    hfcompress.register_method(METHOD)


@pytest.fixture
def rowscale():
    register()
    yield METHOD
    unregister_method("rowscale")


RECIPE = {"stages": [{"method": "rowscale", "targets": TARGETS, "levels": 15}]}


def test_registration_makes_the_method_known_everywhere(rowscale):
    assert "rowscale" in hfcompress.method_names()
    with pytest.raises(
        RecipeError, match=r"stages\[0\]\(rowscale\)\.levels: .*less than or equal to 127"
    ):
        hfcompress.Recipe.load({"stages": [{"method": "rowscale", "targets": ".*", "levels": 500}]})
    with pytest.raises(RecipeError, match=r"allowed: \[.*'rowscale'"):
        hfcompress.Recipe.load({"stages": [{"method": "rowscal", "targets": ".*"}]})
    with pytest.raises(hfcompress.HfCompressError, match="already registered"):
        register()


def test_unregistered_it_is_refused(rowscale):
    unregister_method("rowscale")
    with pytest.raises(RecipeError, match="unknown method 'rowscale'"):
        hfcompress.Recipe.load(RECIPE)
    register()


def test_compress_report_save_fresh_load_and_decompress(rowscale, tmp_path):
    model = tiny_model("llama")
    dense = {n: dense_weight_of(m).detach().clone() for n, m in model.named_modules()
             if n.endswith(("gate_proj", "up_proj", "down_proj"))}  # fmt: skip
    inputs = tiny_inputs("llama", model)
    report = compress_model(model, RECIPE, progress=False)
    assert {row.methods[0] for row in report.modules} == {"rowscale"}
    assert len(report.modules) == len(dense)
    for name, W in dense.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, RowScaledLinear)
        # the reference: per-row absmax quantization written out by hand
        s = W.abs().amax(dim=1, keepdim=True)
        expected = torch.round(W / s * 15) * s / 15
        torch.testing.assert_close(layer.dense_weight(), expected, rtol=1e-5, atol=1e-6)
    assert "rowscale" in str(report)
    with torch.no_grad():
        logits = model(**inputs).logits
    model.save_pretrained(tmp_path)
    torch.save(inputs["input_ids"], tmp_path / "ids.pt")  # a test file, read back by the test
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import test_registry_fifth_method as t
        t.register()
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})
        assert type(model.model.layers[0].mlp.up_proj).__name__ == "RowScaledLinear"
        ids = torch.load({str(tmp_path / "ids.pt")!r}, weights_only=True)
        with torch.no_grad():
            torch.save(model(input_ids=ids).logits, {str(tmp_path / "out.pt")!r})
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    reloaded = torch.load(tmp_path / "out.pt", weights_only=True)
    torch.testing.assert_close(reloaded, logits, rtol=0, atol=1e-6)
    decompress(model)
    assert not any(isinstance(m, CompressedLayer) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, logits, rtol=1e-5, atol=1e-5)
    plain = tmp_path / "plain"
    model.save_pretrained(plain)
    again = AutoModelForCausalLM.from_pretrained(plain)
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).logits, logits, rtol=1e-5, atol=1e-5)


def test_composition_rules_come_from_the_method(rowscale):
    model = tiny_model("llama")
    recipe = {"stages": [RECIPE["stages"][0], {"method": "prune", "targets": TARGETS,
                                                "sparsity": 0.5}]}  # fmt: skip
    with pytest.raises(RecipeError, match="'prune' after 'rowscale' is not supported"):
        compress_model(model, recipe, progress=False)
