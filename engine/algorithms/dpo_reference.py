"""``keel data ref-logprobs``: the reference model's log-probs of every DPO pair, computed once.

Training with ``dpo.reference_logprobs=<file>`` then needs no reference model in memory.
The command takes the same ``--config`` and overrides as ``keel train dpo`` (so the pairs,
tokenizer, template and sequence length are the run's), builds the reference at the
launch's layout (any TP×PP×DP under torchrun), and shards the pairs over the data-parallel
ranks. Each rank appends finished pairs to ``<output>.rank<r>.partial`` as it goes; a
killed run started again skips what is already there. At the end rank 0 merges the shards
into ``<output>`` (written to a temporary name, then renamed) and removes the partials.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from engine.config import ConfigError
from engine.data.batching import micro_batches_for
from engine.data.dpo import DPOPairs, read_reference_lines
from engine.files import write_json_lines_atomic
from engine.runtime import setup_logging, shutdown

logger = logging.getLogger(__name__)


def _writes(parallel: Any) -> bool:
    """One rank per data-parallel shard writes: the last pipeline stage's first tensor-parallel rank."""
    return bool(parallel.is_last_stage() and parallel.tp_rank == 0)


def _partial_path(output: Path, dp_rank: int) -> Path:
    return output.with_name(f"{output.name}.rank{dp_rank}.partial")


def _todo(dataset: DPOPairs, split: str, done: set[tuple[str, int]], dp_rank: int, dp_size: int) -> list[int]:
    return [i for i in range(dp_rank, len(dataset), dp_size) if (split, i) not in done]


def _pair_logprobs(step: Any, dataset: DPOPairs, indices: list[int], config: Any, parallel: Any) -> dict[int, Any]:
    """``{pair index: (chosen, rejected)}`` for ``indices`` (on the last stage; empty elsewhere)."""
    size = config.data.micro_batch_size
    groups = [indices[i: i + size] for i in range(0, len(indices), size)]
    # a short last group is filled with its last pair again (its result is the same): a pipeline's transfers
    # are sized by the first micro-batch, and a short one failed with a shape error at the last stage
    groups[-1] += groups[-1][-1:] * (size - len(groups[-1]))
    batches = micro_batches_for(groups, dataset, config.data.seq_length, parallel.layout, by_length=True)
    step.before_schedule(batches)
    if not parallel.is_last_stage():
        return {}
    out = {}
    for batch in batches:
        pairs = batch["reference_logps"].view(-1, 2)
        for index, (chosen, rejected) in zip(batch["pair_index"].tolist(), pairs.tolist(), strict=True):
            out[int(index)] = (chosen, rejected)
    return out


def _write_split(step: Any, dataset: DPOPairs, split: str, todo: list[int], config: Any, parallel: Any,
                 sink: Any, progress: Any, identity: str) -> None:
    writes = _writes(parallel)
    chunk = config.data.global_batch_size // parallel.layout.data or 1
    for start in range(0, len(todo), chunk):
        indices = todo[start: start + chunk]
        results = _pair_logprobs(step, dataset, indices, config, parallel)
        if writes:
            for index in indices:
                chosen, rejected = results[index]
                sink.write(json.dumps({"split": split, "index": index, "chosen": chosen, "rejected": rejected,
                                       "fingerprint": dataset.fingerprint(index), "reference": identity}) + "\n")
            sink.flush()
        if progress is not None:
            progress.update(len(indices) * parallel.layout.data)


def reference_identity(config: Any) -> str:
    """Which reference the log-probs come from: its resolved checkpoint directory, or the seeded initialisation."""
    from engine.checkpoint import dist as ckpt
    from engine.runner import starting_weights

    reference = starting_weights(config.dpo.reference or config.checkpoint.load, config.checkpoint.load)
    if reference is None:
        return f"init (model.init={config.model.init}, run.seed={config.run.seed})"
    path = ckpt.resolve(reference)
    return str((ckpt.find_latest(str(path)) if not ckpt.is_complete(path) else path) or path)


def _check_partial(partial: Path, records: list[dict[str, Any]], identity: str) -> None:
    """A partial file another reference began is refused (its pairs would mix two references' log-probs)."""
    other = next((r["reference"] for r in records if r.get("reference", identity) != identity), None)
    if other is not None:
        raise ConfigError(f"{partial} holds log-probs of reference {other}, and this run's is {identity}; delete it to "
                          "start over, or rerun with that reference")


def _merge(output: Path, dp_size: int) -> int:
    lines: list[dict[str, Any]] = []
    for rank in range(dp_size):
        lines += read_reference_lines(_partial_path(output, rank))
    lines.sort(key=lambda r: (r["split"], r["index"]))
    write_json_lines_atomic(output, lines)
    for rank in range(dp_size):
        _partial_path(output, rank).unlink(missing_ok=True)
    return len(lines)


def precompute(config: Any, parallel: Any, output: Path, progress_bar: bool = True) -> int:
    """Write the reference log-probs of ``config``'s train and validation pairs to ``output``; returns pairs."""
    from engine.algorithms.dpo import DPOStep
    from engine.data.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(config.data.tokenizer)
    step = DPOStep(dataclasses.replace(config.dpo, reference_logprobs=None))  # build the reference model itself
    step.setup(config, parallel, tokenizer)
    splits = dict(zip(("train", "validation"), DPOPairs.from_config(config, tokenizer), strict=True))
    partial = _partial_path(output, parallel.dp_rank)
    records, identity = read_reference_lines(partial), reference_identity(config)
    _check_partial(partial, records, identity)
    done = {(r["split"], int(r["index"])) for r in records}
    parallel.barrier()  # every rank of this shard has read the partial file before it grows
    todo = {name: _todo(data, name, done, parallel.dp_rank, parallel.layout.data) for name, data in splits.items()}
    progress = _progress(sum(len(d) for d in splits.values()), len(done) * parallel.layout.data,
                         progress_bar and parallel.is_main)
    with open(partial, "a") if _writes(parallel) else open(os.devnull, "w") as sink:
        for name, dataset in splits.items():
            _write_split(step, dataset, name, todo[name], config, parallel, sink, progress, identity)
    if progress is not None:
        progress.close()
    parallel.barrier()
    count = _merge(output, parallel.layout.data) if parallel.is_main else 0
    parallel.barrier()
    return count


def _progress(total: int, initial: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from engine.progress import progress_bar

    return progress_bar(total=total, initial=min(initial, total), desc="reference log-probs", unit="pair")


def cmd_ref_logprobs(args: argparse.Namespace) -> int:
    from engine.algorithms.dpo import DPOTrainConfig
    from engine.config import load_config
    from engine.parallel.layout import ParallelLayout, ParallelState, read_launch_env

    config = load_config(DPOTrainConfig, args.config, [*args.overrides, "dpo.reference_logprobs=null"])
    env = read_launch_env()
    config.validate(env.world_size)
    setup_logging(config.logging.level)
    parallel = ParallelState.initialize(ParallelLayout.from_config(config.parallel, env.world_size), env,
                                        seed=config.run.seed, timeout_minutes=config.parallel.timeout_minutes)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        count = precompute(config, parallel, output, config.logging.progress)
    if parallel.is_main:
        print(f"wrote reference log-probs of {count} pairs to {output}", flush=True)
    shutdown()
    return 0


def register(subparsers: Any) -> None:
    """Add ``ref-logprobs`` to ``keel data``."""
    parser = subparsers.add_parser(
        "ref-logprobs", help="precompute a DPO reference model's log-probs of every pair",
        description="Run the DPO reference model (dpo.reference or checkpoint.load) forward over the train and "
        "validation pairs of a DPO config once, sharded over data-parallel ranks (run under torchrun for "
        "several), resumable; train with dpo.reference_logprobs=OUTPUT to keep no reference model in memory.")
    parser.add_argument("output", help="output .jsonl file")
    parser.add_argument("--config", help="the DPO run's YAML config")
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides, as for keel train dpo")
    parser.set_defaults(func=cmd_ref_logprobs)
