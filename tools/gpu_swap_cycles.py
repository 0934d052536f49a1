"""GPU check: memory does not grow over train <-> generate cycles with the optimizer swapped out.

Each cycle: one SFT training step, ``ModelRunner.offload()`` (optimizer state to pinned host
memory, grad buffers freed), reshard into the native generation backend, generate (KV cache),
``release()``, then ``onload()``. After each phase it prints ``torch.cuda.memory_allocated`` and
``max_memory_allocated`` (MiB); at the end it compares the allocation after the last onload
with the one after cycle 2 (cycle 1 creates the AdamW state) and exits 1 if it grew by more
than ``--tolerance-mib``, or if an offload freed less than it reported.

It needs a CUDA GPU. On an H200 (2026-12-04, bench-34m, bf16, TE spec) the allocation after onload was
747.3 MiB in every cycle from 2 to 20 (``tools/bench/results/gpu_checks_h200.json``).
``--allow-cpu`` runs the same code path on the CPU to smoke-test it (every memory number is
0 there: the CPU compatibility layer answers CUDA memory queries with 0).

    python tools/gpu_swap_cycles.py [--cycles 20] [key=value overrides, e.g. model.preset=tiny-llama]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULTS = ["precision.dtype=bf16", "data.num_samples=64", "data.seq_length=128", "data.micro_batch_size=4",
            "data.global_batch_size=8", "logging.progress=false", "logging.tensorboard=false",
            "checkpoint.save_interval=0", "checkpoint.resume=none", "run.output_dir=runs/gpu_swap_cycles"]


def _mib() -> tuple[float, float]:
    return torch.cuda.memory_allocated() / 2**20, torch.cuda.max_memory_allocated() / 2**20


def _generate(resharder: Any) -> None:
    from engine.generation.base import SamplingParams

    resharder.reshard()
    prompts = [[1 + (7 * i + j) % 200 for j in range(16 + 4 * i)] for i in range(8)]
    resharder.backend.generate(prompts, SamplingParams(max_new_tokens=64, temperature=1.0, seed=1))
    resharder.backend.release()


def _cycle(trainer: Any, resharder: Any, number: int) -> tuple[float, bool]:
    """One train -> offload -> generate -> onload cycle; returns (MiB after onload, offload freed enough)."""
    trainer.train_step(number)
    trained, _ = _mib()
    stats = trainer.model.offload()
    offloaded, _ = _mib()
    _generate(resharder)
    generated, _ = _mib()
    trainer.model.onload()
    onloaded, peak = _mib()
    reported = sum(stats.values()) / 2**20
    # allocator granularity: a freed block may hold a little more than the bytes reported
    freed_enough = not torch.cuda.is_available() or trained - offloaded >= reported - 1.0
    print(f"cycle {number:2d}: MiB allocated after train {trained:9.1f}  offload {offloaded:9.1f}  "
          f"generate {generated:9.1f}  onload {onloaded:9.1f}  max {peak:9.1f}  reported {reported:8.1f}", flush=True)
    return onloaded, freed_enough


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--tolerance-mib", type=float, default=1.0)
    parser.add_argument("--allow-cpu", action="store_true", help="smoke-test the code path without a GPU")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("gpu_swap_cycles: no CUDA GPU here (use --allow-cpu to smoke-test the code path)", file=sys.stderr)
        return 2
    from engine.algorithms.sft import SFTStep
    from engine.config import TrainConfig, load_config
    from engine.generation.native import NativeBackend
    from engine.generation.reshard import Resharder
    from engine.parallel.generation_layout import GenerationParallelState
    from engine.parallel.layout import ParallelLayout, ParallelState
    from engine.trainer import Trainer

    config = load_config(TrainConfig, None, DEFAULTS + args.overrides)
    parallel = ParallelState.initialize(ParallelLayout.from_config(config.parallel, 1), seed=config.run.seed)
    trainer = Trainer(config, SFTStep(), parallel)
    resharder = Resharder(trainer.model.chunks, NativeBackend(config, GenerationParallelState.initialize(1), 8))
    after = [_cycle(trainer, resharder, n) for n in range(1, args.cycles + 1)]
    growth = after[-1][0] - after[min(1, len(after) - 1)][0]
    ok = growth <= args.tolerance_mib and all(freed for _, freed in after)
    print(f"{'PASS' if ok else 'FAIL'}: allocation after onload grew {growth:.2f} MiB from cycle 2 to "
          f"{args.cycles} (tolerance {args.tolerance_mib} MiB); every offload freed what it reported: "
          f"{all(freed for _, freed in after)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
