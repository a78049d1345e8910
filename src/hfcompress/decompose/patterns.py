"""Sparsity patterns: ``"unstructured"`` or ``"N:M"``, and the sparsity a pattern implies.

The one implementation of N:M parsing: the recipe, the layers, the masks and the checkpoint
checks all use it. No torch here.
"""

from __future__ import annotations

import re

from hfcompress.errors import InvalidParameterError

UNSTRUCTURED = "unstructured"
_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_TOLERANCE = 1e-9  # an explicit sparsity must equal 1 − N/M up to float rounding


def parse_nm_pattern(pattern: str) -> tuple[int, int]:
    """Parse ``"N:M"`` into ``(n, m)``, requiring 1 ≤ N < M.

    Raises:
        InvalidParameterError: the pattern is not ``"N:M"`` with 1 ≤ N < M.
    """
    match = _NM.match(pattern) if isinstance(pattern, str) else None
    if match is None:
        raise InvalidParameterError(
            f"pattern={pattern!r}: expected 'unstructured' or 'N:M' such as '2:4'"
        )
    n, m = int(match.group(1)), int(match.group(2))
    if not 1 <= n < m:
        raise InvalidParameterError(
            f"pattern={pattern!r}: expected 1 ≤ N < M (keep N weights in every group of M)"
        )
    return n, m


def normalize_pattern(pattern: str) -> str:
    """``"unstructured"`` or a canonical ``"N:M"`` (spaces removed).

    Raises:
        InvalidParameterError: anything else, or N ≥ M.
    """
    if pattern == UNSTRUCTURED:
        return pattern
    n, m = parse_nm_pattern(pattern)
    return f"{n}:{m}"


def resolve_sparsity(pattern: str, sparsity: float | None) -> float:
    """The sparsity a pattern implies: the given one for unstructured, 1 − N/M for N:M.

    Raises:
        InvalidParameterError: unstructured without a sparsity, or an N:M sparsity that
            contradicts its pattern.
    """
    if pattern == UNSTRUCTURED:
        if sparsity is None:
            raise InvalidParameterError(
                "sparsity: required for an unstructured pattern, a fraction in [0, 1)"
            )
        return sparsity
    n, m = parse_nm_pattern(pattern)
    implied = 1.0 - n / m
    if sparsity is not None and abs(sparsity - implied) > _TOLERANCE:
        raise InvalidParameterError(
            f"sparsity={sparsity!r}: the pattern {pattern!r} implies sparsity {implied:g}; "
            "leave sparsity out or give that value"
        )
    return implied


def check_nm_divides(pattern: str, in_features: int) -> None:
    """N:M groups run along the input dimension, which must be divisible by M.

    Raises:
        InvalidParameterError: it is not.
    """
    if pattern != UNSTRUCTURED:
        m = parse_nm_pattern(pattern)[1]
        if in_features % m:
            raise InvalidParameterError(
                f"pattern={pattern!r}: N:M groups run along the input dimension, which "
                f"must be divisible by {m}; got in_features={in_features}"
            )
