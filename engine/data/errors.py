"""The one exception the data layer raises for bad input, and where it was found.

A :class:`DataError` names the file (or data-set name), the row — a 1-based *line*
for JSONL, a 1-based *row* for JSON arrays, Parquet and hub data sets — the field, and
what was expected there, so a bad row in a ten-million-row file can be fixed directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

HINT = "fix the row, or set data.on_error=skip to drop bad rows"


class Absent:
    """What a row holds where a required field is not there: shown as the fields the row has, which is
    what tells ``question`` from ``prompt`` at a glance."""

    def __init__(self, row: Any, shown: int = 10):
        names = [repr(str(name)) for name in row] if isinstance(row, dict) else []
        more = f" and {len(names) - shown} more" if len(names) > shown else ""
        self.text = f"no such field (the row has {', '.join(names[:shown]) + more})" if names \
            else "no such field (the row has no fields)"

    def __repr__(self) -> str:
        return self.text


class Shown:
    """A measure shown as its words in an error (``got 815 tokens``), not as a quoted string."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _short(value: Any, limit: int = 80) -> str:
    if isinstance(value, Absent):
        return repr(value)
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class Where:
    """Position of one record: ``source`` (path or name), ``number`` (1-based), ``unit``."""

    source: str
    number: int
    unit: str = "line"  # "line" for JSONL, "row" otherwise

    def __str__(self) -> str:
        return f"{self.source}, {self.unit} {self.number}"


class DataError(ValueError):
    """A row (or a whole data set) does not have the expected shape.

    The message reads ``<file>, line <n>: field '<field>': expected <what>, got <value>``
    followed by a hint, so it contains the file, the row and the field.
    """

    def __init__(self, where: Optional[Where], field: str, expected: str, got: Any = None,
                 source: Optional[str] = None, hint: str = HINT):
        self.where = where
        self.source = where.source if where else (source or "<data>")
        self.row = where.number if where else None
        self.field = field
        self.expected = expected
        self.got = got
        self.looks_like: Optional[str] = None  # the data format whose fields the row has (set by check_row)
        place = str(where) if where else self.source
        got_text = "" if got is None else f", got {_short(got)}"
        super().__init__(f"{place}: field '{field}': expected {expected}{got_text} ({hint})")

    def with_hint(self, hint: str) -> DataError:
        """The same error with another hint: a command that does not read ``data.on_error`` names its own remedy."""
        error = DataError(self.where, self.field, self.expected, self.got, self.source, hint=hint)
        error.looks_like = self.looks_like
        return error

    @property
    def brief(self) -> str:
        """The message without the hint, for summaries."""
        return str(self).rsplit(" (", 1)[0]


def empty_dataset(source: str, skipped: int = 0) -> DataError:
    """Error for a data set with no usable rows."""
    detail = f"at least one valid row (all {skipped} rows were bad)" if skipped else "at least one row, found none"
    return DataError(None, "<rows>", detail, source=source, hint="check the path and the data format")
