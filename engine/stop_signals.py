"""SIGTERM and Ctrl-C (SIGINT) stop a run cleanly: it finishes its current step, checkpoints and exits.

A cluster's pre-emption sends SIGTERM; a user at a terminal presses Ctrl-C. Both ask the trainers to stop
at the next point where every rank agrees (:meth:`engine.trainer.Trainer._stop_agreed`), so nothing
trained is lost and the same command resumes. A second Ctrl-C, pressed more than
:data:`REPEAT_S` seconds after the first, stops at once as Python's default does (no checkpoint): the
wait keeps the copy of the first one that ``torchrun`` forwards to its workers from counting as a second.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any, Optional

from engine.runtime import EVERY_RANK

logger = logging.getLogger(__name__)

REPEAT_S = 2.0
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """:meth:`install` sets the handlers (main thread only), :meth:`restore` puts the previous ones back; or use
    it as a context manager."""

    def __init__(self, intent: str = "will checkpoint after the current step and exit") -> None:
        self.intent = intent  # what the first signal's line says will happen
        self.received: Optional[str] = None  # the name of the first stop signal, once one came
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:  # a child forked with the handlers (megatron's checkpoint writers): SIGTERM
            return  # sent to the process group reaches it too; it finishes its part of the save, without a word
        now = time.monotonic()
        if self.received is None:
            self.received, self._first_at = signal.Signals(signum).name, now
            again = (f" (a second Ctrl-C more than {REPEAT_S:g} s after this one stops at once, without one)"
                     if signum == signal.SIGINT else "")
            logger.warning("%s received: %s%s", self.received, self.intent, again, extra=EVERY_RANK)
        elif signum == signal.SIGINT and now - self._first_at > REPEAT_S:
            raise KeyboardInterrupt

    def install(self) -> None:
        self._pid = os.getpid()
        for signum in SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: the caller's handlers stay
                break

    def restore(self, ignore: bool = False) -> None:
        """Put the previous handlers back; with ``ignore``, ignore the signals instead: the process is about to
        print another rank's failure and exit, and the launcher's SIGTERM that follows a rank's death must not
        end it first (SIGTERM's default) nor announce a checkpoint that will not come."""
        for signum, previous in self._previous.items():
            signal.signal(signum, signal.SIG_IGN if ignore else previous)
        self._previous.clear()

    def __enter__(self) -> StopSignals:
        self.install()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()
