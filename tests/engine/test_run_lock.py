"""One run per run directory: a live run's lock refuses a second one on every rank, before any work; the lock of
a run that is gone (killed on this host, or the same Slurm job requeued) is taken over; a run releases its own."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from engine.run_lock import LOCK_NAME, acquire, gone_because, holder_record
from tests.helpers import keel_train

ARGS = ["data.num_samples=16", "data.seq_length=64", "data.micro_batch_size=2", "data.global_batch_size=4",
        "run.train_steps=1", "logging.progress=false", "logging.tensorboard=false", "checkpoint.resume=none"]


def _lock(run: Path, pid: int, host: str = "", job: str | None = None) -> None:
    run.mkdir(parents=True, exist_ok=True)
    record = {**holder_record(), "host": host or socket.gethostname(), "pid": pid, "slurm_job": job,
              "started": "2026-12-04 09:00:00", "command": "keel train sft run.output_dir=elsewhere"}
    (run / LOCK_NAME).write_text(json.dumps(record) + "\n")


def test_a_live_runs_directory_is_refused_and_a_dead_runs_lock_taken_over(tmp_path: Path) -> None:
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        _lock(run, holder.pid)
        proc = keel_train(2, [*ARGS, f"run.output_dir={run}"], check=False)
        expected = (f"keel: configuration error: run.output_dir={run} is in use by another run: process {holder.pid} "
                    f"on host {socket.gethostname()}, started 2026-12-04 09:00:00, command: keel train sft")
        assert proc.returncode != 0 and proc.stderr.count(expected) == 2, proc.stderr[-3000:]  # on both ranks
        assert f"delete {run / LOCK_NAME}" in proc.stderr and "/engine/" not in proc.stderr
        assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    proc = keel_train(1, [*ARGS, f"run.output_dir={run}"])  # its holder has ended since
    assert f"took over the lock of an earlier run (process {holder.pid} of this host has ended)" in proc.stderr
    assert (run / "metrics.jsonl").is_file() and not (run / LOCK_NAME).exists()  # released at exit
    # the same command again: the run is finished (it said 'steps 2..1 of 1')
    config = (run / "config.yaml").read_text()
    again = keel_train(1, [*ARGS[:-1], f"run.output_dir={run}", "optimizer.lr=0.5"]).stdout
    assert (run / "config.yaml").read_text() == config  # no step trained at lr 0.5: the run's record stays
    assert "  nothing to train: the run resumed at step 1 of 1, its last; raise run.train_steps to train on, or " \
           "start afresh with checkpoint.resume=none" in again, again


def test_who_may_take_a_lock_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    me = holder_record()
    parent = {**me, "pid": os.getppid()}  # alive
    assert gone_because(parent, me) is None
    assert gone_because({**parent, "host": "another-node"}, me) is None  # cannot be checked from here
    assert gone_because(me, me) == "this process"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    ended = {**me, "pid": int(dead.stdout)}
    assert gone_because(ended, me) == f"process {ended['pid']} of this host has ended"
    # a container with the same host name but its own PID namespace: its processes are not visible from here
    assert gone_because({**ended, "pid_namespace": "pid:[1]"}, me) is None
    assert gone_because({**me, "pid_namespace": "pid:[1]"}, me) is None  # its PID 1 is not this PID 1

    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    step = holder_record()  # another step of the same allocation (salloc, a second srun): not a requeue
    assert gone_because({**parent, "host": "another-node", "slurm_job": "4242", "slurm_restart": 0}, step) is None
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    requeued = holder_record()
    assert gone_because({**parent, "host": "another-node", "slurm_job": "4242", "slurm_restart": 0}, requeued) == \
        "the same Slurm job 4242, requeued"
    assert gone_because({**parent, "slurm_job": "4243", "slurm_restart": 0}, requeued) is None


def test_acquire_release_and_a_directory_that_cannot_be_locked(tmp_path: Path) -> None:
    from engine.run_lock import release_held

    assert acquire(tmp_path) is None and acquire(tmp_path) is None  # a process may enter its own run again
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    release_held()  # the end of an in-process run: another process may take the directory now
    assert not (tmp_path / LOCK_NAME).exists() and not list(tmp_path.iterdir())
    _lock(tmp_path / "other", os.getppid(), host="another-node")
    assert "process" in str(acquire(tmp_path / "other")) and "on host another-node" in str(acquire(tmp_path / "other"))
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / LOCK_NAME).write_text('{"host": ')  # written by hand, half: nobody's lock
    assert acquire(tmp_path / "torn") is None
    assert json.loads((tmp_path / "torn" / LOCK_NAME).read_text())["pid"] == os.getpid()
    (tmp_path / "a-file").write_text("")
    assert f"run.output_dir={tmp_path / 'a-file' / 'run'}: cannot take its lock" in str(acquire(tmp_path / "a-file" / "run"))
    release_held()


def test_two_runs_taking_over_one_dead_lock_do_not_both_go_ahead(tmp_path: Path) -> None:
    """Both found the same dead holder; each replaced the lock with its own, and both trained. The takeover
    now happens under ``<lock>.takeover`` and only while the lock is still the one that was judged."""
    from engine.run_lock import _read, _take_over

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _lock(tmp_path, int(dead.stdout))
    lock, mark = tmp_path / LOCK_NAME, tmp_path / f"{LOCK_NAME}.takeover"
    seen = _read(lock)

    def partial() -> Path:
        path = tmp_path / "mine"
        path.write_text(json.dumps(holder_record()) + "\n")
        return path

    _lock(tmp_path, os.getppid())  # the other run took it over first, between this one's look and its takeover
    refused = _take_over(lock, partial(), seen)
    assert refused is not None and f"in use by another run: process {os.getppid()}" in refused
    assert _read(lock)["pid"] == os.getppid() and not mark.exists()

    _lock(tmp_path, int(dead.stdout))
    mark.write_text("")  # the other run is in the middle of its takeover
    assert "another run is taking over its lock right now" in str(_take_over(lock, partial(), seen))
    os.utime(mark, (0, 0))  # ... or crashed in it, long ago
    assert _take_over(lock, partial(), seen) is None
    assert _read(lock)["pid"] == os.getpid() and not mark.exists()

    lock.unlink()  # deleted by hand meanwhile: taken as a fresh lock
    assert _take_over(lock, partial(), seen) is None and _read(lock)["pid"] == os.getpid()


def test_a_checkpoint_dir_outside_the_run_directory_is_locked_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs of their own run.output_dir but one checkpoint.dir wrote and resumed each other's checkpoints."""
    from types import SimpleNamespace

    from engine.checkpoint.dist import set_aside
    from engine.errors import ConfigError
    from engine.run_lock import lock_run_dir, release_held

    shared = tmp_path / "shared-checkpoints"
    _lock(shared, os.getppid())  # a live run of another run directory holds it
    with pytest.raises(ConfigError, match=rf"^checkpoint.dir={shared} is in use by another run: process "
                                          rf"{os.getppid()} .* set another checkpoint.dir;"):
        lock_run_dir(tmp_path / "run-b", True, shared)
    assert not (tmp_path / "run-b" / LOCK_NAME).exists(), "the run directory's lock is given back"
    (shared / LOCK_NAME).unlink()

    lock_run_dir(tmp_path / "run-b", True, shared)
    assert json.loads((shared / LOCK_NAME).read_text())["pid"] == os.getpid()
    (shared / "step_0000002").mkdir()  # an earlier run's checkpoint: a fresh run moves the directory aside...
    import torch.distributed as dist

    monkeypatch.setattr(dist, "barrier", lambda *args, **kwargs: None)  # one process, no process group
    earlier = set_aside(str(shared), None, SimpleNamespace(is_main=True))
    assert earlier is not None and (earlier / "step_0000002").is_dir()
    assert json.loads((shared / LOCK_NAME).read_text())["pid"] == os.getpid()  # ... and keeps its lock
    release_held()
    assert not (shared / LOCK_NAME).exists() and not (tmp_path / "run-b" / LOCK_NAME).exists()
    lock_run_dir(tmp_path / "run-c", True, tmp_path / "run-c" / "checkpoints")  # inside: one lock is enough
    assert not (tmp_path / "run-c" / "checkpoints").exists()
    release_held()


def test_a_checkpoint_dir_in_a_live_runs_directory_is_refused(tmp_path: Path) -> None:
    """Run B with checkpoint.dir=<run A>/checkpoints (A running) locked only that directory, which A never had
    locked: with checkpoint.resume=none B moved A's checkpoints aside and wrote its own among A's."""
    from engine.errors import ConfigError
    from engine.run_lock import lock_run_dir, release_held

    run_a = tmp_path / "run-a"
    _lock(run_a, os.getppid())  # A is alive and holds its run directory
    with pytest.raises(ConfigError, match=rf"^checkpoint.dir={run_a / 'checkpoints'} lies in {run_a}, which another "
                                          rf"run holds: process {os.getppid()} .*Set a checkpoint.dir of this run's own"):
        lock_run_dir(tmp_path / "run-b", True, run_a / "checkpoints")
    assert not (tmp_path / "run-b" / LOCK_NAME).exists() and not (run_a / "checkpoints" / LOCK_NAME).exists()
    # B's checkpoint.dir is A's own run directory's default, and B uses it as its own: also A's
    with pytest.raises(ConfigError, match="which another run holds"):
        lock_run_dir(run_a / "nested-b", True, run_a / "nested-b" / "checkpoints")
    release_held()
    (run_a / LOCK_NAME).unlink()  # A has ended: B may use the directory
    lock_run_dir(tmp_path / "run-b", True, run_a / "checkpoints")
    release_held()


def test_a_run_directory_that_is_a_file_is_named_so(tmp_path: Path) -> None:
    taken = tmp_path / "afile"
    taken.write_text("x")
    assert acquire(taken) == f"run.output_dir={taken} is a file: give a directory (it is made if it does not exist)"
