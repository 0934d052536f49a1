"""Run N SFT steps for several layouts inside one launch; rank 0 writes losses as JSON.

argv: JSON {"algo": "sft"|"rm"|"dpo", "base": [overrides], "cases": {name: [overrides]}, "steps": N}, output path.
After the steps, each case records one validation loss.
Each case re-initialises megatron's model-parallel groups over the same world. DPO cases at
PP1 also record how far the kernels' sequence log-probs of the trained model's
(vocabulary-parallel) logits are from a plain log_softmax + gather on the gathered logits.
"""

from __future__ import annotations

import json
import sys
import tempfile

import torch
import torch.distributed as dist

from engine.cli import ALGORITHMS
from engine.config import load_config
from engine.parallel.layout import ParallelLayout, ParallelState, read_launch_env
from engine.trainer import Trainer


def main() -> None:
    payload = json.loads(sys.argv[1])
    env = read_launch_env()
    module = __import__(ALGORITHMS[payload.get("algo", "sft")][0], fromlist=["create"])
    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in payload["cases"].items():
            config = load_config(module.CONFIG, None, payload["base"] + overrides + [f"run.output_dir={tmp}/{name}"])
            config.validate(env.world_size)
            layout = ParallelLayout.from_config(config.parallel, env.world_size)
            parallel = ParallelState.initialize(layout, env, seed=config.run.seed)
            step = module.create(config)
            trainer = Trainer(config, step, parallel)
            losses, norms = [], []
            for number in range(1, payload["steps"] + 1):
                metrics = trainer.train_step(number)
                losses.append(metrics[step.loss_name])
                norms.append(metrics["grad_norm"])
            # then one validation: the held-out rows fill less than one global batch, so it is read once with
            # rows that count nothing spread over the data-parallel ranks (tests/engine/test_validation_once.py)
            results[name] = {"loss": losses, "grad_norm": norms, "valid": [trainer.evaluate()[step.loss_name]],
                             "valid_rows": [float(len(trainer.valid_data))]}
            if payload.get("algo") == "dpo" and layout.pipeline == 1:
                results[name]["logprob_diff"] = [_logprob_difference(trainer, parallel)]
            trainer.metrics.close()
            dist.barrier()
    if env.rank == 0:
        with open(sys.argv[2], "w") as fh:
            json.dump(results, fh)
    dist.destroy_process_group()


@torch.no_grad()
def _logprob_difference(trainer: Trainer, parallel: ParallelState) -> float:
    """max |kernels' sequence log-probs - log_softmax/gather reference| on one batch of real logits."""
    from engine.algorithms.logprobs import lm_forward, sequence_logprobs
    from keel_kernels.logprob import gather_vocab_shards

    batch = trainer.train_data.collate([0, 1])
    logits = lm_forward(trainer.model.chunks[0], batch)
    kernel, _ = sequence_logprobs(logits, batch["labels"], batch["loss_mask"], parallel)
    full = gather_vocab_shards(logits, parallel.tp_group) if parallel.layout.tensor > 1 else logits
    picked = torch.log_softmax(full.float(), dim=-1).gather(-1, batch["labels"].unsqueeze(-1)).squeeze(-1)
    reference = (picked * batch["loss_mask"]).sum(-1)
    return float((kernel - reference).abs().max())


if __name__ == "__main__":
    main()
