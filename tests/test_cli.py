"""The ``hfcompress`` entry point: run as a user runs it (in a subprocess), and ``main()`` in-process
where a test patches a step (faster, and the only way to inject a failure)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import transformers

from conftest import tiny_model, word_tokenizer
from hfcompress import cli


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


# --- in-process main(): the class the CLI loads, output paths, Ctrl-C ---------------------------


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``main(args)`` in this process: (exit code, stdout, stderr)."""
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(autouse=True)
def _no_progress_bars():
    """transformers' loading bars go to stderr, where these tests count lines."""
    transformers.utils.logging.disable_progress_bar()
    yield
    transformers.utils.logging.enable_progress_bar()


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
    monkeypatch.setattr(cli, "_transformers_class", lambda architecture: None)
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


def test_every_loading_subcommand_takes_the_task_override():
    parser = cli.build_parser()
    for line in (
        "compress m --recipe r --task base",
        "analyze m --task base",
        "plan m --keep 0.5 --targets .* --calibration-text t --output o --task base",
        "distill m --recipe r --train-text t --output o --task base",
        "eval m --task data.csv --model-task base",
        "compress m --recipe r --model-task base",
    ):
        argv = line.split()
        args, _ = parser.parse_known_args(argv)
        assert args.model_task == "base", argv
    assert parser.parse_known_args(["eval", "m", "--task", "d.csv"])[0].task == Path("d.csv")


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


# each output flag's subcommand, as a command line (split on spaces); {out} is the bad path
OUTPUT_COMMANDS = {
    "compress": "compress {model} --recipe {recipe} --output {out}",
    "distill": "distill {model} --recipe {recipe} --train-text t --output {out}",
    "analyze --plots": "analyze {model} --plots {out}",
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
    import re

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(cli, "load_model", no_loading)
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


def test_ctrl_c_during_compression_exits_130_and_writes_nothing(
    tiny_folder, tmp_path, monkeypatch, capsys
):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "compress_model", interrupted)
    out = tmp_path / "out"
    code, _, err = run_main(
        capsys, "compress", tiny_folder, "--recipe", tiny_folder / "recipe.yaml", "--output", out
    )
    assert code == 130
    assert err == "hfcompress: interrupted\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
def test_ctrl_c_while_saving_leaves_nothing_behind(
    tiny_folder, tmp_path, monkeypatch, capsys, existing
):
    """The interrupt lands after the weights are written (the tokenizer comes next): the partial
    folder, the parent folders made for it, and nothing else go; an old output stays as it was."""
    saved_files: list[str] = []

    def interrupted(ref):
        saved_files.extend(p.name for p in tmp_path.rglob("*.safetensors"))
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "load_tokenizer", interrupted)
    out = tmp_path / "a" / "b" / "out" if not existing else tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "old.txt").write_text("old")
    flags = ["--overwrite"] if existing else []
    code, _, err = run_main(
        capsys,
        "compress",
        tiny_folder,
        "--recipe",
        tiny_folder / "recipe.yaml",
        "--output",
        out,
        *flags,
    )
    assert code == 130 and "Traceback" not in err
    assert err.splitlines()[-1] == "hfcompress: interrupted"  # after compression's progress bar
    assert saved_files == ["model.safetensors"]  # the write was under way
    if existing:
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
        assert [p.name for p in out.iterdir()] == ["old.txt"]
    else:
        assert list(tmp_path.iterdir()) == []


def test_interrupted_swap_puts_the_old_output_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    replace = os.replace

    def interrupt_second_replace(src, dst):
        if Path(src).name.startswith(".out.partial-"):
            raise KeyboardInterrupt
        replace(src, dst)

    monkeypatch.setattr(os, "replace", interrupt_second_replace)
    with pytest.raises(KeyboardInterrupt), cli.atomic_output(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in out.iterdir()] == ["old.txt"]


def test_ctrl_c_during_the_swap_waits_until_the_new_output_is_in_place(tmp_path, monkeypatch):
    """A real SIGINT in the middle of the folder swap is held back until the swap is done."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    replace = os.replace

    def sigint_then_replace(src, dst):
        signal.raise_signal(signal.SIGINT)
        replace(src, dst)

    monkeypatch.setattr(os, "replace", sigint_then_replace)
    with pytest.raises(KeyboardInterrupt), cli.atomic_output(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_interrupted_file_write_leaves_nothing(tmp_path, monkeypatch):
    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cli.write_text_atomic(tmp_path / "new" / "recipe.yaml", "stages: []\n")
    assert list(tmp_path.iterdir()) == []
