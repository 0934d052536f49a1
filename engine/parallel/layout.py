"""The one object that says how a job is split: :class:`ParallelLayout`.

It validates the tensor × pipeline × data sizes against the world size, the model
shape and the batch sizes *before* any process group exists (so every rank fails with
the same readable message instead of hanging), reads the launcher's environment
(torchrun or Slurm), initialises ``torch.distributed`` and megatron-core's
``parallel_state``, and answers every "which rank / which group" question the rest of
the engine asks. Nothing else touches ``parallel_state`` globals directly.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from engine.errors import ConfigError

logger = logging.getLogger(__name__)


class LayoutError(ConfigError):
    """The requested parallel layout cannot run on this world size / model / batch."""


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, as told by the launcher."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" | "slurm" | "single"


def _first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list such as ``gpu[003-005,9],login1``."""
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not match:
        return nodelist
    prefix, _, ranges = match.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return f"{prefix}{first}"


def read_launch_env(environ: Optional[dict[str, str]] = None) -> LaunchEnv:
    """Read rank/world/rendezvous from torchrun's or Slurm's variables (torchrun wins)."""
    env = dict(os.environ if environ is None else environ)
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", "29500")),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        host = env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1")))
        port = int(env.get("MASTER_PORT") or 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
        return LaunchEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", "0")),
            master_addr=host,
            master_port=port,
            launcher="slurm",
        )
    # one process: its store is in memory (rendezvous_store), so no port is taken
    return LaunchEnv(0, 1, 0, "127.0.0.1", 0, "single")


def rendezvous_store(env: LaunchEnv, timeout: datetime.timedelta) -> dist.Store:
    """The key-value store the process groups meet in, private to this launch attempt.

    Under torchrun it is the agent's store (``env://``: the launcher's MASTER_ADDR/PORT and
    TORCHELASTIC_USE_AGENT_STORE); elsewhere rank 0 hosts one at the rendezvous address.
    torchrun keeps one store for the whole job, so after ``--max-restarts`` restarts the
    workers the previous attempt's keys (the dead workers' gloo addresses) are still there;
    prefixing every key with the attempt number makes each attempt meet only itself.
    A one-rank world meets nobody: its store lives in memory, so it needs no port.
    """
    if env.world_size == 1 and env.launcher == "single":
        return dist.PrefixStore("keel/attempt_0/", dist.HashStore())
    if env.launcher == "torchrun":
        url = "env://"
    else:
        url = f"tcp://{env.master_addr}:{env.master_port}"
    store, _, _ = next(dist.rendezvous(url, rank=env.rank, world_size=env.world_size, timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") if env.launcher == "torchrun" else "0"
    return dist.PrefixStore(f"keel/attempt_{attempt}/", store)


@dataclass(frozen=True)
class ParallelLayout:
    """Tensor × pipeline × data split of the job (plus interleaving and sequence parallel)."""

    tensor: int
    pipeline: int
    data: int
    virtual_pipeline: Optional[int] = None
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    backend: str = "auto"

    @property
    def world_size(self) -> int:
        return self.tensor * self.pipeline * self.data

    @classmethod
    def from_config(cls, cfg: Any, world_size: int) -> ParallelLayout:
        """Build from a ``ParallelConfig``; the data size is derived when not given."""
        model_parallel = cfg.tensor * cfg.pipeline
        if world_size % model_parallel:
            raise LayoutError(
                f"world size {world_size} is not divisible by parallel.tensor ({cfg.tensor}) x "
                f"parallel.pipeline ({cfg.pipeline}) = {model_parallel}; launch a multiple of "
                f"{model_parallel} processes or change the layout"
            )
        data = world_size // model_parallel
        if cfg.data is not None and cfg.data != data:
            raise LayoutError(
                f"world size {world_size} != parallel.tensor ({cfg.tensor}) x parallel.pipeline "
                f"({cfg.pipeline}) x parallel.data ({cfg.data}) = {model_parallel * cfg.data}"
            )
        return cls(
            cfg.tensor, cfg.pipeline, data, cfg.virtual_pipeline, cfg.sequence_parallel,
            cfg.distributed_optimizer, getattr(cfg, "backend", "auto"),
        )

    def check_model(self, preset: Any) -> None:
        """Every size the tensor/pipeline split divides must divide evenly."""
        tp = self.tensor
        checks = [
            ("num_attention_heads", preset.num_attention_heads, tp, "parallel.tensor"),
            ("num_query_groups (KV heads)", preset.num_query_groups, tp, "parallel.tensor"),
            ("ffn_hidden_size", preset.ffn_hidden_size, tp, "parallel.tensor"),
            ("vocab_size", preset.vocab_size, tp, "parallel.tensor"),
        ]
        stages = self.pipeline * (self.virtual_pipeline or 1)
        what = "parallel.pipeline" + (" x parallel.virtual_pipeline" if self.virtual_pipeline else "")
        checks.append(("num_layers", preset.num_layers, stages, what))
        for name, value, divisor, knob in checks:
            if value % divisor:
                raise LayoutError(
                    f"model {preset.name}: {name}={value} is not divisible by {knob}={divisor}; "
                    f"pick a {knob} that divides {value}"
                )

    def num_microbatches(self, micro_batch_size: int, global_batch_size: int) -> int:
        per_step = micro_batch_size * self.data
        if global_batch_size % per_step:
            raise LayoutError(
                f"data.global_batch_size={global_batch_size} is not divisible by data.micro_batch_size "
                f"({micro_batch_size}) x data-parallel size ({self.data}) = {per_step}"
            )
        return global_batch_size // per_step

    def check_batches(self, micro_batch_size: int, global_batch_size: int, seq_length: int) -> None:
        micro = self.num_microbatches(micro_batch_size, global_batch_size)
        if self.virtual_pipeline and micro % self.pipeline:
            raise LayoutError(
                f"the interleaved pipeline schedule needs the number of micro-batches ({micro}) to be a "
                f"multiple of parallel.pipeline ({self.pipeline}); change data.global_batch_size"
            )
        if self.sequence_parallel and seq_length % self.tensor:
            raise LayoutError(
                f"parallel.sequence_parallel needs data.seq_length ({seq_length}) divisible by "
                f"parallel.tensor ({self.tensor})"
            )

    def describe(self) -> str:
        parts = [f"TP{self.tensor}", f"PP{self.pipeline}", f"DP{self.data}"]
        if self.virtual_pipeline:
            parts.append(f"VP{self.virtual_pipeline}")
        if self.sequence_parallel:
            parts.append("SP")
        if self.distributed_optimizer:
            parts.append("dist-opt")
        return "×".join(parts[:3]) + "".join(f"+{p}" for p in parts[3:])


class ParallelState:
    """Initialised process groups for one training layout; the accessor the rest of Keel uses.

    The object owns its groups: :meth:`initialize` creates them through megatron's
    ``parallel_state`` (megatron's modules read them from there) and keeps them, with this
    rank's coordinates, on the object. A second layout of the same world, the generation
    layout with its own tensor-parallel size, lives beside it in
    :class:`engine.parallel.generation_layout.GenerationParallelState`.
    """

    def __init__(self, layout: ParallelLayout, env: LaunchEnv, groups: Optional[dict[str, Any]] = None):
        self.layout = layout
        self.env = env
        self._groups = groups if groups is not None else _megatron_groups()

    # -- lifecycle -----------------------------------------------------------------
    @classmethod
    def initialize(cls, layout: ParallelLayout, env: Optional[LaunchEnv] = None, seed: int = 1234,
                   timeout_minutes: float = 30.0) -> ParallelState:
        """Create the world process group (if needed) and megatron's model-parallel groups.

        ``timeout_minutes`` (``parallel.timeout_minutes``) bounds the rendezvous and every
        collective of every group, the world's and megatron's: a rank waiting that long on a
        dead or hung rank raises instead of waiting forever.
        """
        from engine.parallel import cpu

        env = env or read_launch_env()
        if env.world_size != layout.world_size:
            raise LayoutError(
                f"{env.launcher} started {env.world_size} processes but the layout {layout.describe()} "
                f"needs {layout.world_size}"
            )
        cpu.activate()
        backend = layout.backend
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl" and not (torch.cuda.is_available() and dist.is_nccl_available()):
            raise ConfigError("parallel.backend=nccl needs CUDA GPUs and a torch built with NCCL, which this "
                              "machine lacks: use parallel.backend=auto (gloo here) or gloo")
        if torch.cuda.is_available() and (backend == "nccl" or env.local_rank < torch.cuda.device_count()):
            torch.cuda.set_device(env.local_rank)  # under gloo too: else every rank's model lands on GPU 0
        # Imported before the rendezvous (seconds per process): ranks then arrive together, and
        # import time does not count against the timeout of the first collectives.
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        timeout = datetime.timedelta(minutes=timeout_minutes)
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, store=rendezvous_store(env, timeout), rank=env.rank,
                                    world_size=env.world_size, timeout=timeout)
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout.tensor,
            pipeline_model_parallel_size=layout.pipeline,
            virtual_pipeline_model_parallel_size=layout.virtual_pipeline,
            distributed_timeout_minutes=timeout_minutes,  # type: ignore[arg-type]  # timedelta(minutes=) takes floats
        )
        torch.manual_seed(seed)
        model_parallel_cuda_manual_seed(seed, inference_rng_tracker=not torch.cuda.is_available())
        logger.info("rank %d/%d: layout %s (%s backend, collective timeout %g min)", env.rank, env.world_size,
                    layout.describe(), backend, timeout_minutes)
        return cls(layout, env)

    @classmethod
    def initialize_single_process(cls, seed: int = 1234, parallel: Any = None) -> ParallelState:
        """A one-rank gloo world (TP1/PP1/DP1 unless ``parallel``, a ``ParallelConfig``, says otherwise).

        The set-up of every tool that needs megatron's groups on one process (``keel plan``,
        conversions, ``keel generate``, tests); undo it with :meth:`shutdown`.
        """
        layout = ParallelLayout(1, 1, 1) if parallel is None else ParallelLayout.from_config(parallel, 1)
        return cls.initialize(layout, LaunchEnv(0, 1, 0, "127.0.0.1", 0, "single"), seed=seed)

    def destroy_model_parallel(self) -> None:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()

    def shutdown(self) -> None:
        """Destroy megatron's groups and the world group, and leave the CPU layer (one-process tools)."""
        from engine.parallel import cpu

        self.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()
        cpu.deactivate()

    # -- ranks and groups ----------------------------------------------------------
    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def is_main(self) -> bool:
        return dist.get_rank() == 0

    @property
    def tp_rank(self) -> int:
        return int(self._groups["tp_rank"])

    @property
    def pp_rank(self) -> int:
        return int(self._groups["pp_rank"])

    @property
    def dp_rank(self) -> int:
        return int(self._groups["dp_rank"])

    @property
    def dp_group(self) -> Any:
        return self._groups["dp_group"]

    @property
    def pp_group(self) -> Any:
        return self._groups["pp_group"]

    @property
    def tp_group(self) -> Any:
        return self._groups["tp_group"]

    def is_first_stage(self, vp_stage: Optional[int] = None) -> bool:
        from megatron.core import parallel_state

        return parallel_state.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)

    def is_last_stage(self, vp_stage: Optional[int] = None) -> bool:
        from megatron.core import parallel_state

        return parallel_state.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)

    @property
    def last_stage_global_rank(self) -> int:
        return int(self._groups["last_stage_global_rank"])

    def barrier(self) -> None:
        dist.barrier()


def _megatron_groups() -> dict[str, Any]:
    """The groups and coordinates megatron's ``parallel_state`` holds for this rank, read once."""
    from megatron.core import parallel_state as ps

    return {
        "tp_group": ps.get_tensor_model_parallel_group(), "tp_rank": ps.get_tensor_model_parallel_rank(),
        "pp_group": ps.get_pipeline_model_parallel_group(), "pp_rank": ps.get_pipeline_model_parallel_rank(),
        "dp_group": ps.get_data_parallel_group(), "dp_rank": ps.get_data_parallel_rank(),
        "last_stage_global_rank": ps.get_pipeline_model_parallel_last_rank(),
    }


@contextlib.contextmanager
def single_process_parallel(seed: int = 1234, parallel: Any = None) -> Iterator[ParallelState]:
    """:meth:`ParallelState.initialize_single_process` for the duration of a ``with`` block.

    When a process group already exists (a tool called from inside a run) nothing is created or
    torn down: ``None`` is yielded and megatron's current groups serve.
    """
    if dist.is_initialized():
        yield None  # type: ignore[misc]
        return
    state = ParallelState.initialize_single_process(seed, parallel)
    try:
        yield state
    finally:
        state.shutdown()
