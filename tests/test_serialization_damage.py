"""Damaged checkpoints: every disagreement between config.json and the tensors is a CheckpointError.

Two small checkpoints cover every layer kind: GPT-2 (Conv1D sources, biases) with low-rank
factors pruned at rank 6 (a bitmask row of 6 bits), unstructured and 2:4 pruning and a
two-term Kronecker layer; Llama (no biases) with plain low-rank factors, pruning and Kronecker.
Each test copies one, damages config.json or the safetensors file, and checks that loading fails
before transformers converts anything, with a message naming the module or tensor and the field.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from conftest import model_output, tiny_inputs, tiny_model
from hfcompress import CheckpointError, compress_model
from hfcompress.decompose import pack_bitmask, unpack_bitmask
from hfcompress.layers import CompressedLayer
from hfcompress.serialization import _nm_group_counts, _popcount_bytes

RECIPES = {
    "gpt2": {
        "stages": [
            {"method": "lowrank", "targets": r".*mlp\.c_fc", "rank": 6},
            {"method": "prune", "targets": r".*(attn\.c_attn|mlp\.c_fc)", "sparsity": 0.5},
            {"method": "prune", "targets": r".*mlp\.c_proj", "pattern": "2:4"},
            {"method": "kronecker", "targets": r".*attn\.c_proj", "a_shape": [8, 8], "terms": 2},
        ]
    },
    "llama": {
        "stages": [
            {"method": "lowrank", "targets": r".*mlp\.up_proj", "rank": 8},
            {"method": "prune", "targets": r".*self_attn\.(q|k)_proj", "sparsity": 0.5},
            {"method": "kronecker", "targets": r".*o_proj", "a_shape": [8, 8], "terms": 2},
        ]
    },
}

C_ATTN = "transformer.h.0.attn.c_attn"  # prune, unstructured 0.5, [192, 64], Conv1D
C_FC = "transformer.h.0.mlp.c_fc"  # lowrank rank 6, factors pruned 0.5
MLP_PROJ = "transformer.h.0.mlp.c_proj"  # prune 2:4, [64, 256]
ATTN_PROJ = "transformer.h.0.attn.c_proj"  # kronecker [8, 8] x 2 terms
Q_PROJ = "model.layers.0.self_attn.q_proj"  # prune, unstructured 0.5, no bias
K_PROJ = "model.layers.0.self_attn.k_proj"  # [32, 64]
UP_PROJ = "model.layers.0.mlp.up_proj"  # lowrank rank 8, dense factors
O_PROJ = "model.layers.0.self_attn.o_proj"  # kronecker [8, 8] x 2 terms


esc = re.escape


def spec_of(name: str) -> str:
    """A regex matching how messages name the spec of module ``name``."""
    return esc(f"quantization_config.modules['{name}']")


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Any, Any]]:
    """arch -> (checkpoint folder, in-memory model, inputs), saved once for the module."""
    checkpoints = {}
    for arch, recipe in RECIPES.items():
        model = tiny_model(arch)
        compress_model(model, recipe, progress=False)
        path = tmp_path_factory.mktemp(arch)
        model.save_pretrained(path)
        checkpoints[arch] = (path, model, tiny_inputs(arch, model))
    return checkpoints


def copy_of(saved: dict, arch: str, tmp_path: Path) -> Path:
    target = tmp_path / arch
    shutil.copytree(saved[arch][0], target)
    return target


def edit_modules(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    config = json.loads((path / "config.json").read_text())
    edit(config["quantization_config"]["modules"])
    (path / "config.json").write_text(json.dumps(config))


def edit_tensors(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    file = str(path / "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def setter(module: str, **fields: Any) -> Callable[[dict[str, Any]], None]:
    return lambda modules: modules[module].update(fields)


def factor_setter(module: str, factor: str, **fields: Any) -> Callable[[dict[str, Any]], None]:
    return lambda modules: modules[module]["factors"][factor].update(fields)


def replace(module: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda modules: modules.__setitem__(module, value)


def drop(module: str, field: str) -> Callable[[dict[str, Any]], None]:
    return lambda modules: modules[module].pop(field)


def both(*edits: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def edit(modules: dict[str, Any]) -> None:
        for one in edits:
            one(modules)

    return edit


def test_undamaged_checkpoints_load_with_identical_logits(saved):
    for arch, (path, model, inputs) in saved.items():
        reloaded = AutoModelForCausalLM.from_pretrained(path).eval()
        assert torch.equal(model_output(reloaded, inputs), model_output(model, inputs)), arch
        kinds = {type(m).__name__ for m in reloaded.modules() if isinstance(m, CompressedLayer)}
        assert kinds == {"PrunedLinear", "LowRankLinear", "KroneckerLinear"}, arch


# --- config.json edits that disagree with the tensors (structure) --------------------------------

STRUCTURE = {
    "bias-false-prune": (
        "gpt2",
        setter(C_ATTN, bias=False),
        esc(f"tensor '{C_ATTN}.bias' is not accounted for by ")
        + spec_of(C_ATTN)
        + ".*field 'bias'",
    ),
    "bias-false-kronecker": (
        "gpt2",
        setter(ATTN_PROJ, bias=False),
        esc(f"tensor '{ATTN_PROJ}.bias' is not accounted for") + ".*field 'bias'",
    ),
    "bias-false-lowrank-only": (
        "gpt2",
        setter(C_FC, bias=False),
        spec_of(C_FC) + esc(".factors['u']: field 'bias' = True disagrees"),
    ),
    "bias-false-lowrank-and-factor": (
        "gpt2",
        both(setter(C_FC, bias=False), factor_setter(C_FC, "u", bias=False)),
        esc(f"tensor '{C_FC}.u.bias' is not accounted for") + ".*field 'bias'",
    ),
    "bias-true-prune": (
        "llama",
        setter(Q_PROJ, bias=True),
        esc(f"lacks tensor '{Q_PROJ}.bias'") + ".*field 'bias' is true",
    ),
    "bias-true-lowrank": (
        "llama",
        setter(UP_PROJ, bias=True),
        esc(f"lacks tensor '{UP_PROJ}.u.bias'") + ".*field 'bias' is true",
    ),
    "sparsity": (
        "gpt2",
        setter(C_ATTN, sparsity=0.8),
        esc(f"'{C_ATTN}.weight_bitmask' prunes 6144 of 12288 weights, but ")
        + spec_of(C_ATTN)
        + esc(" field 'sparsity' = 0.8"),
    ),
    "pattern-unstructured-to-2:4": (
        "gpt2",
        setter(C_ATTN, pattern="2:4"),
        esc(f"'{C_ATTN}.weight_bitmask' keeps more than 2 of 4 weights in a group")
        + ".*field 'pattern' = '2:4'",
    ),
    "pattern-2:4-to-1:4": (
        "gpt2",
        setter(MLP_PROJ, pattern="1:4", sparsity=0.75),
        esc(f"'{MLP_PROJ}.weight_bitmask' keeps more than 1 of 4") + ".*field 'pattern'",
    ),
    "pattern-of-factor": (
        "gpt2",
        factor_setter(C_FC, "v", pattern="1:4", sparsity=0.75),
        esc(f"'{C_FC}.v.weight_bitmask' keeps more than 1 of 4")
        + ".*"
        + spec_of(C_FC)
        + esc(".factors['v'] field 'pattern'"),
    ),
    "rank-dense-factors": (
        "llama",
        setter(UP_PROJ, rank=4),
        esc(f"tensor '{UP_PROJ}.v.weight' has shape [8, 64], expected [4, 64]")
        + ".*fields rank, in_features",
    ),
    "rank-pruned-factors": (
        "gpt2",
        setter(C_FC, rank=4),
        spec_of(C_FC) + esc(".factors['u']: field 'in_features' = 6 disagrees") + ".*'rank' = 4",
    ),
    "rank-pruned-factors-consistent": (
        "gpt2",
        both(
            setter(C_FC, rank=4),
            factor_setter(C_FC, "u", in_features=4),
            factor_setter(C_FC, "v", out_features=4),
        ),
        esc(f"tensor '{C_FC}.v.weight_bitmask' has shape [6, 8], expected [4, 8]")
        + ".*fields factors\\['v'\\]\\.in_features",
    ),
    "a_shape": (
        "llama",
        setter(O_PROJ, a_shape=[4, 16]),
        esc(f"tensor '{O_PROJ}.A' has shape [2, 8, 8], expected [2, 4, 16]")
        + ".*fields a_shape, terms",
    ),
    "terms": (
        "llama",
        setter(O_PROJ, terms=1),
        esc(f"tensor '{O_PROJ}.A' has shape [2, 8, 8], expected [1, 8, 8]") + ".*terms",
    ),
    "in_features": (
        "llama",
        setter(Q_PROJ, in_features=32),
        spec_of(Q_PROJ) + esc(": field 'in_features' = 32, but the LlamaForCausalLM module"),
    ),
    "out_features": (
        "llama",
        setter(K_PROJ, out_features=64),
        spec_of(K_PROJ) + esc(": field 'out_features' = 64") + ".*has out_features 32",
    ),
    "source": (
        "gpt2",
        setter(C_ATTN, source="linear"),
        spec_of(C_ATTN) + esc(": field 'source' = 'linear'") + ".*has source 'conv1d'",
    ),
    "method-changed": (
        "llama",
        setter(O_PROJ, method="lowrank"),
        spec_of(O_PROJ) + esc(": unknown field 'a_shape' in a 'lowrank' spec"),
    ),
}


@pytest.mark.parametrize("case", list(STRUCTURE))
def test_spec_disagreeing_with_tensors_names_module_and_field(saved, tmp_path, case):
    arch, edit, message = STRUCTURE[case]
    path = copy_of(saved, arch, tmp_path)
    edit_modules(path, edit)
    with pytest.raises(CheckpointError, match=message):
        AutoModelForCausalLM.from_pretrained(path)


# --- malformed specs and unknown keys -------------------------------------------------------------

MALFORMED = {
    "factor-not-a-dict": (
        setter(C_FC, factors={"u": 5}),
        spec_of(C_FC) + esc(".factors['u']: expected a layer spec mapping, got 5"),
    ),
    "rank-string": (
        setter(C_FC, rank="x"),
        spec_of(C_FC) + esc(": field 'rank': expected a positive integer, got 'x'"),
    ),
    "spec-int": (replace(C_ATTN, 5), spec_of(C_ATTN) + ": expected a layer spec mapping"),
    "spec-list": (
        replace(C_ATTN, ["prune"]),
        spec_of(C_ATTN) + ": expected a layer spec mapping",
    ),
    "spec-null": (replace(C_ATTN, None), spec_of(C_ATTN) + ": expected a layer spec mapping"),
    "method-int": (setter(C_ATTN, method=7), spec_of(C_ATTN) + ": field 'method'"),
    "method-dense": (
        setter(C_ATTN, method="dense"),
        spec_of(C_ATTN) + esc(": field 'method': unknown method 'dense'"),
    ),
    "a_shape-string": (
        setter(ATTN_PROJ, a_shape="8x8"),
        spec_of(ATTN_PROJ) + esc(": field 'a_shape': expected [m1, n1]"),
    ),
    "a_shape-three": (setter(ATTN_PROJ, a_shape=[8, 8, 1]), spec_of(ATTN_PROJ) + ".*'a_shape'"),
    "terms-bool": (setter(ATTN_PROJ, terms=True), spec_of(ATTN_PROJ) + ": field 'terms'"),
    "bias-string": (setter(C_ATTN, bias="yes"), spec_of(C_ATTN) + ": field 'bias'"),
    "in_features-negative": (
        setter(C_ATTN, in_features=-1),
        spec_of(C_ATTN) + ": field 'in_features'",
    ),
    "out_features-float": (
        setter(C_ATTN, out_features=192.0),
        spec_of(C_ATTN) + ": field 'out_features'",
    ),
    "sparsity-too-big": (setter(C_ATTN, sparsity=1.5), spec_of(C_ATTN) + ": field 'sparsity'"),
    "sparsity-string": (setter(C_ATTN, sparsity="half"), spec_of(C_ATTN) + ": field 'sparsity'"),
    "pattern-backwards": (setter(C_ATTN, pattern="3:2"), spec_of(C_ATTN) + ": field 'pattern'"),
    "pattern-int": (setter(C_ATTN, pattern=4), spec_of(C_ATTN) + ": field 'pattern'"),
    "source-unknown": (setter(C_ATTN, source="conv2d"), spec_of(C_ATTN) + ": field 'source'"),
    "factors-unknown-name": (
        setter(C_FC, factors={"w": {"method": "dense", "source": "linear"}}),
        spec_of(C_FC) + ": field 'factors'",
    ),
    "factors-list": (setter(C_FC, factors=[]), spec_of(C_FC) + ": field 'factors'"),
    "factor-source": (
        factor_setter(C_FC, "u", source="conv1d"),
        spec_of(C_FC) + esc(".factors['u']: field 'source'"),
    ),
    "factor-v-bias": (
        factor_setter(C_FC, "v", bias=True),
        spec_of(C_FC) + esc(".factors['v']: field 'bias' is true"),
    ),
    "factor-bad-field": (
        factor_setter(C_FC, "u", sparsity=[0.5]),
        spec_of(C_FC) + esc(".factors['u']: field 'sparsity'"),
    ),
    "missing-rank": (drop(C_FC, "rank"), spec_of(C_FC) + ": missing field 'rank'"),
    "missing-bias": (drop(C_ATTN, "bias"), spec_of(C_ATTN) + ": missing field 'bias'"),
    "missing-a_shape": (drop(ATTN_PROJ, "a_shape"), spec_of(ATTN_PROJ) + ": missing.*'a_shape'"),
    "missing-pattern": (drop(C_ATTN, "pattern"), spec_of(C_ATTN) + ": missing field 'pattern'"),
    "unknown-key": (
        setter(C_ATTN, granularity="row"),
        spec_of(C_ATTN) + esc(": unknown field 'granularity' in a 'prune' spec"),
    ),
    "unknown-key-kronecker": (
        setter(ATTN_PROJ, b_shape=[8, 8]),
        spec_of(ATTN_PROJ) + ": unknown field 'b_shape'",
    ),
    "unknown-key-factor": (
        factor_setter(C_FC, "u", foo=1),
        spec_of(C_FC) + esc(".factors['u']: unknown field 'foo'"),
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_spec_names_module_and_field(saved, tmp_path, case):
    edit, message = MALFORMED[case]
    path = copy_of(saved, "gpt2", tmp_path)
    edit_modules(path, edit)
    with pytest.raises(CheckpointError, match=message):
        AutoModelForCausalLM.from_pretrained(path)


def test_unknown_key_in_a_plain_factor_spec(saved, tmp_path):
    path = copy_of(saved, "llama", tmp_path)
    edit_modules(path, factor_setter(UP_PROJ, "u", rank=3))
    with pytest.raises(
        CheckpointError,
        match=spec_of(UP_PROJ) + esc(".factors['u']: unknown field 'rank' in a 'dense' spec"),
    ):
        AutoModelForCausalLM.from_pretrained(path)


# --- damaged tensors ------------------------------------------------------------------------------


def retype(key: str, dtype: torch.dtype) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda tensors: tensors.__setitem__(key, tensors[key].to(dtype))


def resize_values(key: str, delta: int) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        values = tensors[key]
        tensors[key] = values[:delta] if delta < 0 else torch.cat([values, values[:delta]])

    return edit


def set_byte(
    key: str, row: int, column: int, value: int
) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key] = tensors[key].clone()
        tensors[key][row, column] = value

    return edit


def add(key: str, shape: tuple[int, ...]) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda tensors: tensors.__setitem__(key, torch.zeros(shape))


def set_stray_bit(key: str) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key] = tensors[key].clone()
        tensors[key][0, 0] |= 0x80  # in_features = 6: bits 6 and 7 lie beyond the row

    return edit


FILE = r"model\.safetensors: tensor "
TENSORS = {
    "bitmask-int16": (
        "gpt2",
        retype(f"{C_ATTN}.weight_bitmask", torch.int16),
        FILE + esc(f"'{C_ATTN}.weight_bitmask' has dtype I16, expected U8"),
    ),
    "bitmask-bool": (
        "gpt2",
        retype(f"{C_ATTN}.weight_bitmask", torch.bool),
        FILE + esc(f"'{C_ATTN}.weight_bitmask' has dtype BOOL, expected U8"),
    ),
    "bitmask-stray-bit": (
        "gpt2",
        set_stray_bit(f"{C_FC}.u.weight_bitmask"),
        FILE + esc(f"'{C_FC}.u.weight_bitmask' sets bits beyond in_features=6 (row 0)"),
    ),
    "values-short": (
        "gpt2",
        resize_values(f"{C_ATTN}.weight", -1),
        FILE
        + esc(f"'{C_ATTN}.weight' holds 6143 values, but '{C_ATTN}.weight_bitmask' keeps 6144"),
    ),
    "values-long": (
        "gpt2",
        resize_values(f"{C_ATTN}.weight", 1),
        FILE + esc(f"'{C_ATTN}.weight' holds 6145 values"),
    ),
    "values-int32": (
        "gpt2",
        retype(f"{C_ATTN}.weight", torch.int32),
        FILE + esc(f"'{C_ATTN}.weight' has dtype I32, expected a floating dtype"),
    ),
    "bias-int64": (
        "gpt2",
        retype(f"{C_ATTN}.bias", torch.int64),
        FILE + esc(f"'{C_ATTN}.bias' has dtype I64, expected a floating dtype"),
    ),
    "nm-group-overfull": (
        "gpt2",
        set_byte(f"{MLP_PROJ}.weight_bitmask", 0, 0, 0x0F),  # 4 of 4 kept, popcount unchanged
        FILE
        + esc(f"'{MLP_PROJ}.weight_bitmask' keeps more than 2 of 4 weights in a group (row 0)")
        + ".*field 'pattern' = '2:4'",
    ),
    "lowrank-factor-int32": (
        "llama",
        retype(f"{UP_PROJ}.u.weight", torch.int32),
        FILE + esc(f"'{UP_PROJ}.u.weight' has dtype I32, expected a floating dtype"),
    ),
    "kronecker-factor-int32": (
        "llama",
        retype(f"{O_PROJ}.A", torch.int32),
        FILE + esc(f"'{O_PROJ}.A' has dtype I32, expected a floating dtype"),
    ),
    "pruned-factor-values-int32": (
        "gpt2",
        retype(f"{C_FC}.v.weight", torch.int32),
        FILE + esc(f"'{C_FC}.v.weight' has dtype I32"),
    ),
    "extra-tensor": (
        "gpt2",
        add(f"{C_ATTN}.scale", (192,)),
        FILE + esc(f"'{C_ATTN}.scale' is not accounted for by ") + spec_of(C_ATTN),
    ),
    "extra-factor-bias": (
        "gpt2",
        add(f"{C_FC}.v.bias", (6,)),
        FILE + esc(f"'{C_FC}.v.bias' is not accounted for by ") + spec_of(C_FC),
    ),
    "extra-bias-llama": (
        "llama",
        add(f"{O_PROJ}.bias", (64,)),
        FILE + esc(f"'{O_PROJ}.bias' is not accounted for") + ".*field 'bias'",
    ),
}


@pytest.mark.parametrize("case", list(TENSORS))
def test_damaged_tensor_names_tensor_and_file(saved, tmp_path, case):
    arch, edit, message = TENSORS[case]
    path = copy_of(saved, arch, tmp_path)
    edit_tensors(path, edit)
    with pytest.raises(CheckpointError, match=message):
        AutoModelForCausalLM.from_pretrained(path)


# --- the popcount helpers -------------------------------------------------------------------------


def test_popcount_bytes_counts_every_byte():
    every = torch.arange(256, dtype=torch.uint8)
    assert _popcount_bytes(every).tolist() == [bin(i).count("1") for i in range(256)]


@pytest.mark.parametrize(("in_features", "m"), [(12, 2), (12, 4), (24, 8), (32, 16), (18, 3)])
def test_nm_group_counts_match_the_unpacked_mask(in_features, m):
    mask = torch.rand(5, in_features) > 0.4
    counts = _nm_group_counts(pack_bitmask(mask), in_features, m)
    assert torch.equal(counts.int(), mask.view(5, -1, m).sum(-1).int())
    assert torch.equal(unpack_bitmask(pack_bitmask(mask), in_features), mask)


# --- integrity digests: byte-level damage that keeps every header and count right ---------------


def tensor_span(file: Path, key: str) -> tuple[int, int]:
    """The absolute byte range [start, end) of tensor ``key``'s data in a safetensors file."""
    raw = file.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    start, end = json.loads(raw[8 : 8 + length])[key]["data_offsets"]
    return 8 + length + start, 8 + length + end


def patch_bytes(file: Path, offset: int, data: bytes) -> None:
    """Overwrite bytes of ``file`` in place (header, metadata and length stay as they were)."""
    raw = bytearray(file.read_bytes())
    raw[offset : offset + len(data)] = data
    file.write_bytes(bytes(raw))


def flip_value_byte(file: Path, key: str) -> None:
    start, _ = tensor_span(file, key)
    patch_bytes(file, start + 1, bytes([file.read_bytes()[start + 1] ^ 0x01]))


def move_mask_bit(file: Path, key: str) -> None:
    """Move one set bit of a bitmask to an unset position in the same byte: popcount kept."""
    start, end = tensor_span(file, key)
    raw = file.read_bytes()
    offset = next(i for i in range(start, end) if raw[i] not in (0x00, 0xFF))
    byte = raw[offset]
    kept = next(bit for bit in range(8) if byte >> bit & 1)
    free = next(bit for bit in range(8) if not byte >> bit & 1)
    moved = (byte & ~(1 << kept)) | (1 << free)
    assert bin(moved).count("1") == bin(byte).count("1")
    patch_bytes(file, offset, bytes([moved]))


DIGEST_DAMAGE = {
    "values-byte-flipped": (flip_value_byte, f"{C_ATTN}.weight"),
    "bitmask-bit-moved": (move_mask_bit, f"{C_ATTN}.weight_bitmask"),
    "factor-bitmask-bit-moved": (move_mask_bit, f"{C_FC}.v.weight_bitmask"),
    "kronecker-byte-flipped": (flip_value_byte, f"{ATTN_PROJ}.A"),
}


def test_saved_checkpoints_record_a_digest_of_every_tensor(saved):
    from safetensors import safe_open

    for arch, (path, _, _) in saved.items():
        with safe_open(str(path / "model.safetensors"), "pt") as handle:
            digests = json.loads(handle.metadata()["hfcompress_digests"])
            # every tensor written has one (tied weights, dropped at save, have one too)
            assert set(handle.keys()) <= set(digests), arch


@pytest.mark.parametrize("case", list(DIGEST_DAMAGE))
def test_damage_keeping_headers_and_counts_is_caught_by_the_digest(saved, tmp_path, case):
    damage, key = DIGEST_DAMAGE[case]
    path = copy_of(saved, "gpt2", tmp_path)
    damage(path / "model.safetensors", key)
    with pytest.raises(CheckpointError, match=FILE + esc(f"'{key}' does not match the digest")):
        AutoModelForCausalLM.from_pretrained(path)


def test_digest_check_can_be_switched_off(saved, tmp_path, monkeypatch):
    path = copy_of(saved, "gpt2", tmp_path)
    move_mask_bit(path / "model.safetensors", f"{C_ATTN}.weight_bitmask")
    monkeypatch.setenv("HFCOMPRESS_VERIFY_DIGESTS", "0")
    AutoModelForCausalLM.from_pretrained(path)


def test_checkpoint_without_digests_still_loads(saved, tmp_path):
    for arch, (_, model, inputs) in saved.items():
        path = copy_of(saved, arch, tmp_path)
        edit_tensors(path, lambda tensors: None)  # rewrites the file with {"format": "pt"} only
        reloaded = AutoModelForCausalLM.from_pretrained(path).eval()
        assert torch.equal(model_output(reloaded, inputs), model_output(model, inputs)), arch


# --- damaged files: truncation, header length, pickles ------------------------------------------


def truncate_data(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:-64])  # header intact, last tensor short


def header_length(new: Callable[[int], int]) -> Callable[[Path], None]:
    """Rewrite the first 8 bytes (the header length) as ``new(length)``."""

    def damage(file: Path) -> None:
        length = int.from_bytes(file.read_bytes()[:8], "little")
        patch_bytes(file, 0, new(length).to_bytes(8, "little"))

    return damage


def garble_header(file: Path) -> None:
    patch_bytes(file, 8, b"\xff")  # the JSON header's opening brace


FILE_DAMAGE = {
    "truncated-data": truncate_data,
    "header-length-huge": header_length(lambda n: 2**40),
    "header-length-zero": header_length(lambda n: 0),
    "header-length-short": header_length(lambda n: n - 8),
    "header-length-long": header_length(lambda n: n + 8),
    "header-not-json": garble_header,
}


@pytest.mark.parametrize("case", list(FILE_DAMAGE))
def test_damaged_safetensors_file_is_named(saved, tmp_path, case):
    path = copy_of(saved, "llama", tmp_path)
    FILE_DAMAGE[case](path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unreadable safetensors file"):
        AutoModelForCausalLM.from_pretrained(path)


class _Payload:
    """Unpickling this creates ``marker``: proof that a pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        import builtins

        return builtins.open, (str(self.marker), "w")


PICKLES = {  # case -> (from_pretrained kwargs, remove model.safetensors, loads from safetensors)
    "beside-safetensors": ({}, False, True),
    "instead-of-safetensors": ({}, True, False),
    "beside-safetensors-use_safetensors-false": ({"use_safetensors": False}, False, False),
}


@pytest.mark.parametrize("case", list(PICKLES))
def test_pickle_in_checkpoint_folder_is_never_unpickled(saved, tmp_path, case):
    import pickle

    kwargs, remove_safetensors, loads = PICKLES[case]
    path = copy_of(saved, "llama", tmp_path)
    marker = tmp_path / "PICKLE_RAN"
    (path / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    if remove_safetensors:
        (path / "model.safetensors").unlink()
    if loads:
        reloaded = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
        _, model, inputs = saved["llama"]
        assert torch.equal(model_output(reloaded, inputs), model_output(model, inputs))
    else:
        with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: .*safetensors only"):
            AutoModelForCausalLM.from_pretrained(path, **kwargs)
    assert not marker.exists(), "the pickle was executed"
