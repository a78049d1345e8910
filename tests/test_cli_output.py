"""Ctrl-C during ``hfcompress``: exit code 130, one line, and outputs whole or absent."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import transformers

import cli_helpers
from cli_helpers import run_main
from hfcompress import cli
from hfcompress.cli import compress as compress_command

# the shared fixtures
tiny_folder = cli_helpers.tiny_folder
_no_library_bars = cli_helpers._no_library_bars


# --- Ctrl-C: exit 130, one line, nothing left behind ---------------------------------------------


def test_ctrl_c_during_compression_exits_130_and_writes_nothing(
    tiny_folder, tmp_path, monkeypatch, capsys
):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(compress_command, "compress_model", interrupted)
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

    def interrupted(self, *args, **kwargs):
        saved_files.extend(p.name for p in tmp_path.rglob("*.safetensors"))
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained", interrupted)
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


def test_output_folders_get_the_usual_permissions(tmp_path):
    """mkdtemp makes 0700 folders; an output folder is readable as mkdir would make it."""
    umask = os.umask(0o022)
    try:
        with cli.atomic_output(tmp_path / "out") as tmp:
            (tmp / "x").write_text("x")
    finally:
        os.umask(umask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


# --- Ctrl-C while the command is still importing torch/transformers ------------------------------


def _interrupt_while_importing(command: list[str]) -> subprocess.CompletedProcess:
    """Start ``command``, send SIGINT once torch's shared library is mapped (hfcompress's package
    import is under way: transformers comes after torch), and collect the result."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    maps = Path(f"/proc/{process.pid}/maps")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        with contextlib.suppress(OSError):
            if "libtorch" in maps.read_text():
                break
        time.sleep(0.005)
    assert process.poll() is None, "the command finished before it could be interrupted"
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc (Linux)")
@pytest.mark.parametrize("how", ["script", "module"])
def test_ctrl_c_during_import_exits_130_with_one_line(how):
    script = Path(sys.executable).with_name("hfcompress")
    if how == "script" and not script.exists():
        pytest.skip("the hfcompress console script is not installed beside this Python")
    command = [str(script)] if how == "script" else [sys.executable, "-m", "hfcompress"]
    result = _interrupt_while_importing([*command, "shapes", "64", "64"])
    assert result.returncode == 130, result.stderr
    assert result.stderr == "hfcompress: interrupted\n"


def test_ctrl_c_during_import_as_a_library_propagates():
    """A program that imports hfcompress gets its KeyboardInterrupt, as from any import."""
    code = "import hfcompress"
    result = _interrupt_while_importing([sys.executable, "-c", code])
    assert result.returncode != 130
    assert "KeyboardInterrupt" in result.stderr
