"""compress_model over tiny GPT-2 / Llama / BERT / OPT / T5, every method and composed stages."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

from conftest import (
    BLOCK_LINEARS,
    assert_unchanged,
    model_output,
    snapshot,
    tiny_inputs,
    tiny_model,
)
from hfcompress import HfCompressError
from hfcompress.layers import (
    CompressedLayer,
    KroneckerLinear,
    LowRankLinear,
    PrunedLinear,
    dense_weight_of,
)
from hfcompress.recipe import RecipeError
from hfcompress.surgery import compress_model, compression_spec

ATTENTION = r".*self_attn\..*"
METHOD_STAGES = {
    "prune": {"method": "prune", "targets": BLOCK_LINEARS, "sparsity": 0.5},
    "prune-2:4": {"method": "prune", "targets": BLOCK_LINEARS, "pattern": "2:4"},
    "lowrank": {"method": "lowrank", "targets": BLOCK_LINEARS, "rank": 8},
    "kronecker": {"method": "kronecker", "targets": BLOCK_LINEARS, "a_shape": [8, 8], "terms": 2},
}


def densified_reference(original: nn.Module, compressed: nn.Module) -> nn.Module:
    """The original model with each compressed module's effective W copied in, layout-aware.

    Built from the original's own modules, so it checks that surgery put the right layer in the
    right place with the right orientation, independently of the compressed model's wiring.
    """
    reference = copy.deepcopy(original)
    for name, module in compressed.named_modules():
        if isinstance(module, CompressedLayer) and not isinstance(
            compressed.get_submodule(name.rpartition(".")[0] or ""), LowRankLinear
        ):
            target = reference.get_submodule(name)
            W = module.dense_weight().detach()
            with torch.no_grad():
                if type(target).__name__ == "Conv1D":
                    target.weight.copy_(W.T)
                else:
                    target.weight.copy_(W)
    return reference


@pytest.mark.parametrize("method", list(METHOD_STAGES))
def test_every_method_on_every_architecture(arch, method):
    model = tiny_model(arch)
    original = copy.deepcopy(model)
    inputs = tiny_inputs(arch, model)
    report = compress_model(model, {"stages": [METHOD_STAGES[method]]}, progress=False)
    compressed = [n for n, m in model.named_modules() if isinstance(m, CompressedLayer)]
    targets = [
        n for n in original.state_dict() if re.fullmatch(BLOCK_LINEARS, n.rpartition(".")[0])
    ]
    assert len(report.modules) == len(compressed) > 0
    assert {n.rpartition(".")[0] for n in targets} >= set(compressed)
    reference = densified_reference(original, model)
    assert torch.allclose(model_output(model, inputs), model_output(reference, inputs), atol=1e-4)
    for row in report.modules:
        W = dense_weight_of(original.get_submodule(row.name)).detach()
        W_hat = model.get_submodule(row.name).dense_weight().detach()
        assert row.rel_error == pytest.approx(float((W - W_hat).norm() / W.norm()), rel=1e-4)
        assert row.shape == tuple(W.shape)
    assert report.params_after < report.params_before


def test_composed_lowrank_then_prune_prunes_the_factors(arch):
    model = tiny_model(arch)
    original = copy.deepcopy(model)
    inputs = tiny_inputs(arch, model)
    recipe = {
        "stages": [
            {"method": "lowrank", "targets": BLOCK_LINEARS, "rank": 8},
            {"method": "prune", "targets": BLOCK_LINEARS, "pattern": "2:4"},
        ]
    }
    report = compress_model(model, recipe, progress=False)
    lowrank = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert lowrank and all(
        isinstance(m.u, PrunedLinear) and isinstance(m.v, PrunedLinear) for m in lowrank
    )
    assert all(row.methods == ["lowrank", "prune"] for row in report.modules)
    for m in lowrank:
        assert torch.all(m.u.mask.reshape(m.out_features, -1, 4).sum(-1) == 2)
        assert torch.allclose(m.dense_weight(), m.u.dense_weight() @ m.v.dense_weight())
    reference = densified_reference(original, model)
    assert torch.allclose(model_output(model, inputs), model_output(reference, inputs), atol=1e-4)


def test_overrides_and_mixed_stages_on_llama():
    model = tiny_model("llama")
    recipe = {
        "stages": [
            {
                "method": "lowrank",
                "targets": r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj",
                "ratio": 0.5,
                "overrides": {r"model\.layers\.0\..*": {"rank": 4}},
            },
            {"method": "kronecker", "targets": r".*o_proj", "a_shape": [8, 8], "terms": 2},
            {"method": "prune", "targets": r".*\.(q|k|v)_proj", "sparsity": 0.25},
        ],
        "exclude": "lm_head",
    }
    report = compress_model(model, recipe, progress=False)
    assert model.model.layers[0].mlp.up_proj.rank == 4
    assert model.model.layers[1].mlp.up_proj.rank == int(0.5 * 128 * 64 / 192)
    assert isinstance(model.model.layers[1].self_attn.o_proj, KroneckerLinear)
    assert isinstance(model.model.layers[1].self_attn.k_proj, PrunedLinear)
    assert len(report.modules) == 2 * 7
    spec = model.config.quantization_config  # the HF integration turns it into its config object
    spec = spec if isinstance(spec, dict) else spec.to_dict()
    assert spec["quant_method"] == "hfcompress"
    assert spec["modules"] == compression_spec(model)
    assert spec["modules"]["model.layers.0.mlp.up_proj"]["rank"] == 4
    text = str(report)
    assert "model.layers.0.mlp.up_proj" in text and "rank=4" in text and "params before" in text


def test_dry_run_changes_nothing_and_reports_the_same(arch):
    model = tiny_model(arch)
    before = snapshot(model)
    recipe = {
        "stages": [
            METHOD_STAGES["lowrank"],
            {"method": "prune", "targets": BLOCK_LINEARS, "sparsity": 0.5},
        ]
    }
    dry = compress_model(model, recipe, dry_run=True, progress=False)
    assert_unchanged(model, before)
    real = compress_model(model, recipe, progress=False)
    assert dry.dry_run and not real.dry_run
    assert [(m.name, m.params_after, m.settings) for m in dry.modules] == [
        (m.name, m.params_after, m.settings) for m in real.modules
    ]
    assert [m.rel_error for m in dry.modules] == pytest.approx([m.rel_error for m in real.modules])


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        (
            {"method": "prune", "targets": r"no\.such\..*", "sparsity": 0.5},
            r"stages\[1\]\(prune\)\.targets: 'no\\\\.such\\\\..\*' fully matches no",
        ),
        (
            {"method": "lowrank", "targets": ATTENTION, "rank": 40},
            r"stages\[1\]\(lowrank\), 4 modules \('model\.layers\.0\.self_attn\.k_proj', .*\): rank=40: expected an integer in \[1, min\(out, in\)\] = \[1, 32\]",
        ),
        (
            {"method": "kronecker", "targets": ATTENTION, "a_shape": [6, 8]},
            r"4 modules \('model\.layers\.0\.self_attn\.q_proj', .*\): a_shape=\(6, 8\): expected",
        ),
        (
            {"method": "kronecker", "targets": ATTENTION, "a_shape": [8, 8], "terms": 100},
            r"terms=100",
        ),
        ({"method": "prune", "targets": ATTENTION, "pattern": "3:7"}, r"divisible by 7"),
    ],
)
def test_validation_errors_name_stage_module_field_and_leave_model_unchanged(stage, message):
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(RecipeError, match=message):
        compress_model(
            model,
            {"stages": [{"method": "prune", "targets": r".*gate_proj", "sparsity": 0.1}, stage]},
        )
    assert_unchanged(model, before)


def test_unsupported_composition_is_refused_before_anything_changes():
    model = tiny_model("gpt2")
    before = snapshot(model)
    recipe = {
        "stages": [
            {"method": "kronecker", "targets": BLOCK_LINEARS, "a_shape": [8, 8]},
            {"method": "lowrank", "targets": BLOCK_LINEARS, "rank": 2},
        ]
    }
    with pytest.raises(
        RecipeError, match=r"stages\[1\]\(lowrank\).*'lowrank' after 'kronecker' is not supported"
    ):
        compress_model(model, recipe)
    assert_unchanged(model, before)


def test_failure_while_applying_restores_the_model(monkeypatch):
    model = tiny_model("gpt2")
    before = snapshot(model)
    calls = {"n": 0}
    real = KroneckerLinear.from_module

    def flaky(module, **params):
        calls["n"] += 1
        if calls["n"] == 3:  # after 4 prunes and 2 factorizations are swapped in
            raise RuntimeError("simulated out-of-memory")
        return real(module, **params)

    monkeypatch.setattr(KroneckerLinear, "from_module", flaky)
    recipe = {
        "stages": [
            {"method": "prune", "targets": BLOCK_LINEARS, "sparsity": 0.5},
            {"method": "kronecker", "targets": r".*mlp\..*", "a_shape": [8, 8]},
        ]
    }
    with pytest.raises(RecipeError):  # prune then kronecker on the same module is refused ...
        compress_model(model, recipe)
    recipe["stages"][0]["targets"] = r".*attn\..*"  # ... so prune attention, factor the MLP
    with pytest.raises(HfCompressError, match="simulated out-of-memory") as info:
        compress_model(model, recipe, progress=False)
    assert "restored unchanged" in str(info.value)
    assert_unchanged(model, before)


def test_tied_lm_head_is_skipped_and_reported(arch):
    model = tiny_model(arch)
    if arch == "bert":
        pytest.skip("no tied Linear in the BERT classifier")
    report = compress_model(
        model, {"stages": [{"method": "prune", "targets": ".*", "sparsity": 0.5}]}, progress=False
    )
    assert any(name == "lm_head" and "tied" in reason for name, reason in report.skipped)
    assert not isinstance(model.lm_head, CompressedLayer)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert "skipped lm_head" in str(report)


def test_targeting_only_a_tied_module_is_an_error():
    model = tiny_model("gpt2")
    with pytest.raises(RecipeError, match="matches only tied modules"):
        compress_model(
            model, {"stages": [{"method": "prune", "targets": "lm_head", "sparsity": 0.5}]}
        )


def test_recipe_exclude_and_stage_exclude():
    model = tiny_model("gpt2")
    recipe = {
        "stages": [
            {"method": "prune", "targets": BLOCK_LINEARS, "sparsity": 0.5, "exclude": r".*\.0\..*"}
        ],
        "exclude": r".*c_attn",
    }
    report = compress_model(model, recipe, progress=False)
    assert sorted(m.name for m in report.modules) == [
        "transformer.h.1.attn.c_proj",
        "transformer.h.1.mlp.c_fc",
        "transformer.h.1.mlp.c_proj",
    ]


def test_recipe_from_yaml_path(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("stages:\n  - method: lowrank\n    targets: '.*mlp\\.c_fc'\n    energy: 0.9\n")
    model = tiny_model("gpt2")
    report = compress_model(model, path, progress=False)
    assert len(report.modules) == 2 and all("rank" in m.settings for m in report.modules)


def test_model_parameter_totals_count_tied_weights_once():
    model = tiny_model("gpt2")
    unique = sum(p.numel() for p in model.parameters())
    report = compress_model(
        model,
        {"stages": [{"method": "prune", "targets": BLOCK_LINEARS, "sparsity": 0.5}]},
        progress=False,
    )
    assert report.model_params_before == unique
    masked = sum(
        m.mask.numel() - int(m.mask.sum()) for m in model.modules() if isinstance(m, PrunedLinear)
    )
    assert report.model_params_after == unique - masked


def test_low_rank_layers_are_never_taken_for_tied_ones():
    """LowRankLinear.weight is computed on every read (ids of freed temporaries get reused):
    a second compress_model on an already low-rank model must see every layer, untied."""
    from hfcompress.surgery import tied_modules

    model = tiny_model("llama")
    mlp = r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj"
    compress_model(model, {"stages": [{"method": "lowrank", "targets": mlp, "rank": 16}]})
    tied = tied_modules(model)
    assert not [n for n in tied if ".mlp." in n]
    report = compress_model(
        model, {"stages": [{"method": "prune", "targets": mlp, "sparsity": 0.5}]}, progress=False
    )
    assert len(report.modules) == 6 and not report.skipped
