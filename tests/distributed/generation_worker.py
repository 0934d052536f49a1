"""Resharding and generation checks for several training layouts inside one launch.

argv: JSON {"cases": [{"name", "preset", "tensor", "pipeline", "generation": [G, ...], "overrides"?: [...]}], "prompts": [[ids]],
"max_new_tokens": N, "cycles": K}, output path. For every training layout (megatron's groups re-initialised
over the same world) and every generation TP ``G`` this records, on rank 0:

* ``logits``: max |generation logits - training logits| on a fixed batch, after the first reshard and after
  each of ``cycles`` train → reshard cycles (the training model takes an SFT step in between);
* ``greedy_mismatch``: prompts whose KV-cache greedy tokens differ from a step-by-step full-recompute argmax
  on the generation model (mixed prompt lengths in one batch);
* ``logprob_greedy`` / ``logprob_sampled``: max |backend log-prob - training model's recomputed log-prob|
  over every generated token (greedy, and temperature 1 / top-p 0.9);
* ``reshard``: the executor's stats (bytes, peak extra bytes).

It runs unchanged on one GPU (one process, NCCL): ``tests/distributed/test_gpu_generation.py`` uses it there
for the Transformer Engine spec, whose KV cache is megatron's own.
"""

from __future__ import annotations

import json
import sys
import tempfile
from typing import Any

import torch
import torch.distributed as dist

from engine.algorithms import sft
from engine.algorithms.logprobs import lm_forward, response_logprobs
from engine.config import load_config
from engine.data.batching import to_device
from engine.generation.base import SamplingParams
from engine.generation.native import NativeBackend
from engine.generation.reshard import Resharder
from engine.parallel.collectives import from_last_stage
from engine.parallel.generation_layout import GenerationParallelState
from engine.parallel.layout import ParallelLayout, ParallelState, read_launch_env
from engine.trainer import Trainer

BASE = ["model.init=layout_invariant", "data.num_samples=64", "data.seq_length=64", "data.micro_batch_size=2",
        "data.global_batch_size=8", "logging.tensorboard=false", "logging.progress=false",
        "checkpoint.save_interval=0", "checkpoint.resume=none", "optimizer.lr=0.01"]


def training_logits(trainer: Trainer, parallel: ParallelState, tokens: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits of the training model (any TP×PP) on every rank."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    def step(data_iterator: Any, model: torch.nn.Module) -> tuple[torch.Tensor, Any]:
        batch = to_device(next(data_iterator))
        return lm_forward(model, batch), lambda output, non_loss_data=True: gather_from_tensor_model_parallel_region(output)

    with torch.no_grad():
        outputs = trainer.model.run_schedule([{"tokens": tokens}], step, forward_only=True, collect_outputs=True)
    vocab = trainer.model.preset.vocab_size
    local = outputs[0].float().cpu() if parallel.is_last_stage() else torch.zeros(*tokens.shape, vocab)
    return from_last_stage(local, parallel)


def generation_logits(backend: NativeBackend, tokens: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary fp32 logits of the generation model, on the CPU (the model may sit on a GPU)."""
    tokens = tokens.to(next(backend.model.parameters()).device)
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    with torch.no_grad():
        return backend.model(tokens, positions, None, runtime_gather_output=True).float().cpu()


def recompute_greedy(backend: NativeBackend, prompt: list[int], steps: int) -> list[int]:
    row = list(prompt)
    for _ in range(steps):
        row.append(int(generation_logits(backend, torch.tensor([row]))[0, -1].argmax()))
    return row[len(prompt):]


def check_generation(backend: NativeBackend, trainer: Trainer, prompts: list[list[int]], steps: int) -> dict[str, Any]:
    greedy = backend.generate(prompts, SamplingParams(max_new_tokens=steps))
    mismatch = [i for i, p in enumerate(prompts) if greedy.tokens[i] != recompute_greedy(backend, p, steps)]
    sampled = backend.generate(prompts, SamplingParams(max_new_tokens=steps, temperature=1.0, top_p=0.9, seed=7))
    result: dict[str, Any] = {"greedy_mismatch": mismatch, "finish": greedy.finish_reasons}
    for name, rollouts in (("greedy", greedy), ("sampled", sampled)):
        trained = response_logprobs(trainer.model, rollouts.sequences(), [len(p) for p in prompts], micro_batch_size=4)
        result[f"logprob_{name}"] = max(abs(a - b) for row, ref in zip(rollouts.logprobs, trained, strict=True)
                                        for a, b in zip(row, ref, strict=True))
    return result


def gather_sum(stats: dict[str, float]) -> float:
    """Bytes written into generation weights by all ranks in one refit."""
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    total = torch.tensor([stats["copied_bytes"] + stats["received_bytes"]], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return float(total.item())


def run_case(case: dict[str, Any], payload: dict[str, Any], env: Any, tmp: str) -> dict[str, Any]:
    overrides = [*BASE, f"model.preset={case['preset']}", f"parallel.tensor={case['tensor']}",
                 f"parallel.pipeline={case['pipeline']}", f"run.output_dir={tmp}/{case['name']}",
                 *case.get("overrides", [])]
    config = load_config(sft.CONFIG, None, overrides)
    config.validate(env.world_size)
    parallel = ParallelState.initialize(ParallelLayout.from_config(config.parallel, env.world_size), env,
                                        seed=config.run.seed)
    trainer = Trainer(config, sft.create(config), parallel)
    tokens = torch.randint(0, trainer.model.preset.vocab_size, (4, 12), generator=torch.Generator().manual_seed(1))
    results: dict[str, Any] = {}
    for size in case["generation"]:
        backend = NativeBackend(config, GenerationParallelState.initialize(size), max_batch_size=4)
        resharder = Resharder(trainer.model.chunks, backend, bucket_bytes=2**15, transport=case["transport"])
        record: dict[str, Any] = {"reshard": resharder.reshard(), "buckets": len(resharder.plan.buckets),
                                  "transport": resharder.transport, "copied_bytes": gather_sum(resharder.reshard())}
        trainer.model.set_training(False)
        record["logits"] = [float((generation_logits(backend, tokens) - training_logits(trainer, parallel, tokens)).abs().max())]
        record.update(check_generation(backend, trainer, payload["prompts"], payload["max_new_tokens"]))
        for cycle in range(payload["cycles"]):
            trainer.model.set_training(True)
            trainer.train_step(cycle + 1)
            trainer.model.set_training(False)
            resharder.reshard()
            backend.generate(payload["prompts"][:2], SamplingParams(max_new_tokens=4))
            diff = (generation_logits(backend, tokens) - training_logits(trainer, parallel, tokens)).abs().max()
            record["logits"].append(float(diff))
        backend.release()
        results[f"gen_tp{size}"] = record
    trainer.metrics.close()
    dist.barrier()
    return results


def main() -> None:
    payload = json.loads(sys.argv[1])
    env = read_launch_env()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in payload["cases"]:
            results[case["name"]] = run_case(case, payload, env, tmp)
    if env.rank == 0:
        with open(sys.argv[2], "w") as fh:
            json.dump(results, fh)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
