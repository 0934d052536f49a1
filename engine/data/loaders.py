"""Read rows from files, hub data sets or the built-in generators, validating as they stream.

Sources:

* ``path.jsonl`` — read line by line (streaming), so every row keeps its 1-based line
  number and a malformed line is reported as such instead of breaking Arrow's schema
  inference for the whole file.
* ``path.json`` — a JSON array of rows (or ``{"key": [rows]}``, or JSON lines), read
  with ``json``; rows are numbered from 1. Not through Arrow: Arrow unifies types
  across rows (a rating ``"3"`` in one row turns every rating into a string), which
  would blame the wrong row or hide the bad one.
* ``path.parquet`` — loaded with HF ``datasets`` in streaming mode (typed columns);
  rows are numbered from 1.
* ``hf:<org>/<name>[/<data_dir>][:<split>]`` — a data set on the hub, via
  ``datasets.load_dataset(..., streaming=True)`` (split defaults to ``train``).
* ``builtin:<name>`` — deterministic synthetic rows (:mod:`engine.data.synthetic`).

:func:`iter_rows` validates every row against a format from :mod:`engine.data.schemas`;
``on_error="raise"`` stops at the first bad row, ``"skip"`` drops bad rows and logs how
many were dropped (and the first few reasons).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from engine.data.errors import DataError, Where, empty_dataset
from engine.data.schemas import Row, check_row

logger = logging.getLogger(__name__)

MAX_PROBLEMS = 20
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class Unparsable:
    """Stands in for a record that is not valid JSON."""

    message: str
    field: str = "<json>"
    expected: str = "a valid JSON object"


@dataclass
class ReadStats:
    """Counts of one pass over a source; ``problems`` keeps the first few errors."""

    source: str = ""
    records: int = 0
    valid: int = 0
    skipped: int = 0
    problems: list[str] = field(default_factory=list)
    looks_like: dict[str, int] = field(default_factory=dict)  # bad rows with another format's fields, per format
    where: Optional[Where] = None  # the record read last (a caller's own problems with the row it got name it)


def parse_hub_source(source: str) -> tuple[str, Optional[str], str]:
    """``hf:org/name[/data_dir][:split]`` → (name, data_dir, split)."""
    spec = source[len("hf:"):]
    spec, _, split = spec.partition(":")
    parts = spec.split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise DataError(None, "<source>", "hf:<org>/<name>[/<data_dir>][:<split>]", got=source,
                        source=source, hint="fix data.source")
    data_dir = "/".join(parts[2:]) or None
    return "/".join(parts[:2]), data_dir, split or "train"


def _not_utf8(exc: UnicodeDecodeError, column_of: bytes = b"") -> str:
    """What a line or file that is not UTF-8 text gets: the byte, where it is, and the remedy."""
    at = f" at column {len(column_of[:exc.start].decode('utf-8', 'replace')) + 1}" if column_of else ""
    return (f"UTF-8 text, got byte 0x{exc.object[exc.start]:02x}{at} (saved in another encoding, e.g. Latin-1 or "
            "cp1252: re-save the file as UTF-8)")


def _jsonl_records(path: str) -> Iterator[tuple[Where, Any]]:
    """Each line decoded on its own: a line that is not UTF-8 is one bad row (per data.on_error), not a
    traceback for the file; a byte-order mark at the start (a Windows export) is dropped."""
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            record: Any
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                yield Where(path, number, "line"), Unparsable("", "<text>", _not_utf8(exc, raw))
                continue
            text = line.rstrip("\r\n")  # parsed with its newline, an error at the end reads "column 1" (of the next line)
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                record = Unparsable(f"{exc.msg} at column {exc.colno}")
            yield Where(path, number, "line"), record


def _json_records(path: str) -> Iterator[tuple[Where, Any]]:
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise DataError(Where(path, line, "line"), "<text>", _not_utf8(exc), source=path,
                        hint="the whole file is read at once: fix the encoding to read any row") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if data is None:  # maybe JSON lines in a .json file
        yield from _jsonl_records(path)
        return
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]} wrapper
    if not isinstance(data, list):
        raise DataError(None, "<file>", "a JSON array of row objects (or JSON lines)", got=type(data).__name__,
                        source=path, hint="convert the file to JSONL")
    for number, row in enumerate(data, start=1):
        yield Where(path, number, "row"), row


def _datasets_records(source: str, builder: str, **kwargs: Any) -> Iterator[tuple[Where, Any]]:
    import datasets

    stream = datasets.load_dataset(builder, streaming=True, **kwargs)
    for number, row in enumerate(stream, start=1):
        yield Where(source, number, "row"), row


def _file_records(path: str) -> Iterator[tuple[Where, Any]]:
    if path.endswith(".jsonl"):
        yield from _jsonl_records(path)
    elif path.endswith(".parquet"):
        yield from _datasets_records(path, "parquet", data_files=path, split="train")
    else:
        yield from _json_records(path)


def iter_records(source: str, num: int = 512, seed: int = 0) -> Iterator[tuple[Where, Any]]:
    """Raw records of ``source`` with their position (see the module docstring for forms)."""
    if source.startswith("builtin:"):
        from engine.data.synthetic import builtin_rows

        for number, row in enumerate(builtin_rows(source, num, seed), start=1):
            yield Where(source, number, "row"), row
    elif source.startswith("hf:"):
        name, data_dir, split = parse_hub_source(source)
        yield from _datasets_records(source, name, data_dir=data_dir, split=split)
    elif os.path.isfile(source) and source.endswith(FILE_SUFFIXES):
        yield from _file_records(source)
    elif os.path.isfile(source):
        raise DataError(None, "<source>", "a .jsonl, .json or .parquet file", got=source, source=source,
                        hint="rename or convert the file")
    elif os.path.isdir(source):
        raise DataError(None, "<source>", "a .jsonl, .json or .parquet file", got=source, source=source,
                        hint="it is a directory: name a file in it")
    else:
        raise DataError(None, "<source>", "an existing file, hf:<org>/<name> or builtin:<name>", got=source,
                        source=source, hint=f"no such file (a relative path starts from {os.getcwd()})")


def parsed_records(source: str) -> Iterator[tuple[Where, Any]]:
    """Records of ``source`` (file or hub set) with their position; one that is not JSON is a :class:`DataError`."""
    for where, raw in iter_records(source):
        yield where, parsed(raw, where)


def _note(stats: ReadStats, error: DataError) -> None:
    stats.skipped += 1
    if error.looks_like:
        stats.looks_like[error.looks_like] = stats.looks_like.get(error.looks_like, 0) + 1
    if len(stats.problems) < MAX_PROBLEMS:
        stats.problems.append(error.brief)


def parsed(raw: Any, where: Where) -> Any:
    """``raw`` as read, or the :class:`DataError` of a record that is not valid JSON."""
    if isinstance(raw, Unparsable):
        raise DataError(where, raw.field, raw.expected, got=raw.message or None)
    return raw


def checked_records(records: Iterable[tuple[Where, Any]], check: Callable[[Any, Where], Any], on_error: str,
                    stats: ReadStats) -> Iterator[Any]:
    """``check(raw, where)`` of each record (a line that is not JSON comes as :class:`Unparsable`), counted in
    ``stats``: a :class:`DataError` stops the read (``on_error="raise"``) or drops the record, counting it and
    keeping the first reasons (``"skip"``)."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error={on_error!r}: choose 'raise' or 'skip'")
    for where, raw in records:
        stats.records += 1
        stats.where = where
        try:
            row = check(raw, where)
        except DataError as error:
            if on_error == "raise":
                raise
            _note(stats, error)
            continue
        stats.valid += 1
        yield row


def iter_rows(source: str, fmt: str, on_error: str = "raise", stats: Optional[ReadStats] = None,
              num: int = 512, seed: int = 0, formats: Optional[Sequence[str]] = None) -> Iterator[Row]:
    """Validated rows of ``source`` in format ``fmt``, streaming.

    Raises :class:`DataError` on the first bad row (``on_error="raise"``) or, with
    ``"skip"``, drops it and counts it in ``stats``; an empty result is always an error.
    ``formats`` are those the run trains on (see :func:`engine.data.schemas.check_row`).
    """
    stats = stats if stats is not None else ReadStats()
    stats.source = source
    yield from checked_records(iter_records(source, num, seed),
                               lambda raw, where: check_row(fmt, parsed(raw, where), where, formats), on_error, stats)
    if stats.skipped:
        logger.warning("%s: skipped %d of %d rows that are not valid %s rows; first: %s",
                       source, stats.skipped, stats.records, fmt, stats.problems[0])
    if not stats.valid:
        raise empty_dataset(source, stats.skipped)


def load_rows(source: str, fmt: str, on_error: str = "raise", num: int = 512, seed: int = 0,
              stats: Optional[ReadStats] = None, formats: Optional[Sequence[str]] = None) -> list[Row]:
    """All validated rows of ``source`` as a list (see :func:`iter_rows`)."""
    return list(iter_rows(source, fmt, on_error, stats=stats, num=num, seed=seed, formats=formats))


def make_parent_dir(path: str) -> None:
    """Create the directory output file ``path`` goes into; one that cannot be made is a :class:`DataError`."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise DataError(None, "<output>", "a path whose directory can be created", got=f"{directory}: {exc.strerror}",
                        source=path, hint="choose another output path") from None


def write_jsonl(rows: Any, path: str) -> int:
    """Write rows (any iterable of dicts) as JSON lines, atomically; returns the count."""
    from engine.files import write_json_lines_atomic

    make_parent_dir(path)
    return write_json_lines_atomic(path, rows, ensure_ascii=False)
