"""Run metrics: ``<run_dir>/metrics.jsonl`` plus TensorBoard events, written by rank 0."""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Optional

from engine.files import atomic_open

logger = logging.getLogger(__name__)


class MetricsWriter:
    """Appends one JSON object per logged step and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        if enabled:
            os.makedirs(run_dir, exist_ok=True)
        self._file = open(self.path, "a") if enabled else None
        self._tb: Optional[Any] = None
        self._tb_dir = os.path.join(run_dir, "tensorboard") if enabled and tensorboard else None

    def _tensorboard(self, purge_step: Optional[int] = None) -> Optional[Any]:
        """The TensorBoard writer, made at the first use (a run that fails before training leaves no events
        file). ``purge_step`` tells TensorBoard to drop what earlier runs in this directory logged from that
        step on, as :meth:`keep_until` does for ``metrics.jsonl``."""
        if self._tb is None and self._tb_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(self._tb_dir, purge_step=purge_step)
            except ImportError as exc:  # pragma: no cover - tensorboard is a core dependency
                logger.warning("TensorBoard disabled: %s", exc)
                self._tb_dir = None
        return self._tb

    def keep_until(self, step: int) -> None:
        """Drop the records of steps after ``step`` from ``metrics.jsonl``, atomically.

        Called once the run knows where it starts: a fresh run (``step`` 0) in a reused
        directory starts an empty file instead of appending to the old run's curves; a run
        resumed from step ``k`` drops what the interrupted run logged after its checkpoint,
        which the resumed run logs again. A line that is not a record (a write cut short by a
        crash or a full disk) is dropped too, so that the next record does not land on it.
        """
        if not self.enabled or self._file is None:
            return
        # a fresh run drops everything: its step-0 evaluation (run.eval_at_start) is logged again, and was kept
        # twice; a resumed run keeps its checkpoint's step, whose evaluation came before the save
        self._tensorboard(purge_step=step + 1 if step else 0)  # the same steps leave TensorBoard's curves
        parsed, skipped = _parse(self.path)
        lines = [line for line, record in parsed if step and record.get("step", 0) <= step]
        dropped = skipped + len(parsed) - len(lines)
        if not dropped:
            return
        self._file.close()
        with atomic_open(self.path) as fh:
            fh.writelines(lines)
        self._file = open(self.path, "a")
        logger.info("metrics.jsonl: dropped %d records after step %d (%s)", dropped, step,
                    "a fresh run" if step == 0 else "logged after the checkpoint resumed from")

    def write(self, step: int, values: dict[str, Any], prefix: str = "train") -> None:
        if not self.enabled:
            return
        # Metrics without items this step (e.g. pairwise accuracy on unpaired batches) are NaN: omitted.
        values = {k: v for k, v in values.items() if not (isinstance(v, float) and math.isnan(v))}
        record = {"step": step, "split": prefix, **values}
        assert self._file is not None
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        board = self._tensorboard()
        if board is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    board.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def parse_records(path: str) -> list[tuple[str, dict[str, Any]]]:
    """``(line, record)`` for each line of a ``metrics.jsonl`` that holds a JSON object, each line ending
    in a newline. A line that does not (a write cut short by a crash or a full disk, NUL bytes a file
    system left after a node failure) is skipped with a warning naming it: the curves and a resumed run
    go on with the records that are whole."""
    return _parse(path)[0]


def _parse(path: str) -> tuple[list[tuple[str, dict[str, Any]]], int]:
    """:func:`parse_records`' pairs, and how many non-blank lines it skipped, from one read of the file."""
    parsed, skipped = [], 0
    with open(path, errors="replace") as fh:
        for number, line in enumerate(fh, 1):
            text = line.strip()
            if not text:
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict):
                logger.warning("%s, line %d: not a JSON record (a write cut short?); skipped", path, number)
                skipped += 1
                continue
            parsed.append((text + "\n", record))
    return parsed, skipped


def read_metrics(run_dir: str, split: str = "train") -> list[dict[str, Any]]:
    """All records of ``split`` in ``metrics.jsonl`` (later records for a step win)."""
    by_step: dict[int, dict[str, Any]] = {}
    for _, record in parse_records(os.path.join(run_dir, "metrics.jsonl")):
        if record.get("split") == split:
            by_step[record["step"]] = record
    return [by_step[k] for k in sorted(by_step)]
