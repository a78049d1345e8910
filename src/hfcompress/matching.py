"""Target matching: one implementation of "does this regex fully match this module name".

Recipes, the planner and the analysis all select modules by a regex that must fully match the
qualified module name (``re.fullmatch`` semantics). Patterns come from users, so matching is
bounded: it uses the ``regex`` package (the ``re`` syntax, with a backtracking engine that does
not go exponential on patterns such as ``(.*)*x``) and a per-match timeout, so that a
pathological pattern is an error naming the field instead of a hang. No torch here.
"""

from __future__ import annotations

from collections.abc import Iterable

import regex

from hfcompress.errors import RecipeError

# Seconds one match may take; module names are short, so a legitimate match takes microseconds.
MATCH_TIMEOUT_S = 1.0


def check_pattern(pattern: str, field: str) -> str:
    """``pattern`` if it compiles; otherwise a ``ValueError`` naming ``field``."""
    try:
        regex.compile(pattern)
    except regex.error as error:
        raise ValueError(
            f"{field}: {pattern!r} is not a valid regular expression ({error})"
        ) from error
    return pattern


def fullmatch(pattern: str, name: str, field: str = "targets") -> bool:
    """Whether ``pattern`` matches the whole of ``name``.

    Raises:
        RecipeError: the match ran past :data:`MATCH_TIMEOUT_S` (catastrophic backtracking);
            the message names ``field`` and the pattern.
    """
    try:
        return regex.fullmatch(pattern, name, timeout=MATCH_TIMEOUT_S) is not None
    except TimeoutError:
        raise RecipeError(
            f"{field}: {pattern!r} took over {MATCH_TIMEOUT_S:g} s to match {name!r} "
            "(nested quantifiers such as (.*)* backtrack exponentially); simplify the pattern"
        ) from None


def select(pattern: str, names: Iterable[str], field: str = "targets") -> list[str]:
    """The names ``pattern`` fully matches, in order."""
    return [name for name in names if fullmatch(pattern, name, field)]
