"""What a rank does when another rank, or its launcher, fails.

* Another rank dies or hangs: the collectives of the survivors fail (gloo sees the closed
  connection at once; a hung rank is waited for ``parallel.timeout_minutes``, set on every
  process group). :func:`explain` turns that error into a :class:`RankFailure` whose
  message is one line naming what failed, and the CLI prints it and exits without
  tearing down the broken process groups (that teardown can block).
* The launcher dies (torchrun or srun killed with SIGKILL): its workers run in sessions
  of their own, so nothing else stops them, and they would wait in a rendezvous or a
  collective until the timeout. :func:`watch_launcher` starts a thread that notices the
  parent process is gone and ends the rank within about a second.

Restarts are the launcher's job (``torchrun --max-restarts``, Slurm ``--requeue``); a
restarted attempt resumes from the last checkpoint (``checkpoint.resume=auto``).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Optional

# Messages of collectives that failed because of another process: gloo raises plain RuntimeErrors
# (NCCL and the store raise torch.distributed.DistError subclasses).
_PEER_ERROR = re.compile(r"gloo|Connection (closed|reset) by peer|Timed out waiting|timed out connecting")


class RankFailure(RuntimeError):
    """This rank cannot continue because another rank (or the rendezvous) failed."""


def _short_reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", text)  # gloo's "[.../pair.cc:553] " source prefix
    return text.split(". This is typically")[0].rstrip(". ")


def is_peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective's (or the store's) error: another rank, or the rendezvous, failed."""
    import torch.distributed as dist

    from engine.rewards.worker import RewardError

    if isinstance(exc, RewardError):  # a reward function's own error ("connection reset" by a remote judge...)
        return False
    return isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and bool(_PEER_ERROR.search(str(exc))))


def restart_hint(checkpoint_dir: Optional[str], resume: str) -> str:
    """What a restart of this run would do, from the checkpoints on disk at the time of the failure."""
    from engine.checkpoint.dist import find_latest

    latest = find_latest(checkpoint_dir) if checkpoint_dir else None
    if resume == "none":
        return "a restart starts over (checkpoint.resume=none)" + (
            f"; with checkpoint.resume=auto it would continue from {latest}" if latest is not None else "")
    if latest is None and resume != "auto":
        return f"a restart resumes from checkpoint.resume={resume} again"
    if latest is None:
        return "no checkpoint has been written yet, so a restart starts from the beginning"
    return f"a restart with checkpoint.resume=auto continues from {latest}"


def explain(exc: BaseException, rank: int, timeout_minutes: float, where: str,
            restart: Optional[Callable[[], str]] = None) -> Optional[RankFailure]:
    """A :class:`RankFailure` for ``exc`` when it is another rank's failure, else ``None``; ``restart`` says
    what a restart would do (asked only then, so that it sees the checkpoints written until the failure)."""
    if not is_peer_failure(exc):
        return None
    after = "a restart with checkpoint.resume=auto continues from the last checkpoint, if one was written"
    if restart is not None:
        try:
            after = restart()
        except Exception:  # an unreadable checkpoint directory: the failure's own line matters more
            pass
    return RankFailure(
        f"rank {rank}: lost another rank {where} ({_short_reason(exc)}): it died, hung for longer than "
        f"parallel.timeout_minutes={timeout_minutes:g}, or lost its network; the rank that failed first is one "
        f"that printed no such line. Stopping; {after}."
    )


def watch_launcher(rank: int, poll_seconds: float = 1.0) -> threading.Thread:
    """End this process soon after its parent (torchrun, srun) is gone; returns the watching thread."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_seconds)
        _exit_now(f"keel: rank {rank}: its launcher (pid {parent}) is gone; stopping this orphaned rank")

    thread = threading.Thread(target=watch, name="keel-launcher-watch", daemon=True)
    thread.start()
    return thread


def _exit_now(line: str, code: int = 1) -> Any:
    """Write ``line`` to stderr and end the process at once (no atexit, no process-group teardown); the run
    directory's lock is released first, so that a restart (on any node) takes the directory."""
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # stderr was a pipe to the dead launcher
        pass
    try:
        from engine.run_lock import release_held

        release_held()
    except Exception:  # ending matters more than the lock: a restart on this host takes a dead process's lock
        pass
    os._exit(code)


def exit_on_failure(failure: RankFailure) -> Any:
    """Print ``failure`` as Keel's one line and end the process (its process groups are broken)."""
    return _exit_now(f"keel: {failure}")


@contextlib.contextmanager
def translated(rank: int, timeout_minutes: float, where: str,
               restart: Optional[Callable[[], str]] = None) -> Iterator[None]:
    """Re-raise another rank's failure inside the block as a one-line :class:`RankFailure`."""
    try:
        yield
    except Exception as exc:
        failure = explain(exc, rank, timeout_minutes, where, restart)
        if failure is None:
            raise
        raise failure from exc
