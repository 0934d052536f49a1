"""A pool of reward worker processes that never stalls the job.

Each batch is cut into one chunk per worker (one message each way per chunk, not per row).
A call that overruns its timeout is interrupted inside the worker; one that cannot be
interrupted (stuck in C code) is found through the worker's progress page and the worker
is killed and replaced. A worker that dies in a call blames that call. Either way the
chunk is sent again without the failed call, so every other row still gets its values.
Workers live until :meth:`WorkerPool.close` (or the pool is garbage-collected).
"""

from __future__ import annotations

import logging
import mmap
import os
import pickle
import subprocess
import sys
import tempfile
import time
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Optional

import engine
from engine.rewards.worker import PROGRESS, WHOLE_CALL, FunctionSpec, Problem, RewardError, Row, Task, Value

logger = logging.getLogger(__name__)

KILL_GRACE_SECONDS = 1.0  # past a call's timeout before its worker is killed (the in-worker interrupt comes first)
POLL_SECONDS = 0.05
START_TIMEOUT_SECONDS = 120.0
MAX_DEATHS_OUTSIDE_CALLS = 2
_LAUNCH = "import sys; from engine.rewards.worker import main; sys.exit(main(sys.argv[1:]))"


@dataclass(frozen=True)
class Failure:
    """A failed call over whole-batch ``rows`` (one row, or every row of a batched call)."""

    function: int
    rows: tuple[int, ...]
    kind: str  # "error" | "timeout" | "invalid"
    message: str


def failures_of(task: Task, problems: Sequence[Problem]) -> list[Failure]:
    """``problems`` of ``task`` with rows counted in the whole batch (a batched call's: all its rows)."""
    every_row = tuple(range(task.start, task.start + len(task.rows)))
    return [Failure(problem.function, every_row if problem.row == WHOLE_CALL else (task.start + problem.row,),
                    problem.kind, problem.message) for problem in problems]


class _Worker:
    """One worker process, its two pipes, its progress page and the task it is on."""

    def __init__(self, init: dict[str, Any]):
        to_child, from_parent = os.pipe()
        to_parent, from_child = os.pipe()
        with tempfile.TemporaryFile() as page:
            page.truncate(PROGRESS.size)
            self.progress = mmap.mmap(page.fileno(), PROGRESS.size)
            fds = (to_child, from_child, page.fileno())
            root = os.path.dirname(os.path.dirname(os.path.abspath(engine.__file__)))
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
            self.proc = subprocess.Popen([sys.executable, "-c", _LAUNCH, *map(str, fds)], pass_fds=fds, env=env,
                                         stdin=subprocess.DEVNULL)
        os.close(to_child)
        os.close(from_child)
        self.inbox = Connection(from_parent, readable=False)  # parent -> worker
        self.outbox = Connection(to_parent, writable=False)  # worker -> parent
        self.task: Optional[Task] = None
        self.ready = False
        self.inbox.send(init)

    def current_call(self) -> Optional[tuple[float, int, int]]:
        """(start, function, row) of the call the worker is in, or None between calls."""
        first = PROGRESS.unpack_from(self.progress, 0)
        second = PROGRESS.unpack_from(self.progress, 0)
        return first if first == second and first[0] > 0 else None

    def stop(self, kill: bool = False) -> None:
        if not kill:
            try:
                self.inbox.send(None)
                self.proc.wait(timeout=2.0)
            except (OSError, subprocess.TimeoutExpired):
                kill = True
        if kill and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for closable in (self.inbox, self.outbox, self.progress):
            closable.close()


def _stop_all(workers: list[_Worker]) -> None:
    for worker in workers:
        worker.stop()
    workers.clear()


class WorkerPool:
    """``size`` worker processes calling ``specs``; :meth:`run` scores a batch of rows."""

    def __init__(self, specs: Sequence[FunctionSpec], size: int, kill_grace: float = KILL_GRACE_SECONDS):
        if size < 1:
            raise ValueError(f"a worker pool needs at least one worker, got {size}")
        self.specs = list(specs)
        self.size = size
        self.kill_grace = kill_grace
        self.replaced = 0  # workers killed or found dead and replaced, over the pool's life
        self._init = {"sys_path": list(sys.path), "functions": pickle.dumps(self.specs)}
        self._workers: list[_Worker] = []
        self._next_task = 0
        self._finalizer = weakref.finalize(self, _stop_all, self._workers)

    def start(self) -> None:
        """Start the workers and wait until each has imported every reward function."""
        if self._workers:
            return
        self._workers.extend(_Worker(self._init) for _ in range(self.size))
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not all(worker.ready for worker in self._workers):
            if time.monotonic() > deadline:
                self.close()
                raise RewardError(f"reward workers did not start within {START_TIMEOUT_SECONDS:g} s")
            waiting = [worker.outbox for worker in self._workers if not worker.ready]
            for worker in self._by_conn(wait(waiting, timeout=1.0)):
                self._expect_ready(worker)

    def close(self) -> None:
        """Stop every worker (a later :meth:`run` starts new ones)."""
        _stop_all(self._workers)

    def _by_conn(self, conns: list[Any]) -> list[_Worker]:
        return [worker for worker in self._workers if worker.outbox in conns]

    def _expect_ready(self, worker: _Worker) -> None:
        try:
            kind, detail = worker.outbox.recv()
        except (EOFError, OSError):
            kind, detail = "failed", f"the worker exited with code {worker.proc.wait()}"
        if kind == "failed":
            self.close()
            raise RewardError(f"a reward worker could not load the reward functions: {detail}")
        worker.ready = True

    def run(self, rows: Sequence[Row]) -> tuple[list[list[Optional[Value]]], list[Failure]]:
        """Values ``[function][row]`` (None where a call failed) and the failures, for every row."""
        self.start()
        values: list[list[Optional[Value]]] = [[None] * len(rows) for _ in self.specs]
        failures: list[Failure] = []
        pending = deque(self._chunks(rows))
        while pending or any(worker.task is not None for worker in self._workers):
            self._dispatch(pending)
            busy = [worker.outbox for worker in self._workers if worker.task is not None]
            for worker in self._by_conn(wait(busy, timeout=POLL_SECONDS)):
                self._receive(worker, values, failures, pending)
            self._watchdog(pending)
        return values, failures

    def _chunks(self, rows: Sequence[Row]) -> list[Task]:
        size = max(1, -(-len(rows) // self.size))
        tasks = []
        for start in range(0, len(rows), size):
            tasks.append(Task(self._next_task, start, list(rows[start:start + size])))
            self._next_task += 1
        return tasks

    def _dispatch(self, pending: deque[Task]) -> None:
        for index, worker in enumerate(self._workers):
            if worker.task is not None or not pending:
                continue
            if worker.proc.poll() is not None:  # died while idle (e.g. killed from outside)
                worker = self._replace(index)
            worker.task = pending.popleft()
            try:
                worker.inbox.send(worker.task)
            except OSError:
                task, worker.task = worker.task, None
                pending.appendleft(task)
                self._replace(index)

    def _receive(self, worker: _Worker, values: list[list[Optional[Value]]], failures: list[Failure],
                 pending: deque[Task]) -> None:
        try:
            kind, result = worker.outbox.recv()
        except (EOFError, OSError):
            self._lost(worker, pending, killed=False)
            return
        if kind == "failed":
            self.close()
            raise RewardError(f"a reward worker could not load the reward functions: {result}")
        if kind == "ready":  # a replacement worker, already given its task
            worker.ready = True
            return
        task, worker.task = worker.task, None
        assert task is not None and result.task_id == task.task_id
        for function, column in enumerate(result.values):
            values[function][task.start:task.start + len(column)] = column
        failures += failures_of(task, task.known + result.problems)

    def _watchdog(self, pending: deque[Task]) -> None:
        now = time.monotonic()
        for worker in list(self._workers):
            call = worker.current_call() if worker.task is not None else None
            if call is not None and now - call[0] > self.specs[call[1]].timeout_seconds + self.kill_grace:
                self._lost(worker, pending, killed=True)

    def _lost(self, worker: _Worker, pending: deque[Task], killed: bool) -> None:
        """``worker`` hung (``killed``) or died: blame its current call, replace it, resend its task."""
        call = worker.current_call()
        task = worker.task
        index = self._workers.index(worker)
        self._replace(index)
        if task is None:
            return
        if call is None:
            task.deaths += 1
            if task.deaths > MAX_DEATHS_OUTSIDE_CALLS:
                self.close()
                raise RewardError(f"reward workers died {task.deaths} times outside any reward call "
                                  f"(last exit code {worker.proc.returncode}); see their output above")
        else:
            _, function, row = call
            spec = self.specs[function]
            message = (f"hung past {spec.timeout_seconds:g} s without responding to the interrupt; its worker was "
                       "killed and replaced" if killed else
                       f"its worker process died during the call (exit code {worker.proc.returncode})")
            task.known.append(Problem(function, row, "timeout" if killed else "error", message))
            task.skip.add((function, row))
        pending.appendleft(task)

    def _replace(self, index: int) -> _Worker:
        self._workers[index].stop(kill=True)
        self._workers[index] = _Worker(self._init)
        self.replaced += 1
        logger.info("replaced reward worker %d (%d replaced so far)", index, self.replaced)
        return self._workers[index]
