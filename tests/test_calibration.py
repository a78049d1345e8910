"""Data-aware compression through compress_model(..., calibration=...), layer by layer."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from torch import nn
from torch.utils.data import DataLoader

import hfcompress.calibration as calibration_module
import hfcompress.methods.prune.build as prune_build
import hfcompress.runner as runner_module
from conftest import BLOCK_LINEARS, model_output, tiny_inputs, tiny_model
from hfcompress import HfCompressError, compress_model
from hfcompress.calibration import InputStats, calibration_batches, output_gradient_energy
from hfcompress.errors import InvalidParameterError
from hfcompress.layers import LowRankLinear, PrunedLinear
from hfcompress.recipe import RecipeError

CALIBRATION = torch.randint(1, 128, (12, 24), generator=torch.Generator().manual_seed(5))


def test_calibration_forms_give_the_same_batches():
    rows = CALIBRATION[:4]
    forms = [
        rows,
        [{"input_ids": r} for r in rows],
        [r.tolist() for r in rows],
        Dataset.from_dict({"input_ids": rows.tolist()}),
        DataLoader([{"input_ids": r} for r in rows], batch_size=2),
    ]
    for form in forms:
        batches = calibration_batches(form, batch_size=4)
        assert torch.equal(torch.cat([b["input_ids"] for b in batches]), rows), type(form)
    with pytest.raises(InvalidParameterError, match="LongTensor"):
        calibration_batches(torch.randn(2, 3))
    with pytest.raises(InvalidParameterError, match=r"no 'input_ids' column; it has \['text'\]"):
        calibration_batches(Dataset.from_dict({"text": ["a"]}))
    with pytest.raises(InvalidParameterError, match="no examples"):
        calibration_batches([])


def test_input_stats_match_hand_computation():
    X = torch.randn(3, 5, 4)
    stats = InputStats(want_gram=True)
    stats.add(X[:2])
    stats.add(X[2:])
    flat = X.reshape(-1, 4).double()
    assert stats.count == 15
    assert torch.allclose(stats.input_norm.double(), flat.norm(dim=0), atol=1e-5)
    assert torch.allclose(stats.mean_abs.double(), flat.abs().mean(0), atol=1e-6)
    assert torch.allclose(stats.gram.double(), flat.T @ flat, atol=1e-4)


def test_block_inputs_are_outputs_of_already_compressed_blocks(monkeypatch):
    """The Gram matrix used for block 1 equals the one the *compressed* model feeds block 1."""
    model = tiny_model("llama")
    dense = copy.deepcopy(model)
    seen: dict[str, torch.Tensor] = {}
    real = calibration_module.collect_stats

    def spy(block, inputs, wanted):
        stats = real(block, inputs, wanted)
        for name, s in stats.items():
            seen.setdefault(name + f"@{id(block)}", s.gram.clone())
        return stats

    monkeypatch.setattr("hfcompress.calibration.collect_stats", spy)
    recipe = {
        "stages": [
            {"method": "prune", "targets": BLOCK_LINEARS, "sparsity": 0.5, "criterion": "sparsegpt"}
        ]
    }
    compress_model(model, recipe, calibration=CALIBRATION, progress=False, true_sequential=True)

    def gram_into(m, module_name):
        stats = InputStats(want_gram=True)
        handle = m.get_submodule(module_name).register_forward_pre_hook(
            lambda _m, a: stats.add(a[0])
        )
        with torch.no_grad():
            for chunk in CALIBRATION.split(8):
                m(input_ids=chunk, use_cache=False)
        handle.remove()
        return stats.gram

    block = str(id(model.model.layers[1]))
    # Every module (o_proj, down_proj included: "true sequential") was calibrated on exactly the
    # inputs it gets in the final compressed model, and not on the dense model's.
    for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"):
        used = seen[f"{name}@{block}"]
        full = f"model.layers.1.{name}"
        assert torch.allclose(used, gram_into(model, full), rtol=1e-4, atol=1e-3), name
        assert not torch.allclose(used, gram_into(dense, full), rtol=1e-3, atol=1e-2), name


@pytest.mark.parametrize(
    ("arch", "block", "expected"),
    [
        (
            "llama",
            "model.layers.0",
            [
                ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                ["self_attn.o_proj"],
                ["mlp.gate_proj", "mlp.up_proj"],
                ["mlp.down_proj"],
            ],
        ),
        (
            "gpt2",
            "transformer.h.0",
            [["attn.c_attn"], ["attn.c_proj"], ["mlp.c_fc"], ["mlp.c_proj"]],
        ),
        (
            "bert",
            "bert.encoder.layer.0",
            [
                ["attention.self.query", "attention.self.key", "attention.self.value"],
                ["attention.output.dense"],
                ["intermediate.dense"],
                ["output.dense"],
            ],
        ),
    ],
)
def test_forward_groups_follow_the_data_flow(arch, block, expected):
    model = tiny_model(arch)
    names = [n for group in expected for n in group]
    captured = runner_module.capture_inputs(
        model, model.get_submodule(block), calibration_batches(CALIBRATION[:2])
    )
    shuffled = list(reversed(names))  # the order asked in does not matter
    groups = calibration_module.forward_groups(model.get_submodule(block), captured, shuffled)
    assert [sorted(g) for g in groups] == [sorted(g) for g in expected]


@pytest.mark.parametrize("arch", ["gpt2", "llama", "opt", "bert"])
def test_data_aware_beats_data_free_on_output_error(arch):
    """SparseGPT / whitened SVD minimize the error on the calibration inputs; magnitude / SVD don't."""
    inputs = {"input_ids": CALIBRATION}

    def logits_error(stage):
        model = tiny_model(arch)
        reference = model_output(model, inputs)
        compress_model(model, {"stages": [stage]}, calibration=CALIBRATION, progress=False)
        return float((model_output(model, inputs) - reference).norm() / reference.norm())

    prune = {"method": "prune", "targets": BLOCK_LINEARS, "sparsity": 0.5}
    assert logits_error({**prune, "criterion": "sparsegpt"}) < logits_error(prune)
    lowrank = {"method": "lowrank", "targets": BLOCK_LINEARS, "rank": 8}
    assert logits_error({**lowrank, "criterion": "whitened"}) < logits_error(lowrank)


@pytest.mark.parametrize(
    ("stage", "kind"),
    [
        ({"method": "prune", "sparsity": 0.5, "criterion": "wanda"}, PrunedLinear),
        ({"method": "prune", "pattern": "2:4", "criterion": "sparsegpt"}, PrunedLinear),
        ({"method": "lowrank", "rank": 8, "criterion": "activation"}, LowRankLinear),
        ({"method": "lowrank", "ratio": 0.5, "criterion": "fisher"}, LowRankLinear),
        ({"method": "lowrank", "rank": 8, "criterion": "fisher_whitened"}, LowRankLinear),
        ({"method": "kronecker", "a_shape": [8, 8], "terms": 2, "criterion": "activation"}, None),
    ],
)
def test_every_criterion_builds_layers_and_reports(stage, kind):
    model = tiny_model("gpt2")
    report = compress_model(
        model,
        {"stages": [{**stage, "targets": BLOCK_LINEARS}]},
        calibration=CALIBRATION,
        progress=False,
    )
    assert len(report.modules) == 8
    if kind is PrunedLinear:
        for module in model.modules():
            if isinstance(module, PrunedLinear):
                assert 1 - module.mask.float().mean().item() == pytest.approx(0.5, abs=0.01)
                assert torch.all(module.weight[~module.mask] == 0)
    if stage["criterion"] == "sparsegpt":
        assert all(row.output_error is not None and row.output_error < 1 for row in report.modules)


def test_fisher_whitened_weights_rows_by_the_dense_models_output_gradients(monkeypatch):
    """Each module is factorized with G = output_gradient_energy of the *dense* model; constant G
    gives exactly the whitened factors, the real G other ones."""
    recipe = {"stages": [{"method": "lowrank", "targets": BLOCK_LINEARS, "rank": 6}]}

    def compressed(criterion: str) -> nn.Module:
        model = tiny_model("llama")
        stage = {**recipe["stages"][0], "criterion": criterion}
        compress_model(model, {"stages": [stage]}, calibration=CALIBRATION, progress=False)
        return model

    whitened, weighted = compressed("whitened"), compressed("fisher_whitened")
    dense = tiny_model("llama")
    names = [n for n, m in weighted.named_modules() if isinstance(m, LowRankLinear)]
    expected = output_gradient_energy(dense, calibration_batches(CALIBRATION), names)
    seen: dict[str, torch.Tensor] = {}
    real = calibration_module.output_gradient_energy

    def spy(model, batches, module_names):
        energy = real(model, batches, module_names)
        seen.update(energy)
        return {n: torch.full_like(g, 2.5) for n, g in energy.items()}

    monkeypatch.setattr(calibration_module, "output_gradient_energy", spy)
    constant = compressed("fisher_whitened")
    assert sorted(seen) == sorted(names)
    for name in names:
        assert torch.allclose(seen[name], expected[name], rtol=1e-4), name
        w = whitened.get_submodule(name).weight
        assert torch.allclose(constant.get_submodule(name).weight, w, atol=1e-5), name
    assert any(
        not torch.allclose(weighted.get_submodule(n).weight, whitened.get_submodule(n).weight)
        for n in names
    )


def test_missing_calibration_and_unsupported_cases_are_refused_before_any_change():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stage = {"method": "prune", "targets": BLOCK_LINEARS, "sparsity": 0.5, "criterion": "wanda"}
    with pytest.raises(
        RecipeError,
        match=r"stages\[0\]\(prune\), 14 modules .*criterion: 'wanda' needs calibration data",
    ):
        compress_model(model, {"stages": [stage]})
    composed = {
        "stages": [
            {"method": "lowrank", "targets": BLOCK_LINEARS, "rank": 8},
            {**stage, "criterion": "sparsegpt"},
        ]
    }
    with pytest.raises(RecipeError, match=r"after 'lowrank' only the data-free criterion"):
        compress_model(model, composed, calibration=CALIBRATION)
    with pytest.raises(RecipeError, match="energy: selects ranks"):
        compress_model(
            model,
            {
                "stages": [
                    {"method": "lowrank", "targets": ".*", "energy": 0.9, "criterion": "whitened"}
                ]
            },
        )
    t5 = tiny_model("t5")
    with pytest.raises(RecipeError, match="one stack of layers"):
        compress_model(
            t5,
            {
                "stages": [
                    {
                        **stage,
                        "targets": r".*(encoder|decoder)\.block\.0\.layer\.0\.SelfAttention\.q",
                    }
                ]
            },
            calibration=CALIBRATION,
        )
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_dry_run_with_calibration_changes_nothing_and_matches_real_run():
    model = tiny_model("opt")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = {n: type(m) for n, m in model.named_modules()}
    recipe = {
        "stages": [
            {"method": "lowrank", "targets": BLOCK_LINEARS, "rank": 8, "criterion": "whitened"}
        ]
    }
    dry = compress_model(model, recipe, calibration=CALIBRATION, dry_run=True, progress=False)
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    real = compress_model(model, recipe, calibration=CALIBRATION, progress=False)
    assert [r.rel_error for r in dry.modules] == pytest.approx(
        [r.rel_error for r in real.modules], rel=1e-5
    )


def test_failure_mid_calibration_restores_the_model(monkeypatch):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = {"n": 0}
    real = prune_build.sparsegpt_prune

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 9:  # in the second block
            raise RuntimeError("simulated failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(prune_build, "sparsegpt_prune", flaky)
    recipe = {
        "stages": [
            {"method": "prune", "targets": BLOCK_LINEARS, "sparsity": 0.5, "criterion": "sparsegpt"}
        ]
    }
    with pytest.raises(HfCompressError, match="simulated failure"):
        compress_model(model, recipe, calibration=CALIBRATION, progress=False)
    assert not any(isinstance(m, PrunedLinear) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_bf16_model_calibrates_in_fp32():
    model = tiny_model("llama").to(torch.bfloat16)
    recipe = {
        "stages": [
            {"method": "prune", "targets": BLOCK_LINEARS, "sparsity": 0.5, "criterion": "sparsegpt"}
        ]
    }
    compress_model(model, recipe, calibration=CALIBRATION, progress=False)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.weight.dtype == torch.bfloat16 and layer.mask.dtype == torch.bool
    assert torch.isfinite(model_output(model, tiny_inputs("llama", model)).float()).all()


def test_output_gradient_energy_matches_retained_gradients():
    """G_j = Σ_tokens (∂L/∂y_j)², against y.grad retained in an ordinary backward pass of each
    batch: G is taken one sequence at a time, which scales it by batch² (6² here) and nothing
    else, since a token's output only reaches the loss of its own sequence."""
    model = tiny_model("llama")
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    batches = calibration_batches(CALIBRATION, batch_size=6)
    energy = calibration_module.output_gradient_energy(model, batches, names)
    expected = {n: 0.0 for n in names}
    for batch in batches:
        outputs = {}
        handles = [
            model.get_submodule(n).register_forward_hook(
                lambda _m, _a, y, n=n, seen=outputs: seen.__setitem__(n, y) or y.retain_grad()
            )
            for n in names
        ]
        model(**batch, labels=batch["input_ids"]).loss.backward()
        for handle in handles:
            handle.remove()
        for n in names:
            expected[n] = expected[n] + outputs[n].grad.reshape(
                -1, outputs[n].shape[-1]
            ).square().sum(0)
    for n in names:
        assert energy[n].shape == (model.get_submodule(n).out_features,)
        assert torch.allclose(energy[n], 36 * expected[n], rtol=1e-4, atol=1e-12)


def test_calibration_device_equal_to_the_models_changes_nothing():
    # the offload path (model in CPU memory, blocks calibrated on a GPU) runs in tests/test_gpu.py;
    # here: naming the model's own device is the default path, bit for bit
    stage = {"method": "prune", "criterion": "sparsegpt", "sparsity": 0.5, "targets": BLOCK_LINEARS}
    ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    default, named = tiny_model("llama"), tiny_model("llama")
    named.load_state_dict(default.state_dict())
    compress_model(default, {"stages": [stage]}, calibration=ids, progress=False)
    compress_model(
        named, {"stages": [stage]}, calibration=ids, calibration_device="cpu", progress=False
    )
    for (name, a), (_, b) in zip(
        default.state_dict().items(), named.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_to_device_moves_every_nested_tensor():
    cos, sin, ids = torch.ones(2), torch.zeros(2), torch.arange(3)
    value = ((torch.ones(1), {"position_embeddings": (cos, sin), "cache": None}), [ids], 7)
    moved = runner_module.to_device(value, torch.device("meta"))
    (hidden, kwargs), (ids_moved,), seven = moved
    assert hidden.is_meta and ids_moved.is_meta and seven == 7 and kwargs["cache"] is None
    assert all(t.is_meta for t in kwargs["position_embeddings"])
