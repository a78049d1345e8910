"""The ``hfcompress`` entry point, run as a user runs it: in a subprocess."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import tiny_model, word_tokenizer


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hfcompress.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_demo_prints_summary_table_and_round_trips():
    result = run_cli("demo")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for needle in ["lowrank+prune", "kronecker", "2:4", "params before", "rel. error"]:
        assert needle in out
    assert out.count("transformer.h.") == 16  # 4 blocks x 4 matrices
    assert "16 modules: 3,154,944 →" in out
    assert "identical logits" in out


def test_shapes_table_matches_kronecker_shapes():
    result = run_cli("shapes", "3072", "768", "--limit", "400")
    assert result.returncode == 0, result.stderr
    assert "(768, 768)" in result.stdout and "589,828" in result.stdout


@pytest.mark.parametrize("args", [["shapes", "0", "768"], ["shapes", "ten", "768"], ["nope"]])
def test_bad_arguments_exit_2_without_traceback(args):
    result = run_cli(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "error" in result.stderr


@pytest.mark.parametrize("command", ["demo", "shapes"])
def test_help_on_every_subcommand(command):
    result = run_cli(command, "--help")
    assert result.returncode == 0 and "usage: hfcompress" in result.stdout


# --- compress / eval / distill on tiny config-built models saved to tmp folders -------------------

WORDS = "the a of and to in is you that it he was for on are as with his they at"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny Llama with a word-level tokenizer, saved like a hub checkpoint."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    words = WORDS.split()
    word_tokenizer(words).save_pretrained(folder)
    tiny_model("llama").save_pretrained(folder)
    (folder / "text.txt").write_text(" ".join(words * 30))
    (folder / "recipe.yaml").write_text(
        "stages:\n"
        "  - method: lowrank\n    targets: '.*mlp\\.(gate|up)_proj'\n    rank: 8\n"
        "  - method: prune\n    targets: '.*self_attn\\..*'\n    pattern: '2:4'\n"
    )
    return folder


def test_compress_writes_a_loadable_checkpoint(tiny_folder, tmp_path):
    out = tmp_path / "compressed"
    result = run_cli(
        "compress",
        str(tiny_folder),
        "--recipe",
        str(tiny_folder / "recipe.yaml"),
        "--output",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    assert "model.layers.0.mlp.up_proj" in result.stdout and "lowrank" in result.stdout
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    report = __import__("json").loads((out / "compression_report.json").read_text())
    assert len(report["modules"]) == 2 * 2 + 2 * 4
    from transformers import AutoModelForCausalLM

    import hfcompress  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model.model.layers[1].mlp.gate_proj).__name__ == "LowRankLinear"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert not leftovers


def test_compress_dry_run_saves_nothing(tiny_folder, tmp_path):
    result = run_cli(
        "compress", str(tiny_folder), "--recipe", str(tiny_folder / "recipe.yaml"), "--dry-run"
    )
    assert result.returncode == 0 and "dry run" in result.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["compress", "no/such/dir/model", "--recipe", "r.yaml", "--output", "o"],
            "MODEL 'no/such/dir/model': no such folder",
        ),
        (
            ["compress", "{model}", "--recipe", "{bad_recipe}", "--output", "{out}"],
            "bad.yaml: not valid yaml",
        ),
        (
            ["compress", "{model}", "--recipe", "{unfit_recipe}", "--output", "{out}"],
            r"stages\[0\]\(lowrank\).targets",
        ),
        (["eval", "{model}", "--perplexity"], "--perplexity: needs --text FILE"),
        (["eval", "{model}", "--task", "{csv}", "--text-column", "body"], "text_column='body'"),
        (["eval", "{model}"], "choose at least one of"),
        (
            ["eval", "{model}", "--perplexity", "--text", "{text}", "--stride", "0"],
            "expected a positive integer",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(tiny_folder, tmp_path, args, message):
    import re

    (tmp_path / "bad.yaml").write_text("stages: [ {method: prune,")
    (tmp_path / "unfit.yaml").write_text(
        "stages:\n  - method: lowrank\n    targets: 'nothing'\n    rank: 2\n"
    )
    (tmp_path / "data.csv").write_text("text,label\nthe a,0\nof and,1\n")
    values = {
        "model": str(tiny_folder),
        "bad_recipe": str(tmp_path / "bad.yaml"),
        "unfit_recipe": str(tmp_path / "unfit.yaml"),
        "out": str(tmp_path / "out"),
        "csv": str(tmp_path / "data.csv"),
        "text": str(tiny_folder / "text.txt"),
    }
    result = run_cli(*[a.format(**values) for a in args])
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert re.search(message, result.stderr), result.stderr
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_debug_shows_the_traceback(tiny_folder, tmp_path):
    result = run_cli(
        "--debug", "compress", "nope/x/y", "--recipe", "r.yaml", "--output", str(tmp_path / "o")
    )
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_eval_perplexity_task_and_speed(tiny_folder, tmp_path):
    (tmp_path / "data.csv").write_text("text,label\nthe a of,0\nand to in,1\nis you that,0\n")
    result = run_cli(
        "eval",
        str(tiny_folder),
        "--perplexity",
        "--text",
        str(tiny_folder / "text.txt"),
        "--max-length",
        "32",
        "--stride",
        "16",
        "--speed",
        "--repeats",
        "2",
        "--seq-len",
        "16",
    )
    assert result.returncode == 0, result.stderr
    for needle in (
        "perplexity",
        "tokens scored / windows",
        "latency median",
        "throughput",
        "parameters (non-zero)",
    ):
        assert needle in result.stdout


def test_distill_trains_and_saves_the_student(tiny_folder, tmp_path):
    out = tmp_path / "distilled"
    result = run_cli(
        "distill",
        str(tiny_folder),
        "--recipe",
        str(tiny_folder / "recipe.yaml"),
        "--train-text",
        str(tiny_folder / "text.txt"),
        "--output",
        str(out),
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
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "student" / "model.safetensors").is_file()
    config = __import__("json").loads((out / "student" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "hfcompress"


def test_analyze_prints_table_and_writes_plots(tiny_folder, tmp_path):
    pytest.importorskip("matplotlib")
    plots = tmp_path / "plots"
    result = run_cli(
        "analyze",
        str(tiny_folder),
        "--targets",
        r".*layers\.0\..*",
        "--kronecker-candidates",
        "2",
        "--plots",
        str(plots),
        "--json",
        str(tmp_path / "a.json"),
    )
    assert result.returncode == 0, result.stderr
    assert "model.layers.0.mlp.up_proj" in result.stdout and "stable" in result.stdout
    for name in ("spectra.png", "energy.png"):
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = __import__("json").loads((tmp_path / "a.json").read_text())
    assert len(rows["modules"] if "modules" in rows else rows["rows"]) == 7


def test_analyze_bad_targets_exit_2(tiny_folder, tmp_path):
    result = run_cli(
        "analyze", str(tiny_folder), "--targets", "nothing", "--plots", str(tmp_path / "p")
    )
    assert (
        result.returncode == 2 and "Traceback" not in result.stderr and "targets" in result.stderr
    )
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("command", ["compress", "eval", "distill", "analyze"])
def test_help_on_new_subcommands(command):
    result = run_cli(command, "--help")
    assert result.returncode == 0 and "usage: hfcompress" in result.stdout


@pytest.mark.parametrize(
    ("flags", "method", "criterion"),
    [
        ((), "lowrank", "fisher_whitened"),
        (("--method", "prune"), "prune", "sparsegpt"),
        (("--method", "prune", "--allocation", "owl"), "prune", "wanda"),
    ],
)
def test_plan_writes_a_recipe_that_compress_accepts(
    tiny_folder, tmp_path, flags, method, criterion
):
    recipe = tmp_path / "plan.yaml"
    result = run_cli(
        "plan",
        str(tiny_folder),
        "--keep",
        "0.5",
        "--targets",
        r".*mlp\.\w+_proj",
        "--calibration-text",
        str(tiny_folder / "text.txt"),
        "--n-calib",
        "4",
        "--seq-len",
        "16",
        "--output",
        str(recipe),
        *flags,
    )
    assert result.returncode == 0, result.stderr
    import yaml

    stage = yaml.safe_load(recipe.read_text())["stages"][0]
    assert stage["method"] == method and stage["criterion"] == criterion
    bad = run_cli(
        "plan",
        str(tiny_folder),
        "--keep",
        "1.5",
        "--targets",
        ".*",
        "--calibration-text",
        "x",
        "--output",
        "y",
    )
    assert bad.returncode == 2 and "fraction" in bad.stderr
