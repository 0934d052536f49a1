"""Per layout, train with and without an offload/onload after every step; rank 0 writes what each rank saw.

argv: JSON {"base": [overrides], "cases": {name: [overrides]}, "steps": N}, output path.
Per case and rank: whether the swapped run's losses, grad norms and weights equal the plain
run's bitwise, the bytes the last offload reported, and the bytes read off megatron's objects.
"""

from __future__ import annotations

import json
import sys
import tempfile
from typing import Any

import torch
import torch.distributed as dist

from engine.algorithms.sft import SFTStep
from engine.config import TrainConfig, load_config
from engine.parallel.layout import LaunchEnv, ParallelLayout, ParallelState, read_launch_env
from engine.trainer import Trainer
from tests.engine.test_memory_swap import expected_bytes


def _train(overrides: list[str], env: LaunchEnv, steps: int, swap: bool) -> dict[str, Any]:
    config = load_config(TrainConfig, None, overrides)
    parallel = ParallelState.initialize(ParallelLayout.from_config(config.parallel, env.world_size), env,
                                        seed=config.run.seed)
    trainer = Trainer(config, SFTStep(), parallel)
    runner, metrics, reported, expected = trainer.model, [], {}, {}
    for number in range(1, steps + 1):
        metrics.append(trainer.train_step(number))
        if swap:
            expected = expected_bytes(runner)
            reported = runner.offload()
            freed = [b.grad_data.untyped_storage().nbytes() for c in runner.chunks for b in c.buffers]
            assert runner.onload() == reported and not any(freed), freed
    trainer.metrics.close()
    dist.barrier()
    return {"metrics": [(m["lm_loss"], m["grad_norm"]) for m in metrics], "reported": reported, "expected": expected,
            "weights": [p.detach().clone() for c in runner.chunks for p in c.parameters()]}


def main() -> None:
    payload = json.loads(sys.argv[1])
    env = read_launch_env()
    mine: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in payload["cases"].items():
            runs = [_train(payload["base"] + overrides + [f"run.output_dir={tmp}/{name}{swap}"], env,
                           payload["steps"], swap) for swap in (False, True)]
            same = runs[0]["metrics"] == runs[1]["metrics"] and all(
                torch.equal(a, b) for a, b in zip(runs[0]["weights"], runs[1]["weights"], strict=True))
            mine[name] = {"same": same, "reported": runs[1]["reported"], "expected": runs[1]["expected"]}
    everyone: list[Any] = [None] * env.world_size
    dist.all_gather_object(everyone, mine)
    if env.rank == 0:
        with open(sys.argv[2], "w") as fh:
            json.dump(everyone, fh)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
