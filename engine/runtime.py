"""Process-level set-up shared by every command: logging per rank, and an orderly shutdown."""

from __future__ import annotations

import logging
import sys

# megatron-core says at import that it falls back to torch without Transformer Engine and apex: on a machine
# without CUDA that is the design (the CPU layer), not news, and it drowned every command's first screen.
CPU_FALLBACK_WARNINGS = r"(Transformer Engine and )?Apex (is|are) not installed"
# A CUDA stream setting megatron recommends on every tensor-parallel step: nothing a CPU run can act on.
CPU_CUDA_ADVICE = r"When using async grad allreduce it is recommended to set the environment variable CUDA_DEVICE_MAX"
# Deprecation notices that torch's distributed checkpoint gives megatron's checkpoint code on every load: about
# the two libraries' internals, not a user's run.
CHECKPOINT_INTERNALS = r"(megatron\.core\.dist_checkpointing|torch\.distributed\.checkpoint)\."


def quiet_cpu_fallback_warnings() -> None:
    """Silence megatron's Transformer Engine / apex fallback warnings and CUDA advice where there is no CUDA
    device, and the checkpoint libraries' deprecation notices to each other everywhere."""
    import warnings

    import torch

    warnings.filterwarnings("ignore", category=FutureWarning, module=CHECKPOINT_INTERNALS)
    if not torch.cuda.is_available():
        warnings.filterwarnings("ignore", message=CPU_FALLBACK_WARNINGS, category=UserWarning)
        warnings.filterwarnings("ignore", message=CPU_CUDA_ADVICE, category=UserWarning)


#: ``extra=`` of a warning that can differ between ranks (a signal that one rank got, rows of one replica's share
#: left unscored, weights of one pipeline stage left at initialisation). Other ranks' warnings repeat rank 0's
#: (every rank reads the same config and rows), so ranks other than 0 show only errors and these.
EVERY_RANK = {"every_rank": True}
_HANDLER = "keel"


def _rank_zero_or_marked(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR or bool(getattr(record, "every_rank", False))


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """stderr; on a terminal where a progress bar is drawn, each record goes above the bar, not onto its line."""

    def emit(self, record: logging.LogRecord) -> None:
        from engine.progress import write_above_bars

        self.stream = sys.stderr  # the stderr of now (pytest swaps it per test; a closed one raised per record)
        try:
            if write_above_bars(self.format(record), self.stream):
                return
        except Exception:
            self.handleError(record)
            return
        super().emit(record)


def setup_logging(level: str = "INFO") -> None:
    """Rank 0 logs at ``level``; other ranks only errors and warnings marked :data:`EVERY_RANK`. megatron and
    torch.distributed stay quiet. Called again, it replaces its handler (other handlers, pytest's, stay)."""
    try:  # as the launch is read (engine.parallel.layout.read_launch_env); a bad value is that code's to report
        from engine.parallel.layout import read_launch_env

        rank = read_launch_env().rank
    except ValueError:
        rank = 0
    root = logging.getLogger()
    for previous in [h for h in root.handlers if h.get_name() == _HANDLER]:
        root.removeHandler(previous)
    handler = _Handler(sys.stderr)
    handler.set_name(_HANDLER)
    handler.setFormatter(logging.Formatter(f"[%(asctime)s rank{rank} %(name)s %(levelname)s] %(message)s",
                                           datefmt="%H:%M:%S"))
    if rank != 0:
        handler.addFilter(_rank_zero_or_marked)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()) if rank == 0 else logging.WARNING)
    for noisy in ("megatron", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def shutdown() -> None:
    """Wait for every rank, then destroy the process group (if one exists)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
