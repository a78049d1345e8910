"""The CLI on the real SmolLM2-135M (slow): compress, held-out perplexity, analyze with plots."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from real_models import heldout_and_calibration_split, require_shakespeare, require_smollm2

pytestmark = pytest.mark.slow


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hfcompress.cli", *args],
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )


def test_cli_compress_eval_analyze_on_smollm2(tmp_path):
    model = require_smollm2()
    texts = require_shakespeare()
    held_out, _ = heldout_and_calibration_split()
    text = tmp_path / "heldout.txt"
    text.write_text(texts[held_out[0]].read_text(encoding="utf-8")[:6000], encoding="utf-8")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "stages:\n"
        "  - method: prune\n    targets: 'model\\.layers\\.\\d+\\.self_attn\\.(q|k|v)_proj'\n    sparsity: 0.3\n"
        "  - method: lowrank\n    targets: 'model\\.layers\\.29\\.mlp\\..*'\n    ratio: 0.8\n"
    )
    out = tmp_path / "compressed"
    result = run_cli("compress", str(model), "--recipe", str(recipe), "--output", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()

    def ppl(folder) -> float:
        result = run_cli(
            "eval",
            str(folder),
            "--perplexity",
            "--text",
            str(text),
            "--max-length",
            "256",
            "--stride",
            "256",
        )
        assert result.returncode == 0, result.stderr[-2000:]
        return float(re.search(r"perplexity\s*│?\s*([\d.]+)", result.stdout).group(1))

    dense, compressed = ppl(model), ppl(out)
    assert 1 < dense < compressed < 10 * dense  # held-out text, mild recipe

    plots = tmp_path / "plots"
    result = run_cli(
        "analyze",
        str(out),
        "--targets",
        r"model\.layers\.(0|29)\..*",
        "--kronecker-candidates",
        "2",
        "--plots",
        str(plots),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "model.layers.29.mlp.up_proj" in result.stdout
    assert (plots / "spectra.png").stat().st_size > 1000 and (
        plots / "energy.png"
    ).stat().st_size > 1000
