"""``hfcompress.model_card``: the README.md of a compressed checkpoint."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import transformers
import yaml

import hfcompress
from conftest import tiny_model
from hfcompress import KroneckerLinear, LowRankLinear, PrunedLinear
from hfcompress.evaluation import count_parameters
from hfcompress.model_card import LOAD_ERROR, LOAD_WARNING, model_card_text, write_model_card

RECIPE = {
    "stages": [
        {"method": "lowrank", "targets": r".*mlp\.(gate|up)_proj", "rank": 8},
        {"method": "prune", "targets": r".*mlp\.up_proj", "sparsity": 0.5},
        {"method": "prune", "targets": r".*self_attn\..*", "pattern": "2:4"},
        {"method": "kronecker", "targets": r".*down_proj", "a_shape": [8, 8], "terms": 2},
    ]
}


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """A tiny Llama compressed with every method, its report, and the folder it is saved in."""
    model = tiny_model("llama")
    report = hfcompress.compress_model(model, RECIPE, progress=False)
    folder = tmp_path_factory.mktemp("card")
    model.save_pretrained(folder)
    return model, report, folder


def _front_matter(card: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", card, re.S)
    assert match, card[:200]
    return yaml.safe_load(match.group(1))


def test_card_says_how_the_model_was_compressed(compressed):
    model, report, _ = compressed
    card = model_card_text(model, report, base_model="HuggingFaceTB/SmolLM2-135M-Instruct")
    meta = _front_matter(card)
    assert meta["library_name"] == "hfcompress"
    assert {"hfcompress", "lowrank", "prune", "kronecker"} <= set(meta["tags"])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    # the reference: the layer types in the model
    layers = [m for m in model.modules() if isinstance(m, (LowRankLinear, KroneckerLinear))]
    factored = [m for m in layers if isinstance(m, LowRankLinear) and isinstance(m.u, PrunedLinear)]
    plain = [m for m in layers if isinstance(m, LowRankLinear) and m not in factored]
    kronecker = [m for m in layers if isinstance(m, KroneckerLinear)]
    pruned = [
        m
        for name, m in model.named_modules()
        if isinstance(m, PrunedLinear) and "self_attn" in name
    ]
    assert f"| lowrank + prune (factors) | {len(factored)} |" in card
    assert f"| lowrank | {len(plain)} |" in card
    assert f"| kronecker | {len(kronecker)} |" in card
    assert f"| prune | {len(pruned)} |" in card
    assert "| kronecker | a_shape=[8, 8], terms=2 | 2 | `model.layers.0.mlp.down_proj` |" in card
    total = sum(p.numel() for p in model.parameters())
    assert f"| stored | {total:,} |" in card
    assert f"| non-zero (pruned entries excluded) | {count_parameters(model).nonzero:,} |" in card
    assert f"| before compression | {report.model_params_before:,} |" in card
    assert "Perplexity was not measured" in card
    assert "pip install hfcompress" in card and "import hfcompress" in card


def test_card_loading_instructions_and_the_error_without_hfcompress(compressed):
    """The card quotes what transformers prints when ``import hfcompress`` is missing (measured
    in a fresh interpreter), and its loading snippet runs."""
    model, report, folder = compressed
    card = model_card_text(model, report, repo=str(folder))
    (snippet,) = re.findall(r"```python\n(.*?)```", card, re.S)
    assert snippet.index("import hfcompress") < snippet.index("from_pretrained")
    script = (
        "import traceback\n"
        "from transformers import LlamaForCausalLM\n"
        "try:\n"
        f"    LlamaForCausalLM.from_pretrained({str(folder)!r})\n"
        "except Exception:\n"
        "    traceback.print_exc()\n"
        "else:\n"
        "    raise SystemExit('loaded without hfcompress')\n"
        "import sys; print('=== with hfcompress', file=sys.stderr, flush=True)\n"
        + snippet.replace("tokenizer = AutoTokenizer", "# tokenizer = AutoTokenizer")
        + "print(type(model.model.layers[0].mlp.down_proj).__name__)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    without = result.stderr.split("=== with hfcompress")[0]
    assert LOAD_WARNING in without
    assert without.strip().splitlines()[-1] == LOAD_ERROR
    assert LOAD_WARNING in card and LOAD_ERROR in card
    assert result.stdout.strip() == "KroneckerLinear"


def test_dense_model_and_perplexity(tmp_path):
    model = tiny_model("gpt2")
    card = model_card_text(model, perplexity={"held-out": 21.25, "wikitext": 30.0})
    assert "the model is dense" in card
    assert "| held-out | 21.250 |" in card and "| wikitext | 30.000 |" in card
    assert _front_matter(card)["tags"] == ["hfcompress", "compressed"]
    path = write_model_card(model, tmp_path, perplexity=12.5)
    assert path == Path(tmp_path) / "README.md"
    assert "| perplexity | 12.500 |" in path.read_text()


def test_card_of_a_reloaded_checkpoint_reads_the_saved_structure(compressed):
    """After ``from_pretrained`` the config holds an ``HfCompressConfig``, not a dict."""
    model, _, folder = compressed
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(folder)
    section = slice(1, 3)  # "How it was compressed" and "Parameters"
    parts = [
        card.split("\n## ")[section] for card in (model_card_text(model), model_card_text(reloaded))
    ]
    assert parts[0] == parts[1]
    assert "lowrank + prune (factors)" in parts[1][0]


# --- save_pretrained writes the card ---------------------------------------------------------


def test_save_pretrained_writes_the_card(compressed, tmp_path):
    """The fixture saved with plain ``model.save_pretrained``: README.md is the card."""
    model, _, folder = compressed
    card = (folder / "README.md").read_text()
    assert _front_matter(card)["library_name"] == "hfcompress"
    assert "import hfcompress" in card and LOAD_WARNING in card
    assert type(model).__name__ == "LlamaForCausalLM"  # the class is untouched


def test_a_reloaded_model_saves_its_card_and_a_users_readme_is_kept(compressed, tmp_path):
    _, _, folder = compressed
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder)
    again = tmp_path / "again"
    loaded.save_pretrained(again)
    assert "import hfcompress" in (again / "README.md").read_text()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("# my notes\n")
    loaded.save_pretrained(mine)
    assert (mine / "README.md").read_text() == "# my notes\n"


def test_a_dense_model_gets_no_card(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    assert not (tmp_path / "README.md").exists()
