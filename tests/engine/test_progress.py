"""Progress written to a file (a Slurm log) is a line per update; on a terminal it stays tqdm's bar.

Under Slurm, tqdm's carriage returns made a whole run one line, which ``tail -f`` showed only at the
end, with log records glued onto it.
"""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Callable, Iterator

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


@pytest.fixture
def keel_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[io.StringIO, str], logging.Logger]]:
    """Keel's stderr handler on ``stream`` as rank ``rank``; removed afterwards with the root level restored."""
    from engine.runtime import setup_logging

    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)

    def install(stream: io.StringIO, rank: str) -> logging.Logger:
        monkeypatch.setattr(sys, "stderr", stream)
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", "2")
        setup_logging("INFO")
        return logging.getLogger("engine.trial")

    yield install
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    root.setLevel(level)


def test_a_log_record_goes_above_the_bar_on_a_terminal(keel_logging: Callable[[io.StringIO, str], logging.Logger]
                                                       ) -> None:
    """It was written where the cursor stood, at the end of the bar's line: '... 5.94step/s][09:44:20 rank0 ..."""
    terminal = _Terminal()
    logger = keel_logging(terminal, "0")
    bar = progress_bar(total=3, desc="sft", unit="step", mininterval=0)
    bar.update(1)
    logger.info("saved checkpoint step_1")
    bar.update(2)
    bar.close()
    logger.info("after the bar")
    text = terminal.getvalue()
    before, after = text.split("saved checkpoint step_1\n")
    assert before.rsplit("\r", 1)[1].startswith("[") and "rank0 engine.trial INFO] " in before, repr(text)
    assert after.startswith("\rsft:"), "the bar is drawn again below the record"
    assert text.endswith("\n") and "after the bar" in text.rsplit("\n", 2)[1]


def test_ranks_other_than_0_show_only_errors_and_their_own_warnings(
        keel_logging: Callable[[io.StringIO, str], logging.Logger]) -> None:
    """Every rank logged the same data warnings: two ranks' lines came out interleaved, each twice."""
    from engine.runtime import EVERY_RANK

    for rank, shown in (("1", ["SIGTERM received", "broken"]),
                        ("0", ["read 5 rows", "dropped 2 rows", "SIGTERM received", "broken"])):
        log = io.StringIO()
        logger = keel_logging(log, rank)
        logger.info("read 5 rows")
        logger.warning("dropped 2 rows")
        logger.warning("SIGTERM received", extra=EVERY_RANK)
        logger.error("broken")
        lines = log.getvalue().splitlines()
        assert [line.split("] ", 1)[1] for line in lines] == shown, lines
        assert all(f" rank{rank} engine.trial " in line for line in lines), lines
