"""Which modules a structured stage acts on, and its problems said once per kind."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from hfcompress.errors import HfCompressError
from hfcompress.matching import fullmatch, select


def select_modules(
    model: nn.Module, targets: str, exclude: tuple[str | None, ...], where: str
) -> list[str]:
    """Qualified names of ``model``'s modules that ``targets`` fully matches, minus exclusions
    (the recipe's and the stage's ``exclude``), outermost first."""
    names = [n for n, _ in model.named_modules() if n]
    matched = select(targets, names, f"{where}.targets")
    return [
        n
        for n in matched
        if not any(p is not None and fullmatch(p, n, f"{where}.exclude") for p in exclude)
    ]


def no_match_message(where: str, targets: str, examples: list[str], what: str) -> str:
    few = examples[:4] + (["..."] if len(examples) > 4 else [])
    return (
        f"{where}.targets: {targets!r} fully matches no module (or all are excluded); "
        f"{what} look like {few}"
    )


def grouped_errors(
    where: str, names: list[str], check: Callable[[str], object]
) -> tuple[dict[str, object], list[str]]:
    """Run ``check(name)`` for every name; results, and one message per distinct problem.

    A problem shared by many modules (every block's MLP of an unknown class) is said once,
    with how many modules it concerns.
    """
    results: dict[str, object] = {}
    problems: dict[str, list[str]] = {}
    for name in names:
        try:
            results[name] = check(name)
        except HfCompressError as error:
            message = str(error).replace(repr(name), "{module}")
            problems.setdefault(message, []).append(name)
    errors = []
    for message, where_names in problems.items():
        first = where_names[0]
        text = message.replace("{module}", repr(first))
        if len(where_names) > 1:
            text = message.replace("{module}", f"{first!r} (and {len(where_names) - 1} more)")
        errors.append(f"{where}.{text}")
    return results, errors
