"""Batched reward scoring, usable in-process (PPO, REINFORCE, iterative DPO) and by ``keel eval``.

:class:`RewardScorer` wraps a reward model that is already built on this rank (any
TP×PP×DP layout) and scores ``(prompt, response)`` rows: rows are sharded over the
data-parallel ranks, run forward-only through megatron's schedule (so pipeline stages
work), the last stage's rewards are shared with the whole pipeline, and the shards are
gathered back into row order on every rank. It holds no trainer, optimizer or data set.

Padding is not computed: rows are sorted by length before they are cut into micro-batches,
and each micro-batch is cut to its longest row (rounded up to a multiple of 8, times the
tensor-parallel size so sequence parallelism can split it). The reward is read at each
row's end token under causal attention, which never sees the positions after it, so the
cut changes no reward. With pipeline stages every micro-batch must have the same shape
(the stages exchange fixed-size buffers), so all are cut to the longest row of the call.

:func:`score_pairs_from_checkpoint` builds a scorer from a reward-model checkpoint at the
current layout and scores ``{prompt, chosen, rejected}`` rows.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.distributed as dist

from engine.algorithms.reward import GOODNESS_WEIGHTS, RewardStep, RewardTrainConfig
from engine.data.batching import padded_length
from engine.data.chat import prompt_messages, render_prompt, render_reply
from engine.parallel.collectives import from_last_stage, gather_data_parallel_rows
from engine.runner import ModelRunner

logger = logging.getLogger(__name__)

__all__ = ["GOODNESS_WEIGHTS", "RewardScorer", "score_pairs_from_checkpoint"]


class RewardScorer:
    """Scores rows with a reward model on this rank: a :class:`ModelRunner`, or its chunks
    (unwrapped or DDP-wrapped, e.g. a model that is training)."""

    def __init__(self, model: ModelRunner | list[Any], step: RewardStep, tokenizer: Any, parallel: Any,
                 seq_length: int, micro_batch_size: int = 8, template: str = "plain"):
        self.model = model if isinstance(model, ModelRunner) else ModelRunner(model, None, None, parallel)
        self.chunks = self.model.chunks
        self.step = step
        self.tokenizer = tokenizer
        self.parallel = parallel
        self.seq_length = seq_length
        self.micro_batch_size = micro_batch_size
        self.template = template

    def _encode(self, prompt: Any, response: str) -> dict[str, torch.Tensor]:
        ids = render_prompt(prompt_messages(prompt), self.tokenizer, self.template)
        ids = (ids + render_reply(response, self.tokenizer, self.template))[: self.seq_length]
        pad = self.seq_length - len(ids)
        return {
            "tokens": torch.tensor(ids + [self.tokenizer.pad_id] * pad, dtype=torch.long),
            "end_index": torch.tensor(len(ids) - 1, dtype=torch.long),
        }

    def _micro_batches(self, rows: list[tuple[Any, str]]) -> tuple[list[dict[str, torch.Tensor]], list[int], int]:
        """(micro-batches, row index of each batched item, sequence length of the schedule).

        Items are ordered longest first; each micro-batch keeps only the positions up to its
        longest row (see the module docstring).
        """
        items = [self._encode(prompt, response) for prompt, response in rows]
        order = sorted(range(len(items)), key=lambda i: -int(items[i]["end_index"]))
        order += [order[-1]] * (-len(order) % self.micro_batch_size)  # pad the last micro-batch
        multiple = 8 * self.parallel.layout.tensor
        longest = padded_length(int(items[order[0]]["end_index"]) + 1, self.seq_length, multiple)
        batches = []
        for i in range(0, len(order), self.micro_batch_size):
            chunk = [items[j] for j in order[i: i + self.micro_batch_size]]
            length = longest if self.parallel.layout.pipeline > 1 else \
                padded_length(int(chunk[0]["end_index"]) + 1, self.seq_length, multiple)
            batches.append({"tokens": torch.stack([item["tokens"][:length] for item in chunk]),
                            "end_index": torch.stack([item["end_index"] for item in chunk])})
        return batches, order, longest

    @torch.no_grad()
    def _local_rewards(self, rows: list[tuple[Any, str]]) -> torch.Tensor:
        """Rewards ``[len(rows), K]`` of this data-parallel rank's rows, on every pipeline stage."""
        outputs: list[torch.Tensor] = []
        order: list[int] = []
        if rows:
            batches, order, _ = self._micro_batches(rows)

            def forward_step(data_iterator: Any, model: Any) -> tuple[torch.Tensor, Any]:
                batch = next(data_iterator)
                if torch.cuda.is_available():
                    batch = {k: v.cuda() for k, v in batch.items()}
                return self.step.forward(model, batch, self.parallel), lambda out, non_loss_data=True: out

            self.model.set_training(False)
            outputs = self.model.run_schedule(batches, forward_step, forward_only=True, collect_outputs=True)
        rewards = torch.zeros(len(rows), self.step.head_size, dtype=torch.float32)
        if outputs and self.parallel.is_last_stage():
            batched = torch.cat([o.float().cpu() for o in outputs])[: len(rows)]  # drop the padding items
            rewards[torch.tensor(order[: len(rows)])] = batched
        return from_last_stage(rewards, self.parallel)

    def score(self, rows: Sequence[tuple[Any, str]]) -> torch.Tensor:
        """Rewards ``[len(rows), K]`` for ``(prompt, response)`` rows, in order, on every rank."""
        dp_size, dp_rank = self.parallel.layout.data, self.parallel.dp_rank
        local = self._local_rewards([rows[i] for i in range(dp_rank, len(rows), dp_size)])
        return gather_data_parallel_rows(local, len(rows), self.parallel)

    def scalar(self, rewards: torch.Tensor, weights: Optional[dict[str, float]] = None) -> torch.Tensor:
        """One score per row: BT reward, or the weighted attributes (``weights`` or the model's)."""
        if self.step.rm.type == "bt" or weights is None:
            return self.step.scores(rewards)
        vector = torch.tensor([weights.get(a, 0.0) for a in self.step.rm.attributes])
        return (rewards * vector).sum(-1)


def load_scorer(checkpoint: str, overrides: Sequence[str] = ()) -> RewardScorer:
    """Build the reward model of ``checkpoint`` at the current layout (process groups created if needed)."""
    from engine.checkpoint import dist as ckpt
    from engine.config import from_dict, merge_dicts, parse_overrides
    from engine.data.tokenizers import load_tokenizer
    from engine.parallel.layout import ParallelLayout, ParallelState, read_launch_env
    path = ckpt.resolve(checkpoint)
    meta = ckpt.read_meta(path)
    saved = dict(meta["config"])
    saved["parallel"] = dict(saved["parallel"], data=None)
    config = from_dict(RewardTrainConfig, merge_dicts(saved, parse_overrides(list(overrides))), f"{path}/{ckpt.META}")
    env = read_launch_env()
    layout = ParallelLayout.from_config(config.parallel, env.world_size)
    parallel = ParallelState(layout, env) if dist.is_initialized() else \
        ParallelState.initialize(layout, env, config.run.seed, config.parallel.timeout_minutes)
    step = RewardStep(config.rm)
    model = ModelRunner.frozen(config, parallel, step.model_class())
    model.load(path)  # strict: every key
    return RewardScorer(model, step, load_tokenizer(config.data.tokenizer), parallel, config.data.seq_length,
                        config.data.micro_batch_size, config.data.chat_template)


def score_pairs_from_checkpoint(
    checkpoint: str, rows: list[dict[str, Any]], weights: Optional[dict[str, float]], overrides: Sequence[str] = (),
) -> tuple[list[float], list[float], Optional[list[list[float]]]]:
    """(chosen scores, rejected scores, per-attribute chosen rewards or None) for pair rows, on every rank."""
    owns_group = not dist.is_initialized()
    scorer = load_scorer(checkpoint, overrides)
    flat = [(row["prompt"], row[side]) for row in rows for side in ("chosen", "rejected")]
    rewards = scorer.score(flat)
    scores = scorer.scalar(rewards, weights if weights is not None else None)
    chosen, rejected = scores[0::2].tolist(), scores[1::2].tolist()
    attributes = rewards[0::2].tolist() if scorer.step.rm.type == "regression" else None
    if owns_group:  # created here for this call: tear it down again
        scorer.parallel.destroy_model_parallel()
        dist.barrier()
        dist.destroy_process_group()
    return chosen, rejected, attributes
