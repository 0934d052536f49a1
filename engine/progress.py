"""Progress bars of the long commands (training, scoring, labelling, reference log-probs, generation).

On a terminal they are tqdm's bars. Written to a file or a pipe (a Slurm job's log, ``tee``), tqdm's
carriage-return updates make one ever-growing line that ``tail -f`` shows only at the end, with log
records glued onto it: there each update is a line of its own, at most one every
:data:`FILE_INTERVAL_S` seconds.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

#: Seconds between two progress lines when stderr is not a terminal.
FILE_INTERVAL_S = 30.0


class _Lines:
    """A text stream for tqdm that ends every bar update with a newline instead of starting it with ``\\r``."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "")
        if text.strip():
            self.stream.write(text if text.endswith("\n") else text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(**kwargs: Any) -> Any:
    """A tqdm bar on stderr (``kwargs`` as tqdm's): a line per update, throttled, when stderr is no terminal."""
    from tqdm import tqdm

    stream = sys.stderr
    if stream.isatty():
        return tqdm(**{"dynamic_ncols": True, **kwargs}, file=stream)
    return tqdm(**{"mininterval": FILE_INTERVAL_S, "ncols": 100, **kwargs}, file=_Lines(stream))
