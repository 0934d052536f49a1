"""Cluster launchers on one machine: two "nodes" on loopback give the losses of one node.

The reference is ``torchrun --nproc-per-node 2`` (one node, two ranks) with the SFT
template's default config ``examples/sft.yaml``; each launch costs ~12 s of imports on an
idle 2-core machine, so the file makes four plus one per template other than SFT.

* ``docker/launch/torchrun_multinode.sh --nnodes 2 --node-rank {0,1}``, one rank per node,
  trains exactly like the reference.
* ``docker/slurm/sft.sbatch`` under a stand-in ``srun`` (starts the tasks locally with
  SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID/SLURM_NODEID/SLURM_NNODES, forwards SIGTERM) and
  ``scontrol`` (head node 127.0.0.1, records ``requeue``): its ``launch_ranks.sh`` runs twice
  in parallel as 2 nodes x 1 task and matches the reference step for step; SIGTERM to the
  batch shell (what ``#SBATCH --signal=B:TERM@120`` sends) reaches every rank, they
  checkpoint and stop, the job requeues itself, and the requeued start (torchrun mode:
  srun runs ``torchrun_multinode.sh`` per node) resumes to the reference's final losses.
  The first start also builds the pyxis/enroot container flags (the stand-in ignores them).
* Every other template in ``docker/slurm/`` runs for real with its default config on tiny
  data (2 nodes x 1 task) through to a checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest

from tests.helpers import REPO, free_port, keel_train, train_losses

STEPS = 40  # long enough (~2 s of training) for the pre-emption test to land mid-run
BASE = [
    "model.preset=tiny-llama", "data.seq_length=64", "data.num_samples=64", f"run.train_steps={STEPS}",
    "data.global_batch_size=4", "data.micro_batch_size=2", "logging.progress=false",
    "logging.tensorboard=false", "checkpoint.save_interval=0", "run.eval_interval=0",
]
SFT_CONFIG = ["--config", "examples/sft.yaml"]  # sft.sbatch's default KEEL_CONFIG
# Tiny data and two steps on top of any template's default config.
TINY = [
    "run.train_steps=2", "data.num_samples=64", "data.global_batch_size=4", "data.micro_batch_size=2",
    "run.eval_interval=0", "checkpoint.save_interval=0", "logging.progress=false", "logging.tensorboard=false",
]
TEMPLATES = sorted(path.stem for path in (REPO / "docker" / "slurm").glob("*.sbatch"))
TIMEOUT = 300

FAKE_SRUN = """#!{python}
# Stand-in for srun: starts --nodes x --ntasks-per-node local tasks with Slurm's per-task
# variables, forwards SIGTERM to them (as srun does), exits with the worst task status.
import os, signal, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_SLURM_LOG"], "a") as log:
    log.write("srun " + " ".join(args) + "\\n")
nodes = per_node = 1
while args and args[0].startswith("-"):
    flag = args.pop(0)
    if flag.startswith("--nodes="):
        nodes = int(flag.split("=", 1)[1])
    elif flag.startswith("--ntasks-per-node="):
        per_node = int(flag.split("=", 1)[1])
total = nodes * per_node
procs = [
    subprocess.Popen(args, env=dict(os.environ, SLURM_PROCID=str(i), SLURM_LOCALID=str(i % per_node),
                                    SLURM_NODEID=str(i // per_node), SLURM_NTASKS=str(total),
                                    SLURM_NNODES=str(nodes), SLURM_STEP_ID="0"))
    for i in range(total)
]
signal.signal(signal.SIGTERM, lambda *_: [p.send_signal(signal.SIGTERM) for p in procs])
codes = [p.wait() for p in procs]
sys.exit(max(abs(c) for c in codes))
"""

FAKE_SCONTROL = """#!/usr/bin/env bash
echo "scontrol $*" >> "$FAKE_SLURM_LOG"
if [[ "$1 $2" == "show hostnames" ]]; then echo 127.0.0.1; echo 127.0.0.2; fi
"""


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                        "MASTER_PORT", "KEEL_FAULT")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TQDM_DISABLE="1",
               KEEL_PYTHON=sys.executable)
    env.update(extra)
    return env


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=_env(env), stdout=out, stderr=subprocess.STDOUT)


def _finish(procs: list[subprocess.Popen[bytes]], logs: list[Path]) -> None:
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=TIMEOUT))
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise
    if any(codes):
        text = "\n".join(f"--- {log.name} (exit {code})\n{log.read_text()[-4000:]}" for log, code in zip(logs, codes, strict=True))
        raise AssertionError(f"launch failed: {codes}\n{text}")


def _assert_same_losses(got: dict[int, float], reference: dict[int, float], what: str) -> None:
    assert sorted(got) == sorted(reference), f"{what}: steps {sorted(got)} vs {sorted(reference)}"
    for step, loss in reference.items():
        assert got[step] == pytest.approx(loss, rel=1e-6, abs=0.0), f"{what} step {step}: {got[step]} vs {loss}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """One node, two ranks: ``torchrun --nproc-per-node 2``."""
    run = tmp_path_factory.mktemp("reference")
    keel_train(2, [*SFT_CONFIG, *BASE, f"run.output_dir={run}"])
    return train_losses(run)


def test_torchrun_on_two_nodes_matches_one_node(reference: dict[int, float], tmp_path: Path) -> None:
    port = str(free_port())
    procs, logs = [], []
    for node in range(2):
        logs.append(tmp_path / f"node{node}.log")
        procs.append(_start(
            ["bash", "docker/launch/torchrun_multinode.sh", "--nnodes", "2", "--node-rank", str(node),
             "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", port, "--",
             "train", "sft", *SFT_CONFIG, *BASE, f"run.output_dir={tmp_path / 'run'}"],
            {}, logs[-1]))
    _finish(procs, logs)
    _assert_same_losses(train_losses(tmp_path / "run"), reference, "torchrun_multinode.sh, 2 nodes x 1 rank")


def _fake_slurm(tmp_path: Path) -> tuple[dict[str, str], Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN.format(python=sys.executable))
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL)
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    log = tmp_path / "slurm.log"
    env = dict(
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_SLURM_LOG=str(log), SLURM_JOB_ID="4242",
        SLURM_JOB_NAME="keel-sft-test", SLURM_JOB_NODELIST="node[1-2]", SLURM_JOB_NUM_NODES="2",
        SLURM_SUBMIT_DIR=str(REPO), GPUS_PER_NODE="1", KEEL_RUN_DIR=str(tmp_path / "run"),
    )
    return env, log


def _assert_container_flags(line: str, algo: str, run_dir: Path) -> None:
    assert "--nodes=2 --ntasks-per-node=1 --ntasks=2" in line
    assert "--container-image=/images/keel.sqsh" in line
    assert f"--container-mounts={REPO}:{REPO},{run_dir}:{run_dir},/data:/data" in line
    assert f"launch_ranks.sh train {algo} --config {REPO}/examples/" in line and "checkpoint.resume=auto" in line


def test_relative_paths_are_taken_from_keel_home(tmp_path: Path) -> None:
    """KEEL_CONFIG was checked against the submit directory but read from KEEL_HOME (every rank failed with
    "cannot read config file"), and a relative KEEL_RUN_DIR was made in the submit directory while the
    outputs went under KEEL_HOME, with relative container mounts pyxis would reject."""
    env, _ = _fake_slurm(tmp_path)
    home, submit = tmp_path / "home", tmp_path / "submit"
    home.mkdir(), submit.mkdir()
    (submit / "my.yaml").write_text("run:\n  train_steps: 2\n")
    env.update(KEEL_HOME=str(home), KEEL_RUN_DIR="runs/mine", KEEL_CONFIG="my.yaml", KEEL_ALGO="sft")
    done = subprocess.run(["bash", str(REPO / "docker" / "slurm" / "job.sh")], cwd=submit, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert f"KEEL_CONFIG=my.yaml not found ({home / 'my.yaml'}: relative paths are taken from KEEL_HOME)" \
        in done.stderr
    assert (home / "runs" / "mine" / "checkpoints").is_dir() and not (submit / "runs").exists()


@pytest.mark.parametrize("algo", [t for t in TEMPLATES if t != "sft"])  # sft.sbatch: the pre-emption test
def test_every_other_sbatch_template_trains_to_a_checkpoint(algo: str, tmp_path: Path) -> None:
    env, slurm_log = _fake_slurm(tmp_path)
    run_dir = tmp_path / "run"
    env.update(MASTER_PORT=str(free_port()), KEEL_IMAGE="/images/keel.sqsh", KEEL_MOUNTS="/data:/data")
    tiny = [o.replace("data.num_samples", "rollout.num_prompts") if algo == "ppo" else o for o in TINY]  # reads prompts
    job = _start(["bash", f"docker/slurm/{algo}.sbatch", *tiny], env, tmp_path / "job.log")
    _finish([job], [tmp_path / "job.log"])
    assert _last_checkpoint_step(run_dir) == 2
    assert len(train_losses(run_dir, "step_time_s")) == 2
    [line] = [line for line in slurm_log.read_text().splitlines() if line.startswith("srun ")]
    _assert_container_flags(line, algo, run_dir)


def test_shipped_templates_are_the_built_algorithms() -> None:
    from engine.cli import ALGORITHMS

    assert {"sft", "rm"} <= set(TEMPLATES) <= set(ALGORITHMS), TEMPLATES


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen[bytes], timeout: float = TIMEOUT) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists():
            steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.strip()]
            if steps and max(steps) >= step:
                return
        time.sleep(0.02)
    raise AssertionError(f"training never reached step {step} (exit {proc.poll()})")


def _last_checkpoint_step(run_dir: Path) -> Optional[int]:
    from engine.checkpoint.dist import find_latest

    latest = find_latest(str(run_dir / "checkpoints"))
    return int(latest.name.split("_")[1]) if latest is not None else None


def test_sbatch_preemption_checkpoints_requeues_and_resumes(reference: dict[int, float], tmp_path: Path) -> None:
    env, slurm_log = _fake_slurm(tmp_path)
    env.update(MASTER_PORT=str(free_port()), KEEL_IMAGE="/images/keel.sqsh", KEEL_MOUNTS="/data:/data")
    run_dir = tmp_path / "run"
    job = _start(["bash", "docker/slurm/sft.sbatch", *BASE], env, tmp_path / "start1.log")
    _wait_for_step(run_dir, 2, job)
    job.send_signal(signal.SIGTERM)  # what `#SBATCH --signal=B:TERM@120` does to the batch shell
    _finish([job], [tmp_path / "start1.log"])
    stopped_at = _last_checkpoint_step(run_dir)
    assert stopped_at is not None and 2 <= stopped_at < STEPS, f"checkpoint after SIGTERM: {stopped_at}"
    assert "scontrol requeue 4242" in slurm_log.read_text()
    _assert_container_flags(next(x for x in slurm_log.read_text().splitlines() if x.startswith("srun ")), "sft", run_dir)
    first = train_losses(run_dir)
    _assert_same_losses(first, {k: v for k, v in reference.items() if k <= stopped_at},
                        "sbatch (srun, 2 nodes x 1 task) before SIGTERM")

    # Slurm starts the requeued job: same run directory, torchrun mode this time.
    env.update(MASTER_PORT=str(free_port()), SLURM_RESTART_COUNT="1", KEEL_LAUNCHER="torchrun")
    job = _start(["bash", "docker/slurm/sft.sbatch", *BASE], env, tmp_path / "start2.log")
    _finish([job], [tmp_path / "start2.log"])
    assert _last_checkpoint_step(run_dir) == STEPS
    assert slurm_log.read_text().count("scontrol requeue") == 1
    _assert_same_losses(train_losses(run_dir), reference, f"sbatch pre-empted after step {stopped_at} and requeued")
