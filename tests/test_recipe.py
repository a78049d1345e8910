"""The recipe schema: parsing from dict/JSON/YAML, and errors that name the field."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import hfcompress
from hfcompress.methods.kronecker.config import KroneckerStage
from hfcompress.methods.lowrank.config import LowRankStage
from hfcompress.methods.prune.config import PruneStage
from hfcompress.recipe import Recipe, RecipeError

EXAMPLE = {
    "stages": [
        {
            "method": "lowrank",
            "targets": r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj",
            "ratio": 0.5,
            "overrides": {r"model\.layers\.[0-3]\..*": {"ratio": 0.75}},
        },
        {"method": "prune", "targets": r"model\.layers\.\d+\.mlp\..*", "sparsity": 0.5},
        {"method": "kronecker", "targets": r".*o_proj", "a_shape": [288, 288], "terms": 2},
    ],
    "exclude": "lm_head",
}


def test_parses_the_issue_example():
    recipe = Recipe.load(EXAMPLE)
    assert [type(s) for s in recipe.stages] == [LowRankStage, PruneStage, KroneckerStage]
    assert recipe.stages[2].a_shape == (288, 288)
    assert recipe.stages[1].pattern == "unstructured"


def test_json_and_yaml_files_round_trip(tmp_path):
    recipe = Recipe.load(EXAMPLE)
    (tmp_path / "r.json").write_text(json.dumps(EXAMPLE))
    (tmp_path / "r.yaml").write_text(recipe.to_yaml())
    assert Recipe.load(tmp_path / "r.json") == recipe
    assert Recipe.load(str(tmp_path / "r.yaml")) == recipe
    assert Recipe.load(recipe) is recipe


def test_overrides_first_match_wins_and_replace_rank_selection():
    stage = Recipe.load(
        {
            "stages": [
                {
                    "method": "lowrank",
                    "targets": ".*",
                    "ratio": 0.5,
                    "overrides": {r"a\.0\..*": {"rank": 4}, r"a\..*": {"energy": 0.9}},
                }
            ]
        }
    ).stages[0]
    assert stage.settings_for("a.0.x").layer_params() == {"rank": 4}
    assert stage.settings_for("a.1.x").layer_params() == {"energy": 0.9}
    assert stage.settings_for("b.0.x").layer_params() == {"ratio": 0.5}


def test_nm_pattern_implies_sparsity():
    stage = Recipe.load(
        {"stages": [{"method": "prune", "targets": ".*", "pattern": "2:4"}]}
    ).stages[0]
    assert stage.layer_params() == {"sparsity": None, "pattern": "2:4"}


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        (
            {"stages": [{"method": "quantize", "targets": ".*"}]},
            r"stages\[0\]: unknown method 'quantize'; allowed: \['prune', 'lowrank', 'kronecker', ",
        ),
        ({"stages": [{"targets": ".*"}]}, r"stages\[0\]: missing 'method'"),
        (
            {"stages": [{"method": "prune", "targets": ".*", "sparsity": 0.5, "spars": 1}]},
            r"stages\[0\]\(prune\)\.spars: unknown field; allowed: \[",
        ),
        (
            {"stages": [{"method": "prune", "targets": ".*", "sparsity": 1.0}]},
            r"stages\[0\]\(prune\)\.sparsity: Input should be less than 1",
        ),
        (
            {"stages": [{"method": "prune", "targets": ".*"}]},
            r"sparsity: required for an unstructured pattern",
        ),
        (
            {"stages": [{"method": "prune", "targets": ".*", "pattern": "4:2"}]},
            r"pattern='4:2': expected 1 ≤ N < M",
        ),
        (
            {"stages": [{"method": "prune", "targets": ".*", "pattern": "2:4", "sparsity": 0.3}]},
            r"implies sparsity 0.5",
        ),
        (
            {"stages": [{"method": "lowrank", "targets": ".*", "rank": 0}]},
            r"\.rank: Input should be greater than or equal to 1",
        ),
        (
            {"stages": [{"method": "lowrank", "targets": ".*"}]},
            r"rank/ratio/energy: give exactly one, got none",
        ),
        (
            {"stages": [{"method": "lowrank", "targets": ".*", "rank": 2, "ratio": 0.5}]},
            r"give exactly one, got \['rank', 'ratio'\]",
        ),
        (
            {"stages": [{"method": "kronecker", "targets": ".*", "a_shape": [0, 4]}]},
            r"a_shape=\[0, 4\]: expected two positive integers",
        ),
        ({"stages": [{"method": "kronecker", "targets": ".*"}]}, r"\.a_shape: Field required"),
        (
            {"stages": [{"method": "prune", "targets": "(", "sparsity": 0.5}]},
            r"targets: '\(' is not a valid regular expression",
        ),
        (
            {
                "stages": [
                    {
                        "method": "lowrank",
                        "targets": ".*",
                        "rank": 2,
                        "overrides": {"x": {"rank": -1}},
                    }
                ]
            },
            r"overrides\['x'\]: rank: Input should be greater",
        ),
        (
            {
                "stages": [
                    {
                        "method": "lowrank",
                        "targets": ".*",
                        "rank": 2,
                        "overrides": {"x": {"method": "prune"}},
                    }
                ]
            },
            r"cannot be overridden per layer",
        ),
        ({"stages": []}, r"stages: List should have at least 1 item"),
        (
            {"stages": [{"method": "prune", "targets": ".*", "sparsity": 0.1}], "version": 99},
            r"version=99",
        ),
        ({"stagez": []}, r"stagez: unknown field; allowed: \['exclude', 'stages', 'version'\]"),
    ],
)
def test_errors_name_stage_and_field(recipe, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.load(recipe)


def test_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(RecipeError, match=r"nope\.yaml: cannot read recipe"):
        Recipe.load(missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [ {method: prune,")
    with pytest.raises(RecipeError, match=r"bad\.yaml: not valid yaml"):
        Recipe.load(bad)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{")
    with pytest.raises(RecipeError, match=r"bad\.json: not valid json"):
        Recipe.load(bad_json)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42")
    with pytest.raises(RecipeError, match="expected a mapping with 'stages'"):
        Recipe.load(scalar)


def test_stage_schema_imports_no_torch():
    # The package __init__ imports torch, so load hfcompress.stage under a bare package stub.
    code = textwrap.dedent(f"""
        import sys, types
        package = types.ModuleType("hfcompress")
        package.__path__ = [{str(Path(hfcompress.__file__).parent)!r}]
        sys.modules["hfcompress"] = package
        import hfcompress.stage, hfcompress.matching
        print("torch" in sys.modules)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
