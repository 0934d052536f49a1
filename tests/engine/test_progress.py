"""Progress written to a file (a Slurm log) is a line per update; on a terminal it stays tqdm's bar.

Under Slurm, tqdm's carriage returns made a whole run one line, which ``tail -f`` showed only at the
end, with log records glued onto it.
"""

from __future__ import annotations

import io
import sys

import pytest

from engine.progress import progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_file_gets_a_line_per_update_and_a_terminal_the_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    bar = progress_bar(total=3, desc="sft", unit="step", mininterval=0)
    for _ in range(3):
        bar.update(1)
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) >= 3, lines
    assert lines[-1].startswith("sft: 100%") and "3/3" in lines[-1], lines

    log = io.StringIO()  # the trainer refreshes its bar every step: at most a line per interval, and the end
    monkeypatch.setattr(sys, "stderr", log)
    bar = progress_bar(total=50, desc="sft", unit="step")
    for step in range(50):
        bar.update(1)
        bar.set_postfix(loss=float(step))
    bar.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("sft:   0%") and "50/50" in lines[1], lines

    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    bar = progress_bar(total=3, desc="sft", unit="step")
    bar.update(3)
    bar.close()
    assert "\r" in terminal.getvalue()
