"""Nothing half-done, nothing silently wrong: interrupts, bounded matching, strict recipe numbers.

Each test reproduces a defect a user (or the fuzzer) hit and fails on the code before the fix.
"""

from __future__ import annotations

import math
import subprocess
import sys
import types

import pytest
import torch
from torch import nn

import hfcompress.matching as matching_module
import hfcompress.methods.prune.build as prune_build
from conftest import BLOCK_LINEARS, assert_unchanged, snapshot, tiny_model
from hfcompress import HfCompressError, compress_model
from hfcompress.errors import InvalidParameterError
from hfcompress.layers import KroneckerLinear, LowRankLinear, PrunedLinear
from hfcompress.recipe import Recipe, RecipeError
from hfcompress.training import GradualPruningCallback, ProgressiveRankCallback

CALIBRATION = torch.randint(1, 128, (8, 16), generator=torch.Generator().manual_seed(3))
KRONECKER = {
    "stages": [{"method": "kronecker", "targets": BLOCK_LINEARS, "a_shape": [8, 8], "terms": 2}]
}


def _fail_on_call(monkeypatch, owner, name: str, call: int, error: BaseException) -> None:
    """Make ``owner.name`` raise ``error`` on its ``call``-th call (the earlier ones succeed)."""
    real = getattr(owner, name)
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, flaky)


# --- interrupts and errors mid-surgery ------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_ctrl_c_during_compress_model_restores_the_model(monkeypatch, arch):
    model = tiny_model(arch)
    before = snapshot(model)
    # the 5th Kronecker decomposition is interrupted: four modules are already swapped in
    _fail_on_call(monkeypatch, KroneckerLinear, "from_module", 5, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):  # re-raised as itself, not wrapped
        compress_model(model, KRONECKER, progress=False)
    assert_unchanged(model, before)
    assert not any(isinstance(m, KroneckerLinear) for m in model.modules())


def test_ctrl_c_during_calibrated_compression_restores_the_model(monkeypatch):
    model = tiny_model("llama").train()
    before = snapshot(model)
    _fail_on_call(monkeypatch, prune_build, "sparsegpt_prune", 9, KeyboardInterrupt())
    recipe = {
        "stages": [
            {"method": "prune", "targets": BLOCK_LINEARS, "sparsity": 0.5, "criterion": "sparsegpt"}
        ]
    }
    with pytest.raises(KeyboardInterrupt):
        compress_model(model, recipe, calibration=CALIBRATION, progress=False)
    assert_unchanged(model, before)
    assert model.training  # the layer-by-layer pass ran in eval mode and put the mode back


@pytest.mark.parametrize(
    ("error", "wrapped"),
    [
        (torch.OutOfMemoryError("simulated CUDA out of memory"), False),
        (TypeError("simulated programming error"), False),
        (torch.linalg.LinAlgError("simulated: matrix is not positive-definite"), True),
    ],
)
def test_only_decomposition_failures_are_wrapped(monkeypatch, error, wrapped):
    model = tiny_model("gpt2")
    before = snapshot(model)
    _fail_on_call(monkeypatch, KroneckerLinear, "from_module", 3, error)
    expected = HfCompressError if wrapped else type(error)
    with pytest.raises(expected) as info:
        compress_model(model, KRONECKER, progress=False)
    assert isinstance(info.value, HfCompressError) is wrapped
    if wrapped:
        assert "restored unchanged" in str(info.value) and "stages[0]" in str(info.value)
    else:
        assert info.value is error
    assert_unchanged(model, before)


# --- target matching ------------------------------------------------------------------------------


def test_all_matches_excluded_says_so():
    model = tiny_model("gpt2")
    recipe = {
        "stages": [{"method": "prune", "targets": r".*mlp\..*", "sparsity": 0.5}],
        "exclude": r".*\.mlp\..*",
    }
    n_mlp = sum(1 for n, m in model.named_modules() if ".mlp." in n and hasattr(m, "weight"))
    with pytest.raises(RecipeError, match=rf"matches {n_mlp} modules, all excluded by `exclude`"):
        compress_model(model, recipe)


def test_catastrophic_pattern_does_not_hang():
    # With the standard library's re, fullmatch('(.*)*x', name) backtracks exponentially in the
    # name's length (7 s for a 27-character GPT-2 name, minutes for Llama's): this subprocess
    # would run past its timeout. Bounded matching answers at once.
    code = (
        "import hfcompress, conftest\n"
        "model = conftest.tiny_model('llama')\n"
        "recipe = {'stages': [{'method': 'prune', 'targets': '(.*)*x', 'sparsity': 0.5}]}\n"
        "try:\n"
        "    hfcompress.compress_model(model, recipe)\n"
        "except hfcompress.RecipeError as error:\n"
        "    print('refused:', 'stages[0](prune).targets' in str(error))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=__file__.rsplit("/", 1)[0],
    )
    assert done.stdout.strip() == "refused: True", done.stderr[-2000:]


def test_a_match_past_the_timeout_names_the_stage(monkeypatch):
    def too_slow(*args, **kwargs):
        raise TimeoutError("regex timed out")

    monkeypatch.setattr(matching_module.regex, "fullmatch", too_slow)
    model = tiny_model("gpt2")
    recipe = {"stages": [{"method": "prune", "targets": r"(a+)+b", "sparsity": 0.5}]}
    with pytest.raises(RecipeError, match=r"stages\[0\]\(prune\)\.targets: '\(a\+\)\+b' took over"):
        compress_model(model, recipe)


# --- strict recipe numbers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        (
            {"version": -7, "stages": [{"method": "prune", "targets": "x", "sparsity": 0.5}]},
            r"version: Input should be greater than or equal to 1",
        ),
        (
            {"stages": [{"method": "kronecker", "targets": "x", "a_shape": [8.0, True]}]},
            r"a_shape\[0\]: Input should be a valid integer, got 8\.0 \(float\).*"
            r"a_shape\[1\]: Input should be a valid integer, got True \(bool\)",
        ),
        (
            {"stages": [{"method": "lowrank", "targets": "x", "rank": True}]},
            r"\(lowrank\)\.rank: Input should be a valid integer, got True \(bool\)",
        ),
        (
            {"stages": [{"method": "prune", "targets": "x", "sparsity": math.nan}]},
            r"\(prune\)\.sparsity: got nan; NaN and infinity are not allowed",
        ),
        (
            {"stages": [{"method": "lowrank", "targets": "x", "ratio": math.inf}]},
            r"\(lowrank\)\.ratio: got inf; NaN and infinity are not allowed",
        ),
        (
            {"stages": [{"method": "kronecker", "targets": "x", "a_shape": [8, 8], "terms": "2"}]},
            r"\(kronecker\)\.terms: Input should be a valid integer, got '2' \(str\)",
        ),
    ],
)
def test_recipe_numbers_are_not_coerced(recipe, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.load(recipe)


def test_integral_values_stay_valid_for_float_fields():
    stage = Recipe.load({"stages": [{"method": "prune", "targets": "x", "sparsity": 0}]}).stages[0]
    assert stage.sparsity == 0.0


# --- calibration inputs and the user's state ------------------------------------------------------


def test_fisher_leaves_the_users_gradients_as_they_were():
    model = tiny_model("llama")
    targets = r"model\.layers\.\d+\.mlp\.(up|down)_proj"
    untouched = model.model.layers[0].self_attn.q_proj.weight
    compressed_weight = model.model.layers[0].mlp.up_proj.weight
    grads = {}
    for p in (untouched, compressed_weight):
        p.grad = torch.randn_like(p)
        grads[id(p)] = p.grad.clone()
    no_grad = model.model.layers[1].self_attn.k_proj.weight
    assert no_grad.grad is None
    recipe = {
        "stages": [{"method": "lowrank", "targets": targets, "rank": 4, "criterion": "fisher"}]
    }
    compress_model(model, recipe, calibration=CALIBRATION, progress=False)
    assert torch.equal(untouched.grad, grads[id(untouched)])
    assert torch.equal(compressed_weight.grad, grads[id(compressed_weight)])
    assert no_grad.grad is None


def test_a_string_as_calibration_is_a_clear_error():
    model = tiny_model("llama")
    recipe = {
        "stages": [
            {"method": "prune", "targets": BLOCK_LINEARS, "sparsity": 0.5, "criterion": "wanda"}
        ]
    }
    with pytest.raises(InvalidParameterError, match=r"calibration: got a str .*pass token ids"):
        compress_model(model, recipe, calibration="To be, or not to be")


# --- the callbacks' in-place changes --------------------------------------------------------------


def _state(step: int) -> types.SimpleNamespace:
    return types.SimpleNamespace(global_step=step)


def test_interrupted_mask_update_is_undone(monkeypatch):
    model = tiny_model("llama")
    compress_model(
        model,
        {"stages": [{"method": "prune", "targets": BLOCK_LINEARS, "sparsity": 0.2}]},
        progress=False,
    )
    before = snapshot(model)
    callback = GradualPruningCallback(0.2, 0.8, start_step=0, end_step=10, update_every=1)
    # the 4th layer's mask update is interrupted, after three layers got their new masks
    _fail_on_call(monkeypatch, PrunedLinear, "set_mask_", 4, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        callback.on_step_end(None, _state(5), None, model=model)
    assert_unchanged(model, before)
    assert all(m.sparsity == 0.2 for m in model.modules() if isinstance(m, PrunedLinear))
    # uninterrupted, the same step does change the masks (the test above is not vacuous)
    monkeypatch.undo()
    callback.on_step_end(None, _state(5), None, model=model)
    layer = model.model.layers[0].mlp.up_proj
    assert layer.sparsity > 0.2 and not torch.equal(layer.mask, before["state"][_key(model, layer)])


def _key(model: nn.Module, layer: nn.Module) -> str:
    name = next(n for n, m in model.named_modules() if m is layer)
    return f"{name}.mask"


def test_interrupted_rank_reduction_is_undone(monkeypatch):
    model = tiny_model("llama")
    compress_model(
        model,
        {"stages": [{"method": "lowrank", "targets": BLOCK_LINEARS, "rank": 8}]},
        progress=False,
    )
    before = snapshot(model)
    parameters = [
        p for m in model.modules() if isinstance(m, LowRankLinear) for p in m.parameters()
    ]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    callback = ProgressiveRankCallback(every=1, factor=0.5, min_rank=2)
    _fail_on_call(monkeypatch, LowRankLinear, "truncate", 3, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        callback.on_step_end(None, _state(1), None, model=model, optimizer=optimizer)
    assert_unchanged(model, before)
    assert all(m.rank == 8 for m in model.modules() if isinstance(m, LowRankLinear))
    # the optimizer still holds exactly the model's parameters
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in model.parameters()} and all(id(p) in held for p in parameters)


def test_report_table_shows_the_output_error_when_computed():
    model = tiny_model("llama")
    targets = r"model\.layers\.\d+\.mlp\.up_proj"
    stage = {"method": "prune", "targets": targets, "sparsity": 0.5, "criterion": "sparsegpt"}
    report = compress_model(model, {"stages": [stage]}, calibration=CALIBRATION, progress=False)
    text = str(report)
    assert "output error" in text
    for module in report.modules:
        assert module.output_error is not None
        assert f"{module.output_error:.4f}" in text
    data_free = compress_model(
        tiny_model("llama"),
        {"stages": [{"method": "prune", "targets": targets, "sparsity": 0.5}]},
        progress=False,
    )
    assert "output error" not in str(data_free)


def test_a_problem_shared_by_many_modules_is_said_once():
    model = tiny_model("llama")
    recipe = {
        "stages": [
            {"method": "prune", "targets": BLOCK_LINEARS, "sparsity": 0.5, "criterion": "sparsegpt"}
        ]
    }
    n = sum(1 for n, m in model.named_modules() if ".layers." in n and isinstance(m, nn.Linear))
    with pytest.raises(RecipeError) as info:
        compress_model(model, recipe)  # no calibration data
    message = str(info.value)
    assert message.count("needs calibration data") == 1, message
    assert f"stages[0](prune), {n} modules ('model.layers.0.self_attn.q_proj'," in message


# --- keep_originals="disk": the undo copies wait in memory-mapped files -----------------------------

SPARSEGPT = {
    "stages": [
        {"method": "prune", "targets": BLOCK_LINEARS, "sparsity": 0.5, "criterion": "sparsegpt"}
    ]
}


def test_originals_on_disk_give_the_same_model_and_report():
    in_memory, on_disk = tiny_model("llama"), tiny_model("llama")
    on_disk.load_state_dict(in_memory.state_dict())
    a = compress_model(in_memory, SPARSEGPT, calibration=CALIBRATION, progress=False)
    b = compress_model(
        on_disk, SPARSEGPT, calibration=CALIBRATION, progress=False, keep_originals="disk"
    )
    for (key, x), (_, y) in zip(
        in_memory.state_dict().items(), on_disk.state_dict().items(), strict=True
    ):
        assert torch.equal(x, y), key
    assert [(m.name, m.params_before, m.rel_error, m.output_error) for m in a.modules] == [
        (m.name, m.params_before, m.rel_error, m.output_error) for m in b.modules
    ]


def test_ctrl_c_with_originals_on_disk_restores_the_model_and_removes_the_files(
    monkeypatch, tmp_path
):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the stash's folder goes here
    model = tiny_model("llama")
    before = snapshot(model)
    # interrupted in the second block: the first block's originals are already on disk
    _fail_on_call(monkeypatch, prune_build, "sparsegpt_prune", 9, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        compress_model(
            model, SPARSEGPT, calibration=CALIBRATION, progress=False, keep_originals="disk"
        )
    assert_unchanged(model, before)
    assert list(tmp_path.iterdir()) == []  # the stash is gone


def test_stashed_module_is_file_backed_and_comes_back_exactly(tmp_path, monkeypatch):
    import tempfile

    from hfcompress.swap import DiskStash

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    module = nn.Sequential(nn.Linear(8, 4), nn.LayerNorm(4)).to(torch.bfloat16)
    module.register_buffer("steps", torch.arange(3))
    state = {k: v.clone() for k, v in module.state_dict().items()}
    stash = DiskStash()
    stash.stash(module)
    files = list(next(tmp_path.iterdir()).iterdir())
    assert len(files) == len(state)  # one file per tensor
    assert sum(f.stat().st_size for f in files) == sum(
        t.numel() * t.element_size() for t in state.values()
    )
    for key, value in module.state_dict().items():
        assert torch.equal(value, state[key]), key  # read through the mapping
    stash.restore(module)
    stash.close()
    assert list(tmp_path.iterdir()) == []
    for key, value in module.state_dict().items():
        assert torch.equal(value, state[key]) and value.dtype == state[key].dtype, key
    module[0].weight.data.add_(1)  # in memory again: writable, the files are gone


def test_an_unknown_keep_originals_is_refused_before_anything_changes():
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(RecipeError, match="keep_originals='gpu'"):
        compress_model(model, SPARSEGPT, calibration=CALIBRATION, keep_originals="gpu")
    assert_unchanged(model, before)
