"""``hfcompress compress``: the output folder (model, tokenizer, report, card), calibration data,
and ``--dry-run`` (validation and parameter counts, no decompositions)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

import cli_helpers
from cli_helpers import WORDS, run_main, table_value
from conftest import tiny_model
from hfcompress.cli import compress as compress_command
from hfcompress.cli._common import TOKENIZER_FILES
from hfcompress.evaluation import perplexity_of_text

# the shared fixtures
tiny_folder = cli_helpers.tiny_folder
_no_library_bars = cli_helpers._no_library_bars


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory) -> Path:
    """A tiny GPT-2 (Conv1D layers with biases) saved without a tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    tiny_model("gpt2").save_pretrained(folder)
    return folder


def _compress(capsys, folder, recipe, out, *flags) -> str:
    code, _, err = run_main(capsys, "compress", folder, "--recipe", recipe, "--output", out, *flags)
    assert code == 0, err
    return err


# --- the output folder -----------------------------------------------------------------------------


def test_compress_output_works_with_pipeline_and_eval(tiny_folder, tmp_path, capsys):
    """The tokenizer travels with the model: ``pipeline("text-generation", model=folder)`` and
    ``hfcompress eval folder`` work on the output as they do on the input."""
    out = tmp_path / "compressed"
    _compress(capsys, tiny_folder, tiny_folder / "recipe.yaml", out)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert (out / "README.md").read_text().startswith("---\nlibrary_name: hfcompress\n")
    report = json.loads((out / "compression_report.json").read_text())
    assert len(report["modules"]) == 2 * 2 + 2 * 4
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model.model.layers[1].mlp.gate_proj).__name__ == "LowRankLinear"
    original = AutoTokenizer.from_pretrained(tiny_folder)  # the reference: the input's tokenizer
    prompt = "the a of and"
    generator = transformers.pipeline("text-generation", model=str(out), device="cpu")
    got = generator(prompt, max_new_tokens=6, do_sample=False, return_tensors=True)
    ids = original(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=6, do_sample=False)[0].tolist()
    assert got[0]["generated_token_ids"] == expected

    text = tiny_folder / "text.txt"
    code, stdout, err = run_main(
        capsys, "eval", out, "--perplexity", "--text", text, "--max-length", "32", "--stride", "16"
    )
    assert code == 0, err
    reference = perplexity_of_text(model, original, text.read_text(), 32, 16)
    assert table_value(stdout, "perplexity") == f"{reference.perplexity:.3f}"


def test_no_tokenizer_says_which_folder_and_how_to_pass_one(
    gpt2_folder, tiny_folder, tmp_path, capsys
):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "stages:\n  - method: prune\n    targets: '.*attn\\.c_attn'\n    sparsity: 0.5\n"
    )
    out = tmp_path / "out"
    err = _compress(capsys, gpt2_folder, recipe, out)
    assert not any((out / name).exists() for name in TOKENIZER_FILES)
    assert "the output has no tokenizer" in err and repr(str(gpt2_folder.absolute())) in err
    assert "--tokenizer PATH" in err

    text = tiny_folder / "text.txt"
    code, stdout, err = run_main(capsys, "eval", out, "--perplexity", "--text", text)
    assert code == 2 and stdout == "" and len(err.splitlines()) == 1, err
    assert f"no tokenizer found in the folder {str(out.absolute())!r}" in err
    assert "pass --tokenizer PATH" in err
    assert "sentencepiece" not in err.lower() and "tiktoken" not in err.lower()

    code, stdout, err = run_main(
        capsys, "eval", out, "--perplexity", "--text", text, "--tokenizer", tiny_folder
    )
    assert code == 0, err
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    reference = perplexity_of_text(
        model, AutoTokenizer.from_pretrained(tiny_folder), text.read_text()
    )
    assert table_value(stdout, "perplexity") == f"{reference.perplexity:.3f}"

    # --tokenizer on compress: that tokenizer is saved beside the model
    _compress(capsys, gpt2_folder, recipe, tmp_path / "with", "--tokenizer", tiny_folder)
    saved = AutoTokenizer.from_pretrained(tmp_path / "with")
    assert saved.get_vocab() == AutoTokenizer.from_pretrained(tiny_folder).get_vocab()


# --- --dry-run: validation and parameter counts, no decompositions ------------------------------

DRY_RUN_RECIPES = {
    "llama": (
        "stages:\n"
        "  - method: lowrank\n    targets: '.*layers\\.0\\.mlp\\.gate_proj'\n    ratio: 0.3\n"
        "  - method: lowrank\n    targets: '.*mlp\\.up_proj'\n    rank: 8\n"
        "    overrides: {'.*layers\\.1\\..*': {ratio: 0.45}}\n"
        "  - method: lowrank\n    targets: '.*layers\\.1\\.mlp\\.gate_proj'\n    rank: 6\n"
        "  - method: prune\n    targets: '.*layers\\.1\\.mlp\\.gate_proj'\n    sparsity: 0.4\n"
        "  - method: prune\n    targets: '.*q_proj'\n    sparsity: 0.37\n"
        "  - method: prune\n    targets: '.*k_proj'\n    pattern: '2:4'\n"
        "  - method: kronecker\n    targets: '.*down_proj'\n    a_shape: [8, 8]\n    terms: 2\n"
        "    overrides: {'.*layers\\.1\\..*': {terms: 3}}\n"
    ),
    "gpt2": (
        "stages:\n"
        "  - method: lowrank\n    targets: '.*mlp\\.c_fc'\n    ratio: 0.25\n"
        "  - method: prune\n    targets: '.*mlp\\.c_fc'\n    sparsity: 0.5\n"
        "  - method: prune\n    targets: '.*attn\\.c_attn'\n    sparsity: 0.33\n"
        "  - method: kronecker\n    targets: '.*attn\\.c_proj'\n    a_shape: [8, 8]\n"
        "  - method: prune\n    targets: '.*mlp\\.c_proj'\n    pattern: '1:4'\n"
    ),
    "llama-calibrated": (
        "stages:\n"
        "  - method: prune\n    targets: '.*v_proj'\n    sparsity: 0.3\n    criterion: wanda\n"
        "  - method: prune\n    targets: '.*o_proj'\n    sparsity: 0.45\n    criterion: sparsegpt\n"
        "  - method: prune\n    targets: '.*q_proj'\n    pattern: '2:4'\n    criterion: sparsegpt\n"
        "  - method: lowrank\n    targets: '.*up_proj'\n    ratio: 0.4\n    criterion: whitened\n"
    ),
}

ROW = re.compile(r"^│ (\S+)\s*│ (\S+)\s*│ \[(\d+), (\d+)\]\s*│\s*([\d,]+) │\s*([\d,?]+) │(.*)$")


def _rows(stdout: str) -> dict[str, tuple[int, int]]:
    """module -> (params before, params after) of a printed report table."""
    rows = {}
    for line in stdout.splitlines():
        match = ROW.match(line)
        if match:
            rows[match.group(1)] = (
                int(match.group(5).replace(",", "")),
                int(match.group(6).replace(",", "")),
            )
    return rows


def _whole_model(stdout: str) -> tuple[int, int]:
    match = re.search(r"whole model: ([\d,]+) → ([\d,]+)", stdout)
    assert match, stdout
    return int(match.group(1).replace(",", "")), int(match.group(2).replace(",", ""))


@pytest.mark.parametrize("case", list(DRY_RUN_RECIPES))
def test_dry_run_counts_what_compression_makes_without_decomposing(
    case, tiny_folder, gpt2_folder, tmp_path, monkeypatch, capsys
):
    folder = gpt2_folder if case == "gpt2" else tiny_folder
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(DRY_RUN_RECIPES[case])
    data = (
        ["--calibration-text", tiny_folder / "text.txt", "--n-calib", "8", "--seq-len", "32"]
        if case.endswith("calibrated")
        else []
    )
    # the reference: a real compression's report
    _compress(capsys, folder, recipe, tmp_path / "out", *data)
    report = json.loads((tmp_path / "out" / "compression_report.json").read_text())
    expected = {m["name"]: (m["params_before"], m["params_after"]) for m in report["modules"]}

    def no_decomposition(*args, **kwargs):
        raise AssertionError("the dry run decomposed something")

    monkeypatch.setattr(compress_command, "compress_model", no_decomposition)
    for name in ("svd", "svdvals", "cholesky", "eigh", "qr"):
        monkeypatch.setattr(torch.linalg, name, no_decomposition)
    code, stdout, err = run_main(capsys, "compress", folder, "--recipe", recipe, "--dry-run", *data)
    assert code == 0, err
    assert "dry run, nothing changed" in stdout
    assert _rows(stdout) == expected
    assert _whole_model(stdout) == (report["model_params_before"], report["model_params_after"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "recipe.yaml"]


def test_dry_run_estimate_errors_reports_the_errors_compression_gets(tiny_folder, tmp_path, capsys):
    recipe = tiny_folder / "recipe.yaml"
    _compress(capsys, tiny_folder, recipe, tmp_path / "out")
    report = json.loads((tmp_path / "out" / "compression_report.json").read_text())
    code, stdout, err = run_main(
        capsys, "compress", tiny_folder, "--recipe", recipe, "--dry-run", "--estimate-errors"
    )
    assert code == 0, err
    assert "dry run, nothing changed" in stdout
    for module in report["modules"]:
        line = next(line for line in stdout.splitlines() if f"│ {module['name']} " in line)
        assert line.rstrip(" │").endswith(f"{module['rel_error']:.4f}"), line
    code, stdout, _ = run_main(capsys, "compress", tiny_folder, "--recipe", recipe, "--dry-run")
    assert "rel. error" not in stdout and "--estimate-errors" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_energy_ranks_are_unknown_in_a_dry_run(tiny_folder, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - method: lowrank\n    targets: '.*up_proj'\n    energy: 0.9\n")
    code, stdout, err = run_main(capsys, "compress", tiny_folder, "--recipe", recipe, "--dry-run")
    assert code == 0, err
    assert "2 (?) depend on the weights" in stdout and "--estimate-errors" in stdout
    assert stdout.count(" ? │") == 2


# --- calibration data --------------------------------------------------------------------------------


def test_data_aware_recipe_without_data_names_the_flags(tiny_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(compress_command, "compress_model", pytest.fail)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(DRY_RUN_RECIPES["llama-calibrated"])
    for extra in ([], ["--dry-run"]):
        code, stdout, err = run_main(
            capsys, "compress", tiny_folder, "--recipe", recipe, "--output", tmp_path / "o", *extra
        )
        assert code == 2 and stdout == "" and len(err.splitlines()) == 1, err
        assert "criterion 'wanda' needs calibration data" in err
        assert "--calibration-text FILE" in err and "--dataset NAME_OR_PATH" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def _expected_ids(tokenizer, documents: list[str], n: int, seq: int) -> torch.Tensor:
    """The reference: documents tokenized one by one, concatenated, cut into n × seq."""
    ids = [i for doc in documents for i in tokenizer(doc).input_ids]
    return torch.tensor(ids[: n * seq]).view(n, seq)


@pytest.fixture(scope="module")
def documents() -> list[str]:
    rotated = WORDS[5:] + WORDS[:5]
    return [" ".join(rotated[i % 20 :] + rotated[: i % 20][:3]) for i in range(12)]


def _data_sources(tmp: Path, documents: list[str]) -> dict[str, list[str]]:
    """Each way to pass the same documents: name -> flags."""
    (tmp / "docs.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in documents))
    (tmp / "csvs").mkdir()
    (tmp / "csvs" / "part.csv").write_text("body,label\n" + "".join(f"{d},0\n" for d in documents))
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"body": ["of of of"] * 40}),
            "validation": datasets.Dataset.from_dict({"body": documents}),
        }
    ).save_to_disk(str(tmp / "saved"))
    column = ["--dataset-column", "body"]
    return {
        "jsonl": ["--dataset", str(tmp / "docs.jsonl"), *column],
        "csv-folder": ["--dataset", str(tmp / "csvs"), *column],
        "saved-split": [
            "--dataset",
            str(tmp / "saved"),
            "--dataset-split",
            "validation",
            *column,
        ],
    }


@pytest.mark.parametrize("source", ["text", "jsonl", "csv-folder", "saved-split"])
def test_plan_and_compress_read_the_same_calibration_data(
    source, tiny_folder, documents, tmp_path, monkeypatch, capsys
):
    from hfcompress.cli import plan as plan_command

    seen: dict[str, torch.Tensor] = {}

    def capture(name):
        def run(model, *args, calibration=None, **kwargs):
            seen[name] = calibration if calibration is not None else args[0]
            raise KeyboardInterrupt  # stop here; exit 130

        return run

    monkeypatch.setattr(compress_command, "compress_model", capture("compress"))
    monkeypatch.setattr(plan_command, "plan_recipe", capture("plan"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_folder)
    if source == "text":
        (tmp_path / "a.txt").write_text("\n".join(documents[:6]))
        (tmp_path / "b.txt").write_text("\n".join(documents[6:]))
        flags = ["--calibration-text", str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]
        texts = ["\n".join(documents[:6]) + "\n\n" + "\n".join(documents[6:])]
    else:
        flags = _data_sources(tmp_path, documents)[source]
        texts = documents
    flags += ["--n-calib", "3", "--seq-len", "16"]
    recipe = tiny_folder / "recipe.yaml"
    code, _, err = run_main(
        capsys,
        "compress",
        tiny_folder,
        "--recipe",
        recipe,
        "--dry-run",
        "--estimate-errors",
        *flags,
    )
    assert code == 130, err
    code, _, err = run_main(
        capsys,
        "plan",
        tiny_folder,
        "--keep",
        "0.5",
        "--targets",
        ".*mlp.*",
        "--output",
        tmp_path / "p.yaml",
        *flags,
    )
    assert code == 130, err
    expected = _expected_ids(tokenizer, texts, 3, 16)
    assert torch.equal(seen["compress"], expected)
    assert torch.equal(seen["plan"], expected)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--dataset", "{tmp}/docs.jsonl"], "--dataset-column 'text': not a column of"),
        (
            ["--dataset", "{tmp}/saved", "--dataset-split", "test", "--dataset-column", "body"],
            "--dataset-split 'test': '{tmp}/saved' has the splits ['train', 'validation']",
        ),
        (["--dataset", "{tmp}/nothing.xyz"], "no such"),
        (["--calibration-text", "{tmp}/short.txt"], "shorter than one sequence of --seq-len 16"),
        (
            ["--calibration-text", "{tmp}/missing.txt"],
            "--calibration-text '{tmp}/missing.txt': cannot read",
        ),
    ],
)
def test_bad_calibration_data_is_one_line_exit_2(
    flags, message, tiny_folder, documents, tmp_path, capsys
):
    _data_sources(tmp_path, documents)
    (tmp_path / "short.txt").write_text("the a of")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(DRY_RUN_RECIPES["llama-calibrated"])
    args = [f.format(tmp=tmp_path) for f in flags]
    code, stdout, err = run_main(
        capsys, "compress", tiny_folder, "--recipe", recipe, "--dry-run", "--seq-len", "16", *args
    )
    assert code == 2 and stdout == "" and len(err.splitlines()) == 1, err
    assert message.format(tmp=tmp_path) in err, err
