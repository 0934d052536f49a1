"""Process-level set-up shared by every command: logging per rank, and an orderly shutdown."""

from __future__ import annotations

import logging
import os

# megatron-core says at import that it falls back to torch without Transformer Engine and apex: on a machine
# without CUDA that is the design (the CPU layer), not news, and it drowned every command's first screen.
CPU_FALLBACK_WARNINGS = r"(Transformer Engine and )?Apex (is|are) not installed"


def quiet_cpu_fallback_warnings() -> None:
    """Silence megatron's Transformer Engine / apex fallback warnings where there is no CUDA device."""
    import warnings

    import torch

    if not torch.cuda.is_available():
        warnings.filterwarnings("ignore", message=CPU_FALLBACK_WARNINGS, category=UserWarning)


def setup_logging(level: str = "INFO") -> None:
    """Rank 0 logs at ``level``; other ranks only warnings. megatron and torch.distributed stay quiet."""
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    logging.basicConfig(
        level=getattr(logging, level.upper()) if rank == 0 else logging.WARNING,
        format=f"[%(asctime)s rank{rank} %(name)s %(levelname)s] %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    for noisy in ("megatron", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def shutdown() -> None:
    """Wait for every rank, then destroy the process group (if one exists)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
