"""What one conversion of rows to records did (:func:`rlft.data.formats.convert`), for the log and the cache."""

from __future__ import annotations

from dataclasses import dataclass, field

from rlft.data.errors import Issue

__all__ = ["ConversionReport"]


@dataclass
class ConversionReport:
    """What happened to the rows of one conversion, for the log.

    Attributes:
        format: Format used (detected or given).
        kind: Record kind produced.
        rows_in: Input rows.
        records_out: Records produced.
        filtered: Reason -> number of rows (invalid, when skipping) or records (duplicates) dropped.
        examples: Reason -> the first few issues (file:line) behind ``filtered``.
        source: Short name of the input, for :meth:`summary`.
        locations: ``file:line`` of every record, in record order (for messages about a record after conversion).
    """

    format: str
    kind: str
    rows_in: int
    records_out: int
    filtered: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[Issue]] = field(default_factory=dict)
    source: str = ""
    locations: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One human line, e.g. ``hh.jsonl: 300 rows (hh_rlhf) -> 297 pairs; filtered: 2 duplicate``."""
        line = f"{self.source or 'data'}: {self.rows_in} rows ({self.format}) -> {self.records_out} {self.kind}"
        if self.filtered:
            line += "; filtered: " + ", ".join(f"{count} {reason}" for reason, count in self.filtered.items())
        return line

    def details(self) -> str:
        """:meth:`summary` plus the first examples of every filtered reason, one per line."""
        lines = [self.summary()]
        for reason, issues in self.examples.items():
            lines += [f"  {reason}: {issue}" for issue in issues]
        return "\n".join(lines)
