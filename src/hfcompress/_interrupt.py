"""Ctrl-C while ``hfcompress`` (the command) is still importing torch and transformers.

The command's entry point lives in this package, so Python runs ``hfcompress/__init__.py``, and
with it the seconds-long import of torch and transformers, before ``hfcompress.cli.main`` can
catch anything. An interrupt then would print a traceback through importlib's frames. This
module uses the standard library only, so that the package's ``__init__`` can import it first and
turn that interrupt into the command's usual one line and exit code 130. Imported as a library
(``import hfcompress`` in a user's program), the interrupt propagates unchanged.
"""

from __future__ import annotations

import os
import sys

COMMAND_MODULES = ("hfcompress", "hfcompress.__main__", "hfcompress.cli", "hfcompress.cli.__main__")
COMMAND_SCRIPTS = ("hfcompress", "hfcompress.exe", "hfcompress-script.py")
INTERRUPTED = "hfcompress: interrupted"


def started_as_command() -> bool:
    """Whether this process is the ``hfcompress`` command (console script or ``python -m``)."""
    argv = list(getattr(sys, "orig_argv", ()))
    if "-m" in argv:
        index = argv.index("-m")
        if index + 1 < len(argv) and argv[index + 1] in COMMAND_MODULES:
            return True
    return os.path.basename(sys.argv[0] if sys.argv else "") in COMMAND_SCRIPTS


def exit_if_command() -> None:
    """Exit with one line and code 130 when the command was interrupted while importing.

    ``--debug`` on the command line keeps the traceback (the caller re-raises).
    """
    if started_as_command() and "--debug" not in sys.argv:
        print(INTERRUPTED, file=sys.stderr)
        raise SystemExit(130)
