"""The ``hfcompress`` command: entry points, argument errors, the class it loads, output checks
(Ctrl-C: test_cli_output.py). Most tests run ``main()`` in this process (fast, and the only way
to inject a failure); a few run the installed entry points as a user does."""

from __future__ import annotations

import json
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import transformers

import cli_helpers
from cli_helpers import run_cli, run_main
from conftest import tiny_model
from hfcompress import cli
from hfcompress.cli import _common

# the shared fixtures
tiny_folder = cli_helpers.tiny_folder
_no_library_bars = cli_helpers._no_library_bars

# --- the entry points, in a new interpreter -----------------------------------------------------


def test_python_m_hfcompress_runs_the_demo():
    result = run_cli("demo")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for needle in ["lowrank+prune", "kronecker", "2:4", "params before", "rel. error"]:
        assert needle in out
    assert out.count("transformer.h.") == 16  # 4 blocks x 4 matrices
    assert "16 modules: 3,154,944 →" in out
    assert "identical logits" in out


def test_console_script_and_python_m_hfcompress_cli():
    script = Path(sys.executable).with_name("hfcompress")
    if not script.is_file():
        pytest.skip(f"no console script beside {sys.executable} (pip install -e . makes it)")
    result = subprocess.run(
        [str(script), "shapes", "3072", "768", "--limit", "400"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "(768, 768)" in result.stdout and "589,828" in result.stdout


@pytest.mark.parametrize("module", ["hfcompress", "hfcompress.cli"])
def test_python_m_runs_main(module, monkeypatch, capsys):
    """``python -m hfcompress`` and ``python -m hfcompress.cli`` (tests/test_real_models_cli.py
    uses it), run in this process."""
    monkeypatch.setattr(sys, "argv", [module, "shapes", "0", "768"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    assert exit_.value.code == 2
    assert "expected a positive integer, got 0" in capsys.readouterr().err


# --- arguments -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["shapes", "0", "768"], "expected a positive integer, got 0"),
        (["shapes", "ten", "768"], "expected a positive integer, got 'ten'"),
        (["nope"], "invalid choice: 'nope'"),
        (["compress", "m", "--recipe", "r"], "--output is required"),
        (["eval", "m", "--speed", "--unknown"], "unrecognized arguments: --unknown"),
        (["eval", "m", "--perplexity", "--text", "t", "--stride", "0"], "positive integer, got 0"),
        (["analyze", "m", "--kronecker-candidates", "-1"], "expected 0 or more"),
        (
            ["plan", "m", "--keep", "1.5", "--targets", ".*", "--calibration-text", "x"],
            "expected a fraction",
        ),
        (["plan", "m", "--keep", "0.5", "--targets", ".*", "--output", "y"], "one of the argu"),
    ],
)
def test_bad_arguments_exit_2_without_traceback(capsys, args, message):
    code, out, err = run_main(capsys, *args)
    assert code == 2 and out == ""
    assert "Traceback" not in err and message in err, err


SUBCOMMANDS = ["demo", "shapes", "compress", "eval", "analyze", "plan", "distill", "convert-gguf"]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_on_every_subcommand(capsys, command):
    code, out, _ = run_main(capsys, command, "--help")
    assert code == 0 and out.startswith(f"usage: hfcompress {command}")


def test_every_subcommand_is_listed_in_the_top_level_help(capsys):
    code, out, _ = run_main(capsys, "--help")
    assert code == 0
    assert all(command in out for command in SUBCOMMANDS)


def test_every_loading_subcommand_takes_the_task_override():
    parser = cli.build_parser()
    for line in (
        "compress m --recipe r --task base",
        "analyze m --task base",
        "plan m --keep 0.5 --targets .* --calibration-text t --output o --task base",
        "distill m --recipe r --train-text t --output o --task base",
        "eval m --task data.csv --model-task base",
        "compress m --recipe r --model-task base",
        "convert-gguf s --output o --task base",
    ):
        argv = line.split()
        args, _ = parser.parse_known_args(argv)
        assert args.model_task == "base", argv
    assert parser.parse_known_args(["eval", "m", "--task", "d.csv"])[0].task == Path("d.csv")


# --- the class the CLI loads ---------------------------------------------------------------------


def _bert_mlm() -> transformers.PreTrainedModel:
    return transformers.BertForMaskedLM(tiny_model("bert").config).eval()


# folder name -> (build the model, the class config.json names, the Python loader users call, a
# module only the head has)
SAVED = {
    "gpt2": (lambda: tiny_model("gpt2"), "GPT2LMHeadModel", "AutoModelForCausalLM", "lm_head"),
    "bert-mlm": (_bert_mlm, "BertForMaskedLM", "BertForMaskedLM", "cls.predictions.transform"),
    "bert-cls": (
        lambda: tiny_model("bert"),
        "BertForSequenceClassification",
        "AutoModelForSequenceClassification",
        "classifier",
    ),
    "llama": (lambda: tiny_model("llama"), "LlamaForCausalLM", "AutoModelForCausalLM", "lm_head"),
    "t5": (
        lambda: tiny_model("t5"),
        "T5ForConditionalGeneration",
        "T5ForConditionalGeneration",
        "lm_head",
    ),
    "opt": (lambda: tiny_model("opt"), "OPTForCausalLM", "AutoModelForCausalLM", "lm_head"),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple[Path, list[str]]]:
    """Each ``SAVED`` model saved to a folder: name -> (folder, named_modules() names in memory)."""
    root = tmp_path_factory.mktemp("saved")
    folders = {}
    for name, (build, *_) in SAVED.items():
        model = build()
        model.save_pretrained(root / name)
        folders[name] = (root / name, [n for n, _ in model.named_modules()])
    return folders


@pytest.mark.parametrize("name", list(SAVED))
def test_cli_loads_the_class_and_module_names_python_loads(saved, name):
    folder, names_in_memory = saved[name]
    _, architecture, python_loader, head = SAVED[name]
    assert json.loads((folder / "config.json").read_text())["architectures"] == [architecture]
    model = cli.load_model(str(folder))
    reference = getattr(transformers, python_loader).from_pretrained(folder)
    assert type(model).__name__ == type(reference).__name__ == architecture
    names = [n for n, _ in model.named_modules()]
    assert names == [n for n, _ in reference.named_modules()] == names_in_memory
    assert head in names


@pytest.mark.parametrize(
    ("name", "auto_class"),
    [
        ("gpt2", "AutoModelForCausalLM"),
        ("bert-mlm", "AutoModelForMaskedLM"),
        ("bert-cls", "AutoModelForSequenceClassification"),
        ("llama", "AutoModelForCausalLM"),
        ("t5", "AutoModelForSeq2SeqLM"),
        ("opt", "AutoModelForCausalLM"),
    ],
)
def test_architecture_missing_from_transformers_falls_back_to_its_task_mapping(
    saved, monkeypatch, name, auto_class
):
    monkeypatch.setattr(_common, "_transformers_class", lambda architecture: None)
    config = transformers.AutoConfig.from_pretrained(saved[name][0])
    assert cli.model_class(config) is getattr(transformers, auto_class)
    assert type(cli.load_model(str(saved[name][0]))).__name__ == SAVED[name][1]


def test_unknown_architecture_asks_for_task_and_none_loads_the_bare_model(saved):
    config = transformers.AutoConfig.from_pretrained(saved["gpt2"][0])
    config.architectures = ["NoSuchModelForCausalLM"]
    with pytest.raises(cli.CliError, match=r"'NoSuchModelForCausalLM'.*pass --task"):
        cli.model_class(config)
    config.architectures = None
    assert cli.model_class(config) is transformers.AutoModel


@pytest.mark.parametrize(
    ("name", "task", "expected"),
    [
        ("gpt2", "base", "GPT2Model"),
        ("gpt2", "seq-cls", "GPT2ForSequenceClassification"),
        ("gpt2", "token-cls", "GPT2ForTokenClassification"),
        ("bert-cls", "masked-lm", "BertForMaskedLM"),
        ("t5", "base", "T5Model"),
        ("llama", "causal-lm", "LlamaForCausalLM"),
    ],
)
def test_task_overrides_the_architecture(saved, name, task, expected):
    assert type(cli.load_model(str(saved[name][0]), task=task)).__name__ == expected


GPT2_MLP_RECIPE = (
    "stages:\n  - method: lowrank\n    targets: '{prefix}h\\.\\d+\\.mlp\\.c_fc'\n    rank: 4\n"
)


def test_compress_gpt2_lm_head_folder_with_a_python_api_recipe(saved, tmp_path, capsys):
    """Regression: the CLI loaded GPT2LMHeadModel as GPT2Model, so ``transformer.h.…`` matched
    nothing and the output claimed ``architectures: ["GPT2Model"]``."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(GPT2_MLP_RECIPE.format(prefix=r"transformer\."))
    out = tmp_path / "out"
    code, _, err = run_main(
        capsys, "compress", saved["gpt2"][0], "--recipe", recipe, "--output", out
    )
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    report = json.loads((out / "compression_report.json").read_text())
    assert [m["name"] for m in report["modules"]] == [
        "transformer.h.0.mlp.c_fc",
        "transformer.h.1.mlp.c_fc",
    ]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(reloaded).__name__ == "GPT2LMHeadModel"
    assert type(reloaded.transformer.h[1].mlp.c_fc).__name__ == "LowRankLinear"


def test_task_flag_changes_the_class_compress_loads(saved, tmp_path, capsys):
    bare, python = tmp_path / "bare.yaml", tmp_path / "python.yaml"
    bare.write_text(GPT2_MLP_RECIPE.format(prefix=""))
    python.write_text(GPT2_MLP_RECIPE.format(prefix=r"transformer\."))
    folder, out = saved["gpt2"][0], tmp_path / "out"
    code, _, err = run_main(
        capsys, "compress", folder, "--task", "base", "--recipe", bare, "--output", out
    )
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["architectures"] == ["GPT2Model"]
    report = json.loads((out / "compression_report.json").read_text())
    assert [m["name"] for m in report["modules"]] == ["h.0.mlp.c_fc", "h.1.mlp.c_fc"]
    # the bare model has no ``transformer.`` prefix, so the Python API's recipe fits nothing
    code, _, err = run_main(
        capsys, "compress", folder, "--task", "base", "--recipe", python, "--dry-run"
    )
    assert code == 2 and "targets" in err and len(err.splitlines()) == 1, err


def test_task_that_does_not_fit_the_model_is_one_line_exit_2(saved, capsys):
    code, out, err = run_main(
        capsys, "analyze", saved["gpt2"][0], "--task", "seq2seq", "--targets", "x"
    )
    assert code == 2 and out == ""
    assert err.startswith("hfcompress analyze: error: MODEL ") and "AutoModelForSeq2SeqLM" in err
    assert len(err.splitlines()) == 1


# --- bad input: one line, exit 2, nothing written ------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["compress", "no/such/dir/model", "--recipe", "r.yaml", "--output", "{out}"],
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
        (["eval", "{model}"], "choose at least one of"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(
    tiny_folder, tmp_path, capsys, args, message
):
    (tmp_path / "bad.yaml").write_text("stages: [ {method: prune,")
    (tmp_path / "unfit.yaml").write_text(
        "stages:\n  - method: lowrank\n    targets: 'nothing'\n    rank: 2\n"
    )
    values = {
        "model": str(tiny_folder),
        "bad_recipe": str(tmp_path / "bad.yaml"),
        "unfit_recipe": str(tmp_path / "unfit.yaml"),
        "out": str(tmp_path / "out"),
        "text": str(tiny_folder / "text.txt"),
    }
    code, _, err = run_main(capsys, *[a.format(**values) for a in args])
    assert code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_debug_shows_the_traceback(tmp_path, capsys):
    with pytest.raises(cli.CliError, match="no such folder"):
        cli.main(["--debug", "compress", "nope/x/y", "--recipe", "r", "--output", str(tmp_path)])


# each output flag's subcommand, as a command line (split on spaces); {out} is the bad path
OUTPUT_COMMANDS = {
    "compress": "compress {model} --recipe {recipe} --output {out}",
    "distill": "distill {model} --recipe {recipe} --train-text t --output {out}",
    "analyze --plots": "analyze {model} --plots {out}",
    "convert-gguf": "convert-gguf {model} --output {out}",
}
FILE_OUTPUT_COMMANDS = {
    "plan": "plan {model} --keep 0.5 --targets .* --calibration-text t --output {out}",
    "analyze --json": "analyze {model} --json {out}",
}


def _bad_output_cases() -> list:
    """(command, the bad output, the message it gets): every output flag against a path that is
    the wrong kind, under a file, or in a place where nothing can be created."""
    cases = []
    for command in OUTPUT_COMMANDS:
        cases += [
            pytest.param(command, "{file}", "is a file, expected a folder", id=f"{command}-file"),
            pytest.param(command, "{file}/sub", "is a file, so nothing", id=f"{command}-under"),
            pytest.param(
                command,
                "/proc/hfcompress-out/x",
                "nothing can be created in '/proc'",
                id=f"{command}-proc",
            ),
        ]
    for command in FILE_OUTPUT_COMMANDS:
        cases += [
            pytest.param(command, "{folder}", "is a folder, expected a file", id=f"{command}-dir"),
            pytest.param(command, "{file}/r.yaml", "is a file, so nothing", id=f"{command}-under"),
            pytest.param(
                command,
                "/proc/hfcompress.yaml",
                "nothing can be created in '/proc'",
                id=f"{command}-proc",
            ),
        ]
    cases += [
        pytest.param("compress", "{folder}", "exists and is not empty", id="compress-nonempty"),
        pytest.param("plan", "{file}", "exists \\(pass --overwrite\\)", id="plan-exists"),
    ]
    return cases


@pytest.mark.parametrize(("command", "output", "message"), _bad_output_cases())
def test_bad_output_is_one_line_exit_2_before_the_model_loads(
    saved, tmp_path, monkeypatch, capsys, command, output, message
):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(_common, "load_model", no_loading)
    monkeypatch.setattr(_common, "load_tokenizer", no_loading)
    (tmp_path / "recipe.yaml").write_text(GPT2_MLP_RECIPE.format(prefix=r"transformer\."))
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "a-folder" / "kept.txt").write_text("kept")
    before = sorted(tmp_path.rglob("*"))
    values = {"file": tmp_path / "a-file", "folder": tmp_path / "a-folder"}
    bad = output.format(**values)
    values |= {"model": saved["gpt2"][0], "recipe": tmp_path / "recipe.yaml", "out": bad}
    args = {**OUTPUT_COMMANDS, **FILE_OUTPUT_COMMANDS}[command]
    code, out, err = run_main(capsys, *[a.format(**values) for a in args.split()])
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"hfcompress {command.split()[0]}: error: --")
    assert repr(bad) in err and re.search(message, err), err
    assert sorted(tmp_path.rglob("*")) == before  # nothing created, nothing removed
    assert not Path("/proc/hfcompress-out").exists()
