"""save_pretrained / from_pretrained round trips, compact sparse storage, loud failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
)

from conftest import BLOCK_LINEARS, model_output, tiny_inputs, tiny_model
from hfcompress import CheckpointError, compress_model, decompress
from hfcompress.decompose import pack_bitmask, unpack_bitmask
from hfcompress.layers import CompressedLayer, LowRankLinear, PrunedLinear

AUTO = {"t5": AutoModelForSeq2SeqLM, "bert": AutoModelForSequenceClassification}
KRON = r".*(o_proj|out_proj|\.o|attn\.c_proj|attention\.output\.dense)$"
MIXED = {
    "stages": [
        {
            "method": "lowrank",
            "targets": r".*(mlp\.c_fc|fc1|intermediate\.dense|up_proj|DenseReluDense\.wi)",
            "rank": 8,
        },
        {"method": "prune", "targets": BLOCK_LINEARS, "sparsity": 0.5, "exclude": KRON},
        {"method": "kronecker", "targets": KRON, "a_shape": [8, 8], "terms": 2},
    ]
}


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "warning"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def compressed(arch: str, tmp_path: Path, recipe: dict = MIXED):
    model = tiny_model(arch)
    compress_model(model, recipe, progress=False)
    inputs = tiny_inputs(arch, model)
    model.save_pretrained(tmp_path)
    return model, inputs


def test_bitmask_round_trip():
    mask = torch.rand(5, 19) > 0.5
    packed = pack_bitmask(mask)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 3)
    assert torch.equal(unpack_bitmask(packed, 19), mask)
    assert int(packed[0, 0]) == sum(int(mask[0, j]) << j for j in range(8))


def test_round_trip_every_architecture(arch, tmp_path):
    model, inputs = compressed(arch, tmp_path)
    reloaded = AUTO.get(arch, AutoModelForCausalLM).from_pretrained(tmp_path).eval()
    assert torch.equal(model_output(reloaded, inputs), model_output(model, inputs))
    original = dict(model.named_modules())
    for name, module in reloaded.named_modules():
        if isinstance(module, CompressedLayer):
            assert type(module) is type(original[name])
            for key, tensor in module.state_dict().items():
                assert torch.equal(tensor, original[name].state_dict()[key]), f"{name}.{key}"
    masks = [m.mask for m in reloaded.modules() if isinstance(m, PrunedLinear)]
    assert masks and all(mask.dtype == torch.bool for mask in masks)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "hfcompress" and config["format_version"] == 1
    assert set(config["modules"]) == {
        n
        for n, m in model.named_modules()
        if isinstance(m, CompressedLayer)
        and "." in n
        and not isinstance(model.get_submodule(n.rpartition(".")[0]), LowRankLinear)
    }


def test_headless_automodel_loads_causal_lm_checkpoint(tmp_path):
    model, inputs = compressed("llama", tmp_path)
    base = AutoModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        expected = model.model(**inputs).last_hidden_state
        got = base(**inputs).last_hidden_state
    assert torch.equal(got, expected)


def test_fresh_process_import_then_plain_from_pretrained(tmp_path):
    model, inputs = compressed("gpt2", tmp_path)
    torch.save({"inputs": inputs, "logits": model_output(model, inputs)}, tmp_path / "expected.pt")
    result = run_python(
        f"""
        import torch, hfcompress
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}).eval()
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            logits = model(**expected["inputs"]).logits
        print("EQUAL", torch.equal(logits, expected["logits"]), type(model.transformer.h[0].mlp.c_fc).__name__)
        """
    )
    assert "EQUAL True LowRankLinear" in result.stdout, result.stderr[-2000:]


def test_loading_without_hfcompress_fails_loudly(tmp_path):
    compressed("llama", tmp_path)
    result = run_python(
        f"""
        from transformers import AutoModelForCausalLM
        AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})
        print("LOADED")
        """
    )
    assert result.returncode != 0 and "LOADED" not in result.stdout
    assert "hfcompress" in result.stderr  # transformers names the unknown quantization method
    assert "size mismatch" in result.stderr.lower() or "ignore_mismatched_sizes" in result.stderr


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparse_checkpoint_is_small_and_exact(tmp_path, pattern):
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=128,
        tie_word_embeddings=False,
    )
    dense = LlamaForCausalLM(config).eval()
    dense.save_pretrained(tmp_path / "dense")
    stage = {"method": "prune", "targets": r".*(_proj|lm_head)", "pattern": pattern}
    if pattern == "unstructured":
        stage["sparsity"] = 0.5
    compress_model(dense, {"stages": [stage]}, progress=False)
    dense.save_pretrained(tmp_path / "sparse")
    ratio = (tmp_path / "sparse" / "model.safetensors").stat().st_size / (
        tmp_path / "dense" / "model.safetensors"
    ).stat().st_size
    assert ratio <= 0.60, ratio
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sparse")
    for name, module in dense.named_modules():
        if isinstance(module, PrunedLinear):
            twin = reloaded.get_submodule(name)
            assert torch.equal(twin.mask, module.mask) and torch.equal(twin.weight, module.weight)
    with safe_open(str(tmp_path / "sparse" / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.layers.0.mlp.up_proj.weight").get_shape() == [512 * 256 // 2]
        assert f.get_slice("model.layers.0.mlp.up_proj.weight_bitmask").get_shape() == [512, 32]


def test_bf16_load_keeps_bool_masks(tmp_path):
    model, inputs = compressed("opt", tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    pruned = [m for m in reloaded.modules() if isinstance(m, PrunedLinear)]
    assert pruned and all(
        m.mask.dtype == torch.bool and m.weight.dtype == torch.bfloat16 for m in pruned
    )
    reference = model_output(model, inputs)
    assert (
        model_output(reloaded, inputs).float() - reference
    ).abs().max() < 0.05 * reference.abs().max()


def test_resave_of_loaded_model_is_identical(tmp_path):
    compressed("llama", tmp_path / "a")
    AutoModelForCausalLM.from_pretrained(tmp_path / "a").save_pretrained(tmp_path / "b")
    with (
        safe_open(str(tmp_path / "a" / "model.safetensors"), "pt") as a,
        safe_open(str(tmp_path / "b" / "model.safetensors"), "pt") as b,
    ):
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key


def test_decompress_gives_a_plain_model_that_loads_without_hfcompress(tmp_path):
    model, inputs = compressed("gpt2", tmp_path / "c")
    expected = model_output(model, inputs)
    plain = decompress(model)
    assert not any(isinstance(m, CompressedLayer) for m in plain.modules())
    assert type(plain.transformer.h[0].mlp.c_fc).__name__ == "Conv1D"
    assert torch.allclose(model_output(plain, inputs), expected, atol=1e-5)
    plain.save_pretrained(tmp_path / "plain")
    assert "quantization_config" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    torch.save({"inputs": inputs, "logits": expected}, tmp_path / "expected.pt")
    result = run_python(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "plain")!r}).eval()
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            print("CLOSE", torch.allclose(model(**expected["inputs"]).logits, expected["logits"], atol=1e-5))
        """
    )
    assert "CLOSE True" in result.stdout, result.stderr[-2000:]


def _edit_config(path: Path, edit) -> None:
    config = json.loads((path / "config.json").read_text())
    edit(config["quantization_config"])
    (path / "config.json").write_text(json.dumps(config))


def test_spec_naming_a_missing_module_is_an_error(tmp_path):
    compressed("llama", tmp_path)
    _edit_config(
        tmp_path,
        lambda q: q["modules"].update(
            {"model.layers.7.mlp.up_proj": q["modules"]["model.layers.0.mlp.up_proj"]}
        ),
    )
    with pytest.raises(
        CheckpointError,
        match=r"'model\.layers\.7\.mlp\.up_proj', which is not a module of LlamaForCausalLM",
    ):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_wrong_tensor_shape_names_file_and_tensor(tmp_path):
    compressed("llama", tmp_path)
    _edit_config(
        tmp_path, lambda q: q["modules"]["model.layers.0.self_attn.o_proj"].update({"terms": 3})
    )
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.o_proj\.A' has shape \[2, 8, 8\], expected \[3, 8, 8\]",
    ):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_missing_tensor_is_an_error(tmp_path):
    compressed("llama", tmp_path)
    path = tmp_path / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors = {
            k: f.get_tensor(k)
            for k in f.keys()
            if not k.endswith("layers.1.mlp.up_proj.u.weight_bitmask")
        }
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError, match=r"lacks tensor 'model\.layers\.1\.mlp\.up_proj\.u\.weight_bitmask'"
    ):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_truncated_safetensors_names_the_file(tmp_path):
    compressed("llama", tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unreadable safetensors file"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_newer_format_version_is_refused(tmp_path):
    compressed("llama", tmp_path)
    _edit_config(tmp_path, lambda q: q.update({"format_version": 99}))
    with pytest.raises(CheckpointError, match="format_version=99"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_trainer_accepts_in_memory_and_loaded_compressed_models(tmp_path):
    model, inputs = compressed("gpt2", tmp_path / "ckpt")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    data = [{"input_ids": inputs["input_ids"][0], "labels": inputs["input_ids"][0]}] * 4
    for candidate in (model, loaded):
        before = candidate.transformer.h[0].mlp.c_fc.u.weight.detach().clone()
        args = TrainingArguments(
            output_dir=str(tmp_path / "out"),
            max_steps=2,
            per_device_train_batch_size=2,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            learning_rate=1e-2,
        )
        Trainer(model=candidate, args=args, train_dataset=data).train()
        after = candidate.transformer.h[0].mlp.c_fc.u.weight
        assert not torch.equal(before, after)
        pruned = candidate.transformer.h[0].attn.c_attn
        assert torch.all(pruned.weight[~pruned.mask] == 0)


def test_push_to_hub_writes_the_same_checkpoint(tmp_path, monkeypatch):
    """push_to_hub saves through save_pretrained; the hub calls are redirected to a local folder."""
    import shutil
    from types import SimpleNamespace

    import transformers.utils.hub as hub

    model, inputs = compressed("llama", tmp_path / "saved")
    remote = tmp_path / "remote"

    class FakeCard:
        def save(self, path: str) -> None:
            Path(path).write_text("model card")

    monkeypatch.setattr(
        hub,
        "hf_api",
        lambda: SimpleNamespace(create_repo=lambda repo_id, **_: SimpleNamespace(repo_id=repo_id)),
    )
    monkeypatch.setattr(hub, "create_and_tag_model_card", lambda *args, **kwargs: FakeCard())
    monkeypatch.setattr(
        type(model),
        "_upload_modified_files",
        lambda self, folder, repo_id, **_: shutil.copytree(folder, remote),
    )
    model.push_to_hub("someone/compressed-llama")
    with (
        safe_open(str(remote / "model.safetensors"), "pt") as pushed,
        safe_open(str(tmp_path / "saved" / "model.safetensors"), "pt") as saved,
    ):
        assert set(pushed.keys()) == set(saved.keys())
    reloaded = AutoModelForCausalLM.from_pretrained(remote)
    assert torch.equal(model_output(reloaded, inputs), model_output(model, inputs))


def test_load_state_dict_accepts_on_disk_form_and_follows_saved_rank():
    """What Trainer(resume_from_checkpoint=...) relies on: a plain load_state_dict of a checkpoint."""
    from hfcompress.serialization import compact_state_dict

    def build(rank: int):
        model = tiny_model("llama")
        recipe = {
            "stages": [
                {"method": "lowrank", "targets": r".*mlp.*", "rank": rank},
                {"method": "prune", "targets": r".*(mlp|q_proj).*", "sparsity": 0.5},
                {"method": "kronecker", "targets": r".*o_proj", "a_shape": [8, 8]},
            ]
        }
        compress_model(model, recipe, progress=False)
        return model

    saved, fresh = build(rank=8), build(rank=16)
    state = compact_state_dict(saved)
    assert state["model.layers.0.self_attn.q_proj.weight"].ndim == 1  # really the on-disk form
    fresh.load_state_dict(state, strict=True)
    assert fresh.model.layers[0].mlp.up_proj.rank == 8
    inputs = tiny_inputs("llama", saved)
    assert torch.equal(model_output(fresh, inputs), model_output(saved, inputs))


def _every_layer_kind() -> dict[str, CompressedLayer]:
    """One layer of each kind, low-rank with plain and with pruned factors."""
    from torch import nn

    from hfcompress.layers import KroneckerLinear

    torch.manual_seed(0)
    dense = nn.Linear(16, 8)
    factored = LowRankLinear.from_module(nn.Linear(16, 8), rank=4)
    factored.u = PrunedLinear.from_module(factored.u, sparsity=0.5)
    factored.v = PrunedLinear.from_module(factored.v, pattern="2:4")
    return {
        "prune": PrunedLinear.from_module(dense, sparsity=0.5),
        "prune 2:4": PrunedLinear.from_module(dense, pattern="2:4"),
        "lowrank": LowRankLinear.from_module(dense, rank=4),
        "lowrank+prune": factored,
        "kronecker": KroneckerLinear.from_module(dense, a_shape=(2, 4), terms=2),
    }


def test_accepted_spec_fields_are_what_the_layers_write():
    """The loader's field table is exactly what each layer's to_spec writes, and accepts it."""
    from hfcompress.layers import registered_methods
    from hfcompress.serialization import SPEC_FIELDS, check_spec

    assert set(SPEC_FIELDS) == set(registered_methods()) | {"dense"}
    written: dict[str, set[str]] = {}
    for layer in _every_layer_kind().values():
        spec = layer.to_spec()
        check_spec(spec, "test")
        written.setdefault(spec["method"], set()).update(spec)
        for factor in spec.get("factors", {}).values():
            written.setdefault(factor["method"], set()).update(factor)
    assert written == {method: req | opt for method, (req, opt) in SPEC_FIELDS.items()}


def test_bias_edited_out_of_config_is_an_error_not_a_silent_drop(tmp_path):
    """The reported defect: ``bias: false`` loaded without the bias, logging only UNEXPECTED."""
    compressed("gpt2", tmp_path)
    _edit_config(
        tmp_path, lambda q: q["modules"]["transformer.h.0.attn.c_attn"].update({"bias": False})
    )
    with pytest.raises(
        CheckpointError,
        match=r"tensor 'transformer\.h\.0\.attn\.c_attn\.bias' is not accounted for by "
        r"quantization_config\.modules\['transformer\.h\.0\.attn\.c_attn'\].*field 'bias'",
    ):
        AutoModelForCausalLM.from_pretrained(tmp_path)
