"""Evaluate reward functions on a chunk of rows; also the entry point of a reward worker process.

A worker is a fresh interpreter (``python -m engine.rewards.worker``), not a fork of the
trainer: it does not inherit torch's threads or GPU state and does not re-import the
training script, so it starts in a fraction of a second. It talks to the pool over two
pipes (pickled messages: one init message, then one task per chunk of rows) and writes the
call it is in — start time, function index, row — to a small shared page, which the pool
reads to find and kill a worker stuck in a call that ignores the timeout.

Inside the worker an interval timer interrupts a call that runs past its function's
``timeout_seconds`` (pure-Python hangs, sleeps), so most timeouts cost no new process.
"""

from __future__ import annotations

import math
import mmap
import pickle
import signal
import struct
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from numbers import Real
from typing import Any, Optional, Union

Value = Union[float, dict[str, float]]
Row = tuple[str, str, dict[str, Any]]  # (prompt, response, metadata)
PROGRESS = struct.Struct("=dii")  # call start (time.monotonic, 0 = between calls), function index, row
WHOLE_CALL = -1  # the row index of a problem that covers a batched call's every row


@dataclass(frozen=True)
class FunctionSpec:
    """What a worker needs to call one reward function (sent pickled; ``fn`` by reference)."""

    label: str
    fn: Callable[..., Any]
    kwargs: dict[str, Any]
    batched: bool
    timeout_seconds: float


@dataclass(frozen=True)
class Problem:
    """A failed call: function index, row (within the task; :data:`WHOLE_CALL` for a batched call),
    ``kind`` (``error``, ``timeout`` or ``invalid``) and a one-line message."""

    function: int
    row: int
    kind: str
    message: str


@dataclass
class Task:
    """A chunk of rows; ``skip`` holds (function, row) calls already known to hang (not retried)."""

    task_id: int
    start: int  # index of rows[0] in the whole batch
    rows: list[Row]
    skip: set[tuple[int, int]] = field(default_factory=set)
    known: list[Problem] = field(default_factory=list)  # problems found by the pool (kills, deaths in calls)
    deaths: int = 0  # worker deaths outside any call while on this task


@dataclass
class TaskResult:
    task_id: int
    values: list[list[Optional[Value]]]  # [function][row]; None where the call failed
    problems: list[Problem]


class RewardError(RuntimeError):
    """A reward function failed with ``on_error: raise``, or the reward workers cannot run."""


class CallTimeout(BaseException):
    """Raised inside a call that ran past its timeout (a BaseException, so ``except Exception`` in
    the reward function does not swallow it)."""


def check_value(value: Any) -> Value:
    """``value`` as a float, or a dict of floats; ``ValueError`` for NaN, inf or a non-number."""
    if isinstance(value, dict):
        if not value:
            raise ValueError("returned an empty dict")
        return {str(key): check_value(item) for key, item in value.items()}  # type: ignore[misc]
    if not isinstance(value, Real):
        raise ValueError(f"returned {type(value).__name__} {str(value)[:60]!r}, not a number")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"returned {number}")
    return number


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".splitlines()
    where = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    place = f" (at {where[0].filename}:{where[0].lineno})" if where else ""
    return (text[0] if text else type(exc).__name__)[:300] + place


class Evaluator:
    """Calls every function on a task's rows, function by function, catching each failure."""

    def __init__(self, specs: Sequence[FunctionSpec], progress: Optional[mmap.mmap] = None):
        self.specs = list(specs)
        self.progress = progress
        self._in_call: Optional[float] = None  # timeout of the running call, None between calls
        self._started = 0.0

    def _begin(self, function: int, row: int) -> None:
        self._started = time.monotonic()
        if self.progress is not None:
            PROGRESS.pack_into(self.progress, 0, self._started, function, row)
        self._in_call = self.specs[function].timeout_seconds

    def _end(self) -> None:
        self._in_call = None
        if self.progress is not None:
            PROGRESS.pack_into(self.progress, 0, 0.0, -1, -1)

    def _on_alarm(self, signum: int, frame: Any) -> None:
        limit = self._in_call
        if limit is not None and time.monotonic() - self._started > limit:
            self._in_call = None  # at most once per call
            raise CallTimeout()

    def _call(self, function: int, row: int, *args: Any) -> tuple[Any, Optional[Problem]]:
        spec = self.specs[function]
        self._begin(function, row)
        try:
            try:
                return spec.fn(*args, **spec.kwargs), None
            finally:
                self._end()
        except CallTimeout:
            return None, Problem(function, row, "timeout", f"took longer than {spec.timeout_seconds:g} s")
        except Exception as exc:
            return None, Problem(function, row, "error", _describe(exc))

    def _one_by_one(self, function: int, task: Task, values: list[Optional[Value]], problems: list[Problem]) -> None:
        for row, (prompt, response, metadata) in enumerate(task.rows):
            if (function, row) in task.skip:
                continue
            result, problem = self._call(function, row, prompt, response, metadata)
            if problem is None:
                try:
                    values[row] = check_value(result)
                except ValueError as exc:
                    problem = Problem(function, row, "invalid", str(exc))
            if problem is not None:
                problems.append(problem)

    def _batched(self, function: int, task: Task, values: list[Optional[Value]], problems: list[Problem]) -> None:
        if (function, WHOLE_CALL) in task.skip:
            return
        prompts, responses, metadatas = (list(column) for column in zip(*task.rows, strict=True))
        result, problem = self._call(function, WHOLE_CALL, prompts, responses, metadatas)
        if problem is None and (not isinstance(result, (list, tuple)) or len(result) != len(task.rows)):
            size = len(result) if isinstance(result, (list, tuple)) else type(result).__name__
            problem = Problem(function, WHOLE_CALL, "invalid", f"returned {size} values for {len(task.rows)} rows "
                              "(a batched function returns a list with one value per row)")
        if problem is not None:
            problems.append(problem)
            return
        for row, item in enumerate(result):
            try:
                values[row] = check_value(item)
            except ValueError as exc:
                problems.append(Problem(function, row, "invalid", str(exc)))

    def run(self, task: Task, use_alarm: bool = False) -> TaskResult:
        """Every function on every row of ``task``; ``use_alarm`` enforces timeouts (main thread only)."""
        values: list[list[Optional[Value]]] = [[None] * len(task.rows) for _ in self.specs]
        problems: list[Problem] = []
        if use_alarm and self.specs:
            tick = min(0.25, max(0.01, min(spec.timeout_seconds for spec in self.specs) / 10))
            signal.signal(signal.SIGALRM, self._on_alarm)
            signal.setitimer(signal.ITIMER_REAL, tick, tick)
        try:
            for function, spec in enumerate(self.specs):
                (self._batched if spec.batched else self._one_by_one)(function, task, values[function], problems)
        finally:
            if use_alarm:
                signal.setitimer(signal.ITIMER_REAL, 0, 0)
        return TaskResult(task.task_id, values, problems)


def serve(inbox: Connection, outbox: Connection, progress: mmap.mmap) -> int:
    """The worker loop: one init message (sys.path, pickled specs), then tasks until None or EOF."""
    try:
        init = inbox.recv()
        sys.path[:] = init["sys_path"] + [path for path in sys.path if path not in init["sys_path"]]
        specs = pickle.loads(init["functions"])
    except EOFError:
        return 0
    except BaseException as exc:  # an import error of a user module, most likely
        outbox.send(("failed", _describe(exc)))
        return 1
    outbox.send(("ready", None))
    evaluator = Evaluator(specs, progress)
    while True:
        try:
            task = inbox.recv()
        except EOFError:
            return 0
        if task is None:
            return 0
        outbox.send(("done", evaluator.run(task, use_alarm=True)))


def main(argv: Sequence[str]) -> int:
    read_fd, write_fd, progress_fd = (int(arg) for arg in argv)
    # Ctrl-C and a launcher's SIGTERM reach the whole process group. Both are the trainer's to handle: it finishes
    # its step, whose rows this worker may be scoring, checkpoints and closes the pool. A trainer that dies
    # outright closes the pipes, and the worker leaves at EOF.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    progress = mmap.mmap(progress_fd, PROGRESS.size)
    return serve(Connection(read_fd, writable=False), Connection(write_fd, readable=False), progress)


if __name__ == "__main__":  # run the imported module's main, so pickled results name engine.rewards.worker
    from engine.rewards.worker import main as _main

    sys.exit(_main(sys.argv[1:]))
