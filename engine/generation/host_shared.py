"""Host-shared generation weights: the refit transport for ranks that share one CPU host.

With the point-to-point transport every generation replica holds its own copy of its
weights, and a refit sends each training shard to every replica: at generation TP1 on four
ranks of one host, a 125M-parameter fp32 model lands four times (2 GB) through loopback
sockets. When every rank of the world runs on one host and the weights live in host memory,
the replicas can read one copy instead: one file in ``/dev/shm`` per generation
tensor-parallel rank, mapped ``MAP_SHARED`` by every rank, and each replica's parameters
rebound to views of the file of its own TP rank. A refit then writes each element once, by
a rank that holds it in the training layout (an in-process copy from its own shard), with a
barrier before (no replica still reads the old weights) and after (every piece is in).

This is the CPU counterpart of what colocated RL engines do on GPUs with CUDA IPC handles
(the trainer exports its weights and the inference engine on the same device maps them).
The files are unlinked as soon as every rank has mapped them, so nothing outlives the run,
even when it is killed. ``/dev/shm`` must hold one generation model per generation TP rank;
the space is reserved up front (``posix_fallocate``), so a small ``/dev/shm`` (Docker's
default is 64 MiB: run with ``--ipc=host`` or ``--shm-size``) is found at set-up, never as a
bus error mid-refit.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import uuid
from typing import Any, Optional

import torch
import torch.distributed as dist

from engine.errors import ConfigError

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
TRANSPORTS = ("auto", "collective", "shared")


def local_obstacle(backend: Any) -> str:
    """Why this rank's backend cannot take host-shared weights ('' when it can)."""
    if not hasattr(backend, "bind_weights"):
        return f"the {getattr(backend, 'name', type(backend).__name__)} backend does not expose its weights"
    params = backend.weights_in_place()
    if any(p.device.type != "cpu" for p in params.values()):
        return "the generation weights are not in host memory"
    if len({p.dtype for p in params.values()}) > 1:
        return "the generation weights mix dtypes"
    if not os.path.isdir(SHM_DIR) or not os.access(SHM_DIR, os.W_OK):
        return f"{SHM_DIR} is not a writable directory"
    return ""


class HostSharedWeights:
    """One shared copy of the generation weights per host and generation TP rank (see the module docstring).

    Collective: every rank of the world constructs it. ``views[t][name]`` is parameter ``name`` of
    generation TP rank ``t``'s copy; this rank's backend is rebound to ``views[tp_rank]``.
    """

    def __init__(self, backend: Any, tp_size: int, tp_rank: int):
        params = backend.weights_in_place()
        first = next(iter(params.values()))
        self.dtype = first.dtype
        self.layout: list[tuple[str, tuple[int, ...], int]] = []
        offset = 0
        for name, param in params.items():
            self.layout.append((name, tuple(param.shape), offset))
            offset += param.numel()
        self.numel = offset
        self.nbytes = offset * first.element_size()
        token = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(token, src=0)
        paths = [os.path.join(SHM_DIR, f"keel-refit-{token[0]}-tp{t}") for t in range(tp_size)]
        error = [self._create(paths) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(error, src=0)
        if error[0]:
            raise OSError(error[0])
        flats = [torch.from_file(path, shared=True, size=self.numel, dtype=self.dtype) for path in paths]
        dist.barrier()
        if dist.get_rank() == 0:
            for path in paths:
                os.unlink(path)
        self.views = [{name: flat[start: start + math.prod(shape)].view(shape) for name, shape, start in self.layout}
                      for flat in flats]
        backend.bind_weights(self.views[tp_rank])
        self.tp_rank = tp_rank

    def _create(self, paths: list[str]) -> str:
        """Create and reserve every file (rank 0); returns an error message, '' on success."""
        for path in paths:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    os.posix_fallocate(fd, 0, self.nbytes)
                finally:
                    os.close(fd)
            except OSError as exc:
                for made in paths:
                    if os.path.exists(made):
                        os.unlink(made)
                return (f"cannot reserve {len(paths)} x {self.nbytes / 2**20:.0f} MiB in {SHM_DIR} for the "
                        f"host-shared generation weights ({exc.strerror}); give {SHM_DIR} more room "
                        "(Docker: --ipc=host or --shm-size) or set the refit transport to collective")
        return ""


def open_host_shared(backend: Any, transport: str) -> Optional[HostSharedWeights]:
    """The host-shared weights when ``transport`` asks for them (``shared``) or allows them (``auto``) and every
    rank can take them; ``None`` for the point-to-point transport. Collective over the world."""
    if transport not in TRANSPORTS:
        raise ConfigError(f"refit transport {transport!r}: expected one of {', '.join(TRANSPORTS)}")
    world = dist.get_world_size() if dist.is_initialized() else 1
    if transport == "collective" or world == 1:
        if transport == "shared":
            raise ConfigError("refit transport 'shared' needs more than one rank (one process refits in place)")
        return None
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, (socket.gethostname(), local_obstacle(backend)))
    hosts = {host for host, _ in everyone}
    obstacles = sorted({why for _, why in everyone if why})
    if len(hosts) > 1:
        obstacles.append(f"the ranks run on {len(hosts)} hosts")
    if not obstacles:
        state = backend.state
        try:
            return HostSharedWeights(backend, state.layout.tensor, state.tp_rank)
        except OSError as exc:
            obstacles.append(str(exc))
    if transport == "shared":
        raise ConfigError("refit transport 'shared' cannot be used: " + "; ".join(obstacles))
    logger.info("refit transport: collective (host-shared weights do not apply: %s)", "; ".join(obstacles))
    return None
