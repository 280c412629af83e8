"""Errors raised for bad user data.

Every message names where the problem is (file, line, field), what was expected and what was found, so a user can
fix the data without reading rlft's source.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DataError", "Issue", "RecordError", "describe_value"]


class DataError(ValueError):
    """A user's data (or the way it was specified) cannot be used.

    Args:
        message: The full, actionable message.
        issues: The individual problems behind the error, when there are several (for programmatic use).
    """

    def __init__(self, message: str, issues: list[Issue] | None = None) -> None:
        super().__init__(message)
        self.issues: list[Issue] = list(issues or [])


@dataclass
class Issue:
    """One problem with one input row.

    Attributes:
        source: File (or hub dataset) the row came from.
        line: 1-based line / row number inside the source, ``None`` when unknown.
        field: Field of the row the problem is in, ``None`` when the row as a whole is wrong.
        message: What was expected and what was found.
    """

    source: str
    line: int | None
    field: str | None
    message: str

    def __str__(self) -> str:
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        what = self.message if self.field is None else f"field '{self.field}': {self.message}"
        return f"{where}: {what}"


class RecordError(ValueError):
    """Raised by a format converter for one invalid row; :func:`rlft.data.formats.convert` adds file and line.

    Args:
        field: The field that is wrong (dotted/indexed path such as ``messages[2].role``), or ``None``.
        message: What was expected and what was found.
        reason: Short category used to count dropped rows, e.g. ``"missing field"`` or ``"empty response"``.
    """

    def __init__(self, field: str | None, message: str, reason: str) -> None:
        super().__init__(message if field is None else f"field '{field}': {message}")
        self.field = field
        self.message = message
        self.reason = reason


def describe_value(value: object, limit: int = 40) -> str:
    """Short description of a value's type and content for error messages, e.g. ``list of int [1, 2]``."""
    if isinstance(value, list):
        inner = sorted({type(v).__name__ for v in value})
        kind = f"list of {'/'.join(inner)}" if inner else "empty list"
    else:
        kind = type(value).__name__
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{kind} {text}"
