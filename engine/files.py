"""Files written whole or not at all.

Everything a run or a command leaves for later (configs, checkpoint pointers, generated and
labelled samples, reports, metrics after a resume) is written to a temporary file beside its
final name, flushed to disk, then renamed over it. A reader, or a run resumed after a kill,
sees the old file or the new one, never part of one. The temporary name carries the process
id, so ranks that race to write the same file do not write into each other's.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any, Optional


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` (``mode`` "w" or "wb"); on a clean exit it is synced and renamed
    to ``path``, on an exception removed (``path`` keeps what it held)."""
    final = Path(path)
    tmp = final.with_name(f"{final.name}.tmp{os.getpid()}")
    try:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """``text`` at ``path``, whole or not at all."""
    with atomic_open(path) as handle:
        handle.write(text)


def write_json_lines_atomic(path: str | os.PathLike[str], rows: Iterable[Any], **dumps: Any) -> int:
    """``rows`` as JSON lines at ``path`` (``dumps``: :func:`json.dumps` options), whole or not at all; the count."""
    count = 0
    with atomic_open(path) as handle:
        for row in rows:
            handle.write(json.dumps(row, **dumps) + "\n")
            count += 1
    return count


def complete_json_lines(path: Path) -> list[Any]:
    """The records of a JSONL file an interrupted writer may have left: every line up to a torn one (killed
    mid-write), which is ignored with all after it."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # the writer was killed mid-line: everything before it is complete
    return records


class PartialOutput:
    """The unfinished output of a resumable command (``keel generate``, ``keel data label``).

    Complete rows are appended to ``OUTPUT.partial``; ``OUTPUT.partial.meta`` records what made them
    (a fingerprint: model, options, input). A run started again keeps the complete rows when its own
    fingerprint matches, and the finished file is renamed to ``OUTPUT``.
    """

    def __init__(self, output: str | os.PathLike[str]):
        self.output = Path(output)
        self.path = Path(f"{output}.partial")
        self.meta = Path(f"{output}.partial.meta")

    def records(self) -> list[Any]:
        """The complete rows written so far (a torn last line is dropped)."""
        return complete_json_lines(self.path)

    def recorded(self) -> Optional[dict[str, Any]]:
        """The fingerprint of the run that wrote :meth:`records`; None when missing or unreadable."""
        try:
            saved = json.loads(self.meta.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return saved if isinstance(saved, dict) else None

    def start(self, kept: list[Any], fingerprint: dict[str, Any]) -> None:
        """Record this run's fingerprint, and keep only ``kept`` (the complete rows it resumes after)."""
        write_text_atomic(self.meta, json.dumps(fingerprint, indent=1) + "\n")
        write_json_lines_atomic(self.path, kept)

    def append(self) -> IO[Any]:
        return open(self.path, "a", encoding="utf-8")

    def finish(self) -> None:
        """All rows are written: the partial file becomes the output."""
        os.replace(self.path, self.output)
        self.meta.unlink(missing_ok=True)
