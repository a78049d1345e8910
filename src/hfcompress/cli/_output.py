"""Output locations: checked before any work, written whole or not at all (Ctrl-C included).

Every subcommand checks its output paths first (``check_output``), so a path that cannot be
written is one line and exit code 2 before any model is loaded; folders are written into a
temporary sibling and renamed into place (``atomic_output``), files likewise
(``write_text_atomic``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

from hfcompress.cli._common import CliError


def _nearest_existing(path: Path) -> Path:
    """``path`` itself or its closest ancestor that exists."""
    path = path.absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _probe_writable(folder: Path) -> str | None:
    """Why nothing can be created in ``folder`` (an OS error's text), or None when it can.

    It creates and removes an empty folder: permission bits alone say nothing when running as
    root, nor about read-only file systems and /proc.
    """
    try:
        Path(tempfile.mkdtemp(prefix=".hfcompress-probe-", dir=folder)).rmdir()
    except OSError as error:
        return error.strerror or type(error).__name__
    return None


def check_output(
    path: Path, flag: str, kind: Literal["folder", "file"] = "folder", overwrite: bool = False
) -> None:
    """Fail fast, before any work, when ``path`` cannot take a new ``kind``.

    Raises ``CliError`` (one line naming ``flag`` and ``path``) when ``path`` is of the other
    kind, when it exists and holds something and ``overwrite`` is off, when an ancestor is a
    file, or when its nearest existing folder is not writable (the output is written into a
    temporary sibling there and moved into place).
    """
    where = f"{flag} {str(path)!r}"
    if path.is_dir() and kind == "file":
        raise CliError(f"{where}: is a folder, expected a file")
    if path.exists() and not path.is_dir() and kind == "folder":
        raise CliError(f"{where}: is a file, expected a folder")
    if path.is_file() and not overwrite:
        raise CliError(f"{where}: exists (pass --overwrite)")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise CliError(f"{where}: exists and is not empty (pass --overwrite)")
    ancestor = _nearest_existing(path.parent)
    if not ancestor.is_dir():
        raise CliError(f"{where}: {str(ancestor)!r} is a file, so nothing can be created under it")
    reason = _probe_writable(ancestor)
    if reason is not None:
        raise CliError(f"{where}: nothing can be created in {str(ancestor)!r} ({reason})")


def _make_parents(folder: Path) -> list[Path]:
    """``mkdir -p folder``; returns the folders it created, outermost first."""
    missing = [p for p in [folder, *folder.parents] if not p.exists()][::-1]
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_empty(folders: Sequence[Path]) -> None:
    """Remove the folders ``_make_parents`` created, innermost first, where they are still empty."""
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            folder.rmdir()


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) until the block has run, then raise ``KeyboardInterrupt``, so a short
    critical step (swapping folders) is never cut in half. Only the main thread gets signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def _move_into_place(tmp: Path, output: Path) -> None:
    """Rename the finished ``tmp`` to ``output``. An existing ``output`` is renamed aside first,
    put back if the second rename fails, and removed once the new folder is in place."""
    with _interrupts_deferred():
        if not output.exists():
            os.replace(tmp, output)
            return
        aside = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
        aside.rmdir()
        os.replace(output, aside)
        try:
            os.replace(tmp, output)
        except BaseException:
            os.replace(aside, output)
            raise
        shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def atomic_output(output: Path, overwrite: bool = False, flag: str = "--output") -> Iterator[Path]:
    """Write into a temporary sibling folder and move it to ``output`` only on success.

    Any exception in the block, ``KeyboardInterrupt`` included, removes the temporary folder and
    the parent folders made for it, and leaves an existing ``output`` as it was.
    """
    check_output(output, flag, "folder", overwrite)
    created = _make_parents(output.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700; a folder made by mkdir is not
        yield tmp
        _move_into_place(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary sibling file and rename it to ``path``: whole or not at all,
    Ctrl-C included."""
    created = _make_parents(path.parent)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        _remove_empty(created)
        raise
