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
from typing import IO, Any


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
