"""The ``hfcompress`` entry point, run as a user runs it: in a subprocess."""

from __future__ import annotations

import subprocess
import sys

import pytest


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
