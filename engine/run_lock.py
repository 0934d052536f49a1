"""One training run per run directory: a lock file that global rank 0 holds while the run lives.

Two runs started on one ``run.output_dir`` (a second terminal, a job submitted twice) wrote into each
other's ``metrics.jsonl`` and checkpoints, and the resume of either read the other's state. The lock
is ``<run dir>/.keel-run.lock``, a JSON line naming who holds it. A lock is taken over, with a warning,
when its holder is known to be gone: a process of this host (and PID namespace: containers may share a
host name) that no longer runs (a run killed with SIGKILL), or the same Slurm job with a higher
``SLURM_RESTART_COUNT`` (requeued after preemption, maybe on another node; the steps of one allocation
share the job id). Any other lock refuses the run before any work, saying who holds it and how to go on.
Two runs that judge the same dead lock at once take it over one at a time (:func:`_take_over`): the
second finds the first one's lock and is refused by it.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch.distributed as dist

from engine.errors import ConfigError

logger = logging.getLogger(__name__)

LOCK_NAME = ".keel-run.lock"


_HELD: list[Path] = []  # the locks this process holds (released at exit, or by release_held)


def _pid_namespace() -> Optional[str]:
    try:
        return os.readlink("/proc/self/ns/pid")  # containers sharing the host name see other processes
    except OSError:
        return None


def holder_record() -> dict[str, Any]:
    """What this process writes into the lock."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_namespace": _pid_namespace(),
            "slurm_job": os.environ.get("SLURM_JOB_ID"), "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def gone_because(holder: dict[str, Any], me: dict[str, Any]) -> Optional[str]:
    """Why the lock's ``holder`` no longer runs (so the lock may be taken over), or None when it may still run."""
    here = holder.get("host") == me["host"] and holder.get("pid_namespace") == me["pid_namespace"]
    if here and holder.get("pid") == me["pid"]:
        return "this process"
    restart = holder.get("slurm_restart")
    if me["slurm_job"] and holder.get("slurm_job") == me["slurm_job"] and isinstance(restart, int) \
            and me["slurm_restart"] > restart:  # steps of one allocation share the job id, not its restart count
        return f"the same Slurm job {me['slurm_job']}, requeued"
    pid = holder.get("pid")
    if here and isinstance(pid, int) and not _running(pid):
        return f"process {pid} of this host has ended"
    return None


def acquire(run_dir: str | Path, setting: str = "run.output_dir") -> Optional[str]:
    """Take the lock of ``run_dir`` for this process (released when it exits); the reason it cannot, else None.
    Messages name the directory as ``setting``."""
    path = Path(run_dir) / LOCK_NAME
    if Path(run_dir).is_file():
        return f"{setting}={run_dir} is a file: give a directory (it is made if it does not exist)"
    me = holder_record()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{LOCK_NAME}.{me['host']}.{me['pid']}")
        partial.write_text(json.dumps(me) + "\n")
        try:
            os.link(partial, path)  # created whole or not at all: a reader never sees an empty lock
        except FileExistsError:
            holder = _read(path)
            reason = gone_because(holder, me) if holder else "the lock file is unreadable"
            if reason is None:
                partial.unlink(missing_ok=True)
                return refusal(path, holder, setting)
            if reason != "this process":
                problem = _take_over(path, partial, holder, setting)
                if problem:
                    partial.unlink(missing_ok=True)
                    return problem
                logger.warning("run directory %s: took over the lock of an earlier run (%s)", path.parent, reason)
            else:
                os.replace(partial, path)
        partial.unlink(missing_ok=True)
    except OSError as exc:
        return f"{setting}={path.parent}: cannot take its lock {path}: {exc.strerror or exc}"
    if path not in _HELD:
        _HELD.append(path)
    return None


TAKEOVER_STALE_S = 30.0  # a takeover takes milliseconds: its mark left this long is a crashed one's


def _take_over(path: Path, partial: Path, seen: dict[str, Any], setting: str = "run.output_dir") -> Optional[str]:
    """Replace the lock ``path`` of a gone holder (``seen`` as read) with ``partial``; the reason it cannot, else
    None. Two runs that found the same dead lock would both replace it: the one that creates
    ``<lock>.takeover`` first does, after checking that the lock is still the one it judged; the other then
    finds the winner's lock and is refused by it."""
    mark = path.with_name(f"{LOCK_NAME}.takeover")
    try:
        os.link(partial, mark)
    except FileExistsError:
        try:
            stale = time.time() - mark.stat().st_mtime > TAKEOVER_STALE_S
        except FileNotFoundError:
            stale = True  # finished meanwhile: the lock is judged again below
        if not stale:
            return (f"{setting}={path.parent}: another run is taking over its lock right now ({mark}); "
                    "start this one again in a moment")
        mark.unlink(missing_ok=True)
        os.link(partial, mark)
    try:
        if not path.exists():  # deleted by hand since it was read: a fresh lock, unless another run's is first
            try:
                os.link(partial, path)
                return None
            except FileExistsError:
                pass
        current = _read(path)
        if current != seen:  # another run took it over since it was read
            return refusal(path, current, setting)
        os.replace(partial, path)
        return None
    finally:
        mark.unlink(missing_ok=True)


def _read(path: Path) -> dict[str, Any]:
    try:
        holder = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def release_held() -> None:
    """Release every lock this process holds: at exit, and where a run ends without Python's exit handlers
    (:func:`engine.parallel.failures._exit_now`) or returns in-process."""
    while _HELD:
        release(_HELD.pop(), os.getpid())


atexit.register(release_held)


def refusal(path: Path, holder: dict[str, Any], setting: str = "run.output_dir") -> str:
    """The one-line reason a run cannot use ``path``'s run directory."""
    return (f"{setting}={path.parent} is in use by another run: {_who(holder)}, started {holder.get('started')}, "
            f"command: {holder.get('command')}. Wait for it to end or set another {setting}; if that run "
            f"is gone (its host was lost), delete {path}")


def _who(holder: dict[str, Any]) -> str:
    return (f"process {holder.get('pid')} on host {holder.get('host')}"
            + (f" (Slurm job {holder['slurm_job']})" if holder.get("slurm_job") else ""))


def release(path: Path, pid: int) -> None:
    """Remove the lock if this process still holds it."""
    holder = _read(path)
    if holder.get("pid") == pid and holder.get("host") == socket.gethostname() \
            and holder.get("pid_namespace") == _pid_namespace():
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass


def lock_run_dir(run_dir: str | Path, is_main: bool, checkpoint_dir: Optional[str | Path] = None) -> None:
    """Global rank 0 takes the run directory's lock, and ``checkpoint_dir``'s when it lies outside the run
    directory (two runs of their own output directories but one checkpoint.dir would write and resume each
    other's checkpoints); every rank raises the same :class:`ConfigError` when it cannot (a collective where a
    process group is up)."""
    problem = acquire(run_dir) if is_main else None
    if is_main and problem is None and checkpoint_dir is not None and not _inside(checkpoint_dir, run_dir):
        problem = acquire(checkpoint_dir, "checkpoint.dir")
    if is_main and problem is None and checkpoint_dir is not None:
        problem = _live_lock_above(Path(checkpoint_dir))
    if problem:
        release_held()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [problem]
        dist.broadcast_object_list(box, src=0)
        problem = box[0]
    if problem:
        raise ConfigError(problem)


def _live_lock_above(checkpoint_dir: Path) -> Optional[str]:
    """The refusal when ``checkpoint_dir`` or a directory above it is another live run's (its run directory, or
    its checkpoint.dir): a checkpoint.dir inside a running run's directory took that run's checkpoints aside
    (``checkpoint.resume=none``) or wrote among them, since each run locked only its own directories."""
    me = holder_record()
    for directory in (checkpoint_dir.resolve(), *checkpoint_dir.resolve().parents):
        lock = directory / LOCK_NAME
        holder = _read(lock) if lock.is_file() else {}
        if holder and gone_because(holder, me) is None:
            if directory == checkpoint_dir.resolve():
                return refusal(lock, holder, "checkpoint.dir")
            return (f"checkpoint.dir={checkpoint_dir} lies in {directory}, which another run holds: {_who(holder)}, "
                    f"started {holder.get('started')}, command: {holder.get('command')}. Set a checkpoint.dir of "
                    f"this run's own; if that run is gone (its host was lost), delete {lock}")
    return None


def _inside(path: str | Path, root: str | Path) -> bool:
    return Path(path).resolve().is_relative_to(Path(root).resolve())
