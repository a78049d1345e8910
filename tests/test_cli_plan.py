"""``hfcompress plan``: the recipe it writes, the ``compress`` command it prints (run as printed),
and the progress shown for each pass of plan, compress and analyze."""

from __future__ import annotations

import json
import shlex

import pytest
import yaml
from transformers import AutoModelForCausalLM

import cli_helpers
from cli_helpers import run_main
from hfcompress import LowRankLinear, PrunedLinear
from hfcompress.matching import fullmatch

# the shared fixtures
tiny_folder = cli_helpers.tiny_folder
_no_library_bars = cli_helpers._no_library_bars


def _planned(stage: dict, name: str) -> dict:
    """The stage's settings for ``name``: its first matching override, else the stage's own."""
    for pattern, settings in stage.get("overrides", {}).items():
        if fullmatch(pattern, name, "overrides"):
            keys = {"rank", "ratio", "energy"} & set(settings)
            base = {k: v for k, v in stage.items() if not (keys and k in ("rank", "ratio"))}
            return {**base, **settings}
    return stage


def _printed_command(stdout: str) -> list[str]:
    lines = [line for line in stdout.splitlines() if line.startswith("hfcompress compress ")]
    assert len(lines) == 1, stdout
    return shlex.split(lines[0])


@pytest.mark.parametrize(
    ("flags", "method", "criterion"),
    [
        ((), "lowrank", "fisher_whitened"),
        (("--weighting", "output"), "lowrank", "whitened"),
        (("--method", "prune"), "prune", "sparsegpt"),
        (("--method", "prune", "--allocation", "owl"), "prune", "wanda"),
        (("--dataset", "{docs}", "--dataset-column", "body"), "lowrank", "fisher_whitened"),
    ],
    ids=["lowrank", "lowrank-output", "prune-saliency", "prune-owl", "dataset"],
)
def test_plan_prints_a_compress_command_that_runs_as_printed(
    tiny_folder, tmp_path, capsys, flags, method, criterion
):
    docs = tmp_path / "docs.jsonl"
    text = (tiny_folder / "text.txt").read_text().split()
    docs.write_text(
        "".join(json.dumps({"body": " ".join(text[i : i + 40])}) + "\n" for i in range(0, 600, 40))
    )
    values = {"docs": str(docs)}
    flags = tuple(f.format(**values) for f in flags)
    source = () if "--dataset" in flags else ("--calibration-text", tiny_folder / "text.txt")
    recipe = tmp_path / "plan.yaml"
    code, stdout, err = run_main(
        capsys,
        "plan",
        tiny_folder,
        "--keep",
        "0.5",
        "--targets",
        r".*mlp\.\w+_proj",
        *source,
        "--n-calib",
        "8",
        "--seq-len",
        "32",
        "--output",
        recipe,
        *flags,
    )
    assert code == 0, err
    (stage,) = yaml.safe_load(recipe.read_text())["stages"]
    assert stage["method"] == method and stage["criterion"] == criterion

    argv = _printed_command(stdout)
    assert argv[0] == "hfcompress"
    assert ("--dataset" in argv) == ("--dataset" in flags)  # the plan's calibration flags
    code, _, err = run_main(capsys, *argv[1:])
    assert code == 0, err
    out = tmp_path / "plan-compressed"
    assert argv[argv.index("--output") + 1] == str(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    names = [f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up", "down")]
    for name in names:
        layer, settings = model.get_submodule(name), _planned(stage, name)
        if method == "lowrank":
            assert isinstance(layer, LowRankLinear) and layer.rank == settings["rank"], name
        else:  # sparsegpt and wanda prune round(sparsity·in) weights in every row
            assert isinstance(layer, PrunedLinear), name
            per_row = layer.in_features - round(settings["sparsity"] * layer.in_features)
            assert layer.mask.sum(1).tolist() == [per_row] * layer.out_features, name


def test_each_pass_shows_progress(tiny_folder, tmp_path, capsys):
    """Statistics, gradients, allocation (plan); gradients and blocks (compress with data);
    decompositions (compress); modules (analyze)."""
    data = ["--calibration-text", tiny_folder / "text.txt", "--n-calib", "8", "--seq-len", "32"]
    recipe = tmp_path / "plan.yaml"
    code, _, err = run_main(
        capsys,
        "plan",
        tiny_folder,
        "--keep",
        "0.5",
        "--targets",
        ".*mlp.*",
        "--output",
        recipe,
        *data,
    )
    assert code == 0, err
    for needle in (
        "hfcompress: measuring",
        "hfcompress: gradients: 100%",
        "8/8",
        "hfcompress: allocating ranks",
    ):
        assert needle in err, err
    assert err.index("hfcompress: measuring") < err.index("hfcompress: gradients")
    assert err.index("hfcompress: gradients") < err.index("hfcompress: allocating")

    code, _, err = run_main(
        capsys, "compress", tiny_folder, "--recipe", recipe, "--output", tmp_path / "o", *data
    )
    assert code == 0, err
    assert "hfcompress: gradients: 100%" in err and "hfcompress: calibrating: 100%" in err
    assert err.index("hfcompress: gradients") < err.index("hfcompress: calibrating")

    code, _, err = run_main(
        capsys,
        "compress",
        tiny_folder,
        "--recipe",
        tiny_folder / "recipe.yaml",
        "--dry-run",
        "--estimate-errors",
    )
    assert code == 0 and "hfcompress: decomposing: 100%" in err and "12/12" in err, err

    code, _, err = run_main(capsys, "analyze", tiny_folder, "--targets", r".*layers\.0\..*")
    assert code == 0 and "hfcompress: analyzing: 100%" in err and "7/7" in err, err
