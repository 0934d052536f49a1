"""Progress bars of the long commands (training, scoring, labelling, reference log-probs, generation).

On a terminal they are tqdm's bars. Written to a file or a pipe (a Slurm job's log, ``tee``), tqdm's
carriage-return updates make one ever-growing line that ``tail -f`` shows only at the end, with log
records glued onto it: there each update is a line of its own, at most one every
:data:`FILE_INTERVAL_S` seconds.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO

#: Seconds between two progress lines when stderr is not a terminal.
FILE_INTERVAL_S = 30.0


class _Lines:
    """A text stream for tqdm that writes the bar as whole lines, at most one every ``interval`` seconds (the
    trainer refreshes its bar every step, with the loss), and the last state when :meth:`emit` is called."""

    def __init__(self, stream: TextIO, interval: float):
        self.stream, self.interval = stream, interval
        self.pending, self.last = "", -math.inf

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self.pending = text
            if time.monotonic() - self.last >= self.interval:
                self.emit()

    def emit(self) -> None:
        if self.pending:
            self.stream.write(self.pending + "\n")
            self.stream.flush()
            self.pending, self.last = "", time.monotonic()

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(**kwargs: Any) -> Any:
    """A tqdm bar on stderr (``kwargs`` as tqdm's): whole lines, throttled, when stderr is no terminal."""
    from tqdm import tqdm

    stream = sys.stderr
    if stream.isatty():
        return tqdm(**{"dynamic_ncols": True, **kwargs}, file=stream)
    lines = _Lines(stream, kwargs.pop("mininterval", FILE_INTERVAL_S))

    class LineBar(tqdm):  # type: ignore[misc, valid-type]
        def close(self) -> None:
            super().close()
            lines.emit()  # where the bar ended

    return LineBar(**{"ncols": 100, **kwargs}, file=lines, mininterval=0)


def write_above_bars(line: str, stream: TextIO) -> bool:
    """Write ``line`` above the progress bars drawn on the terminal ``stream`` (tqdm clears and redraws them);
    ``False``, writing nothing, where no bar is drawn there."""
    if "tqdm" not in sys.modules or not stream.isatty():  # no bar was ever made, or lines are whole already
        return False
    from tqdm import tqdm

    if not getattr(tqdm, "_instances", None):  # every bar is closed
        return False
    tqdm.write(line, file=stream)
    return True
