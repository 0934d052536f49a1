"""A rank that dies, hangs, or loses its launcher, at TP2×DP2 through the real CLI.

* ``torchrun --max-restarts 1``, rank 3 SIGKILLed in the middle of step 5: the other ranks
  stop with one line each, torchrun restarts the job, it meets again in a fresh rendezvous
  (the previous attempt's addresses are not reused), resumes from the step-4 checkpoint and
  reproduces an uninterrupted run's losses bitwise.
* No restarts, no supervising launcher, rank 3 hung (SIGSTOP) in the middle of step 3: every
  other rank exits within ``parallel.timeout_minutes`` with one line naming the failure.
* The launcher is SIGKILLed: its workers (each in a session of its own) exit within seconds.

Each 4-rank launch costs ~20 s of imports on 2 cores; the file makes three plus a 2-rank one.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, _env, free_port, keel_train, launch, train_losses

BASE = [
    "data.num_samples=96", "data.seq_length=64", "data.micro_batch_size=2", "data.global_batch_size=8",
    "logging.progress=false", "logging.tensorboard=false", "optimizer.lr=0.003", "checkpoint.keep_last=0",
    "parallel.tensor=2", "run.train_steps=8", "checkpoint.save_interval=2",
]
ONE_LINE = "lost another rank during training ("


def _logged_losses(run: Path) -> list[tuple[int, float]]:
    """Every (step, loss) record of metrics.jsonl (a resumed attempt first drops records after its checkpoint)."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["lm_loss"]) for r in map(json.loads, lines) if r["split"] == "train"]


def test_killed_rank_restarts_resumes_and_matches_bitwise(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    keel_train(4, BASE + [f"run.output_dir={reference}"])
    run = tmp_path / "run"
    proc = launch(4, ["--max-restarts", "1", "-m", "engine", "train", "sft", *BASE, f"run.output_dir={run}"],
                  env={"KEEL_FAULT": "in-step:5:KILL:3"}, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert "keel: rank 3" not in output, "rank 3 is SIGKILLed: it cannot say anything"
    for rank in (0, 1, 2):  # torchrun SIGTERMs them too: ignored once their collective broke, the line comes
        lines = [line for line in output.splitlines() if line.startswith(f"keel: rank {rank}: ")]
        assert len(lines) == 1 and ONE_LINE in lines[0], f"rank {rank}: {lines}"
        assert lines[0].endswith(f"continues from {run / 'checkpoints' / 'step_0000004'}."), lines[0]
    assert "resumed from" in output and "step_0000004 at step 4" in output
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000008"
    logged = _logged_losses(run)
    assert [step for step, _ in logged] == [1, 2, 3, 4, 5, 6, 7, 8], "step 5 is killed before it is logged"
    assert dict(logged) == train_losses(reference)  # bitwise, every step 1..8


def _start_rank(rank: int, port: int, run: Path, log: Path, extra: list[str]) -> subprocess.Popen[bytes]:
    env = _env({"RANK": str(rank), "WORLD_SIZE": "4", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port), "KEEL_FAULT": "in-step:3:STOP:3"})
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "engine", "train", "sft", *BASE, *extra,
                                 f"run.output_dir={run}"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def test_without_restarts_every_rank_stops_within_the_timeout(tmp_path: Path) -> None:
    timeout_s = 18.0
    port = free_port()
    logs = [tmp_path / f"rank{rank}.log" for rank in range(4)]
    ranks = [_start_rank(rank, port, tmp_path / "run", logs[rank], [f"parallel.timeout_minutes={timeout_s / 60}"])
             for rank in range(4)]
    try:
        deadline = time.monotonic() + 300
        while os.waitpid(ranks[3].pid, os.WNOHANG | os.WUNTRACED) == (0, 0):  # until rank 3 stops itself
            assert time.monotonic() < deadline and all(r.poll() is None for r in ranks[:3]), "no rank hung"
            time.sleep(0.05)
        hung_at = time.monotonic()
        codes = [r.wait(timeout=timeout_s + 60) for r in ranks[:3]]
        waited = time.monotonic() - hung_at
        assert ranks[3].poll() is None, "the hung rank must still be there: the others stopped on their own"
    finally:
        for r in ranks:
            r.kill()
            r.wait()
    texts = [log.read_text() for log in logs[:3]]
    for rank, (code, text) in enumerate(zip(codes, texts, strict=True)):
        lines = [line for line in text.splitlines() if line.startswith("keel: ")]
        assert code == 1 and len(lines) == 1, f"rank {rank} exit {code}:\n{text[-3000:]}"
        assert lines[0].startswith(f"keel: rank {rank}: {ONE_LINE}") and "parallel.timeout_minutes=0.3" in lines[0]
        assert lines[0].endswith("continues from " + str(tmp_path / "run" / "checkpoints" / "step_0000002") + ".")
        assert "Traceback" not in text, text[-3000:]
    # Rank 2 waits on rank 3 in the tensor-parallel all-reduce: megatron's group has the timeout too.
    assert "Timed out" in texts[2], texts[2][-3000:]
    assert waited < timeout_s + 20, f"the ranks took {waited:.0f} s to stop (timeout {timeout_s:.0f} s)"


def test_workers_stop_when_the_launcher_is_killed(tmp_path: Path) -> None:
    import psutil

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "engine", "train", "sft", *BASE[:-3],
           "run.train_steps=100000", "checkpoint.save_interval=0", f"run.output_dir={run}"]
    with open(tmp_path / "torchrun.log", "wb") as out:
        launcher = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
    workers: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 300
        while not (run / "metrics.jsonl").exists():
            assert time.monotonic() < deadline and launcher.poll() is None, (tmp_path / "torchrun.log").read_text()
            time.sleep(0.2)
        workers = psutil.Process(launcher.pid).children()
        assert len(workers) == 2
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        gone, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, f"orphaned workers still running 10 s after the launcher died: {alive}"
    finally:
        for worker in workers:
            if worker.is_running():
                worker.kill()
    lines = [line for line in (tmp_path / "torchrun.log").read_text().splitlines() if line.startswith("keel: rank ")]
    # Each worker says one line: that its launcher is gone, or (when the other worker went first) the lost rank.
    assert len(lines) == 2 and any("its launcher (pid" in line and "is gone" in line for line in lines), lines


def test_the_failure_line_says_what_a_restart_would_do(tmp_path: Path) -> None:
    from engine.parallel.failures import explain, restart_hint

    lost = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer")
    assert explain(ValueError("a bug of this rank"), 0, 5, "during training") is None
    root = str(tmp_path / "checkpoints")
    hints = {resume: functools.partial(restart_hint, root, resume) for resume in ("auto", "none", "/ckpt/step_3")}
    line = str(explain(lost, 1, 5, "during training", hints["auto"]))
    assert line.startswith("rank 1: lost another rank during training (Connection closed by peer): it died")
    assert line.endswith("no checkpoint has been written yet, so a restart starts from the beginning.")
    assert hints["/ckpt/step_3"]() == "a restart resumes from checkpoint.resume=/ckpt/step_3 again"
    assert hints["none"]() == "a restart starts over (checkpoint.resume=none)"
    step = tmp_path / "checkpoints" / "step_0000006"
    step.mkdir(parents=True)
    (step / "metadata.json").write_text("{}")
    (step / "keel.json").write_text("{}")
    assert hints["auto"]() == f"a restart with checkpoint.resume=auto continues from {step}"
    assert hints["/ckpt/step_3"]() == f"a restart with checkpoint.resume=auto continues from {step}"
    assert hints["none"]() == f"a restart starts over (checkpoint.resume=none); with checkpoint.resume=auto it " \
                              f"would continue from {step}"

    def unreadable() -> str:
        raise PermissionError(13, "Permission denied", root)

    assert str(explain(lost, 1, 5, "during training", unreadable)).endswith("from the last checkpoint, if one was "
                                                                           "written.")


@pytest.mark.parametrize("value", ["0", "-1"])
def test_timeout_must_be_positive(value: str) -> None:
    from engine.config import ConfigError, TrainConfig, load_config

    with pytest.raises(ConfigError, match="parallel.timeout_minutes"):
        load_config(TrainConfig, None, [f"parallel.timeout_minutes={value}"])
