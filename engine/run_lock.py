"""One training run per run directory: a lock file that global rank 0 holds while the run lives.

Two runs started on one ``run.output_dir`` (a second terminal, a job submitted twice) wrote into each
other's ``metrics.jsonl`` and checkpoints, and the resume of either read the other's state. The lock
is ``<run dir>/.keel-run.lock``, a JSON line naming who holds it. A lock is taken over, with a warning,
when its holder is known to be gone: a process of this host that no longer runs (a run killed with
SIGKILL), or the same Slurm job (requeued after preemption, maybe on another node). Any other lock
refuses the run before any work, saying who holds it and how to go on.
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


def holder_record() -> dict[str, Any]:
    """What this process writes into the lock."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID"),
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
    """Why the lock's ``holder`` no longer runs (so the lock may be taken over), or None when it may."""
    if holder.get("host") == me["host"] and holder.get("pid") == me["pid"]:
        return "this process"
    if me["slurm_job"] and holder.get("slurm_job") == me["slurm_job"]:
        return f"the same Slurm job {me['slurm_job']}, started again"
    pid = holder.get("pid")
    if holder.get("host") == me["host"] and isinstance(pid, int) and not _running(pid):
        return f"process {pid} of this host has ended"
    return None


def acquire(run_dir: str | Path) -> Optional[str]:
    """Take the lock of ``run_dir`` for this process (released when it exits); the reason it cannot, else None."""
    path = Path(run_dir) / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    me = holder_record()
    try:
        with open(path, "x") as handle:
            handle.write(json.dumps(me) + "\n")
    except FileExistsError:
        try:
            holder = json.loads(path.read_text() or "{}")
        except (OSError, ValueError):
            holder = {}
        if not isinstance(holder, dict):
            holder = {}
        reason = gone_because(holder, me) if holder else "the lock file is unreadable"
        if reason is None:
            return refusal(path, holder)
        if reason != "this process":
            logger.warning("run directory %s: taking over the lock of an earlier run (%s)", path.parent, reason)
        partial = path.with_name(f"{LOCK_NAME}.{me['pid']}")
        partial.write_text(json.dumps(me) + "\n")
        os.replace(partial, path)
    atexit.register(release, path, me["pid"])
    return None


def refusal(path: Path, holder: dict[str, Any]) -> str:
    """The one-line reason a run cannot use ``path``'s run directory."""
    who = (f"process {holder.get('pid')} on host {holder.get('host')}"
           + (f" (Slurm job {holder['slurm_job']})" if holder.get("slurm_job") else ""))
    return (f"run.output_dir={path.parent} is in use by another run: {who}, started {holder.get('started')}, "
            f"command: {holder.get('command')}. Wait for it to end or set another run.output_dir; if that run "
            f"is gone (its host was lost), delete {path}")


def release(path: Path, pid: int) -> None:
    """Remove the lock if this process still holds it."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if isinstance(holder, dict) and holder.get("pid") == pid and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


def lock_run_dir(run_dir: str | Path, is_main: bool) -> None:
    """Global rank 0 takes the run directory's lock; every rank raises the same :class:`ConfigError` when it
    cannot (a collective where a process group is up)."""
    problem = acquire(run_dir) if is_main else None
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [problem]
        dist.broadcast_object_list(box, src=0)
        problem = box[0]
    if problem:
        raise ConfigError(problem)
