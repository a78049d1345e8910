"""Every change a structured method makes, recorded so that it can be undone exactly."""

from __future__ import annotations

from typing import Any

_MISSING = object()


class Journal:
    """Attribute assignments (submodules, config fields, module settings) with their old values.

    ``compress_model`` gives one journal to every model-scope stage; if anything fails later
    (a later stage, a layer-scope stage, Ctrl-C), :meth:`undo` restores every old value,
    newest first, so the model is left exactly as it was. The old modules are kept alive by
    the journal, so undoing costs no copy.
    """

    def __init__(self) -> None:
        self._log: list[tuple[Any, str, Any]] = []

    def setattr(self, obj: Any, name: str, value: Any) -> None:
        """``setattr(obj, name, value)``, remembering the old value (or its absence)."""
        old = _own_value(obj, name)
        self._log.append((obj, name, old))
        setattr(obj, name, value)

    def undo(self) -> None:
        """Restore every recorded attribute, newest change first; the journal is then empty."""
        while self._log:
            obj, name, old = self._log.pop()
            if old is _MISSING:
                if hasattr(obj, name):
                    delattr(obj, name)
            else:
                setattr(obj, name, old)

    def __len__(self) -> int:
        return len(self._log)


def _own_value(obj: Any, name: str) -> Any:
    """The value ``obj.name`` holds now, or ``_MISSING``; modules' children and parameters
    included (``nn.Module`` keeps them outside ``__dict__``)."""
    try:
        return getattr(obj, name)
    except AttributeError:
        return _MISSING
