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

Over-long rows: no score is read from a cut response. A row longer than ``seq_length``
keeps its response whole and loses the start of its prompt (:mod:`engine.data.fit`, as
in training); a row whose response alone does not fit gets no score (NaN, logged). The
two responses of a pair share one prompt, cut to fit the longer of them, and a pair with
a response that does not fit is left out and counted.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from engine.algorithms.reward import GOODNESS_WEIGHTS, RewardConfig, RewardStep, RewardTrainConfig
from engine.data.batching import length_multiple, padded_length, to_device
from engine.data.chat import prompt_messages, render_reply
from engine.data.fit import fit_prompt
from engine.data.schemas import ATTRIBUTES
from engine.errors import ConfigError
from engine.parallel.collectives import from_last_stage, gather_data_parallel_rows
from engine.runner import ModelRunner
from engine.runtime import EVERY_RANK

logger = logging.getLogger(__name__)

__all__ = ["GOODNESS_WEIGHTS", "RewardScorer", "check_weights", "score_pairs_from_checkpoint"]


class RewardScorer:
    """Scores rows with a reward model on this rank: a :class:`ModelRunner`, or its chunks
    (unwrapped or DDP-wrapped, e.g. a model that is training)."""

    def __init__(self, model: ModelRunner | list[Any], step: RewardStep, tokenizer: Any, parallel: Any,
                 seq_length: int, micro_batch_size: int = 8, template: str = "plain"):
        self.model = model if isinstance(model, ModelRunner) else ModelRunner(model, None, None, parallel)
        self.step = step
        self.tokenizer = tokenizer
        self.parallel = parallel
        self.seq_length = seq_length
        self.micro_batch_size = micro_batch_size
        self.template = template

    def fit(self, prompt: Any, response: str, room: int = 0) -> Optional[tuple[list[int], bool]]:
        """(ids of prompt + whole response, whether the prompt was cut), or None when the response does not fit.

        ``room``: positions to leave for the reply at least (a pair's longer response).
        """
        reply = render_reply(response, self.tokenizer, self.template)
        fitted = fit_prompt(prompt_messages(prompt), max(len(reply), room), self.tokenizer, self.template,
                            self.seq_length)
        return None if fitted is None else (fitted[0] + reply, fitted[1])

    def reply_length(self, response: str) -> int:
        return len(render_reply(response, self.tokenizer, self.template))

    @property
    def chunks(self) -> list[Any]:
        return list(self.model.chunks)

    def _encode(self, prompt: Any, response: str, room: int = 0) -> Optional[dict[str, torch.Tensor]]:
        fitted = self.fit(prompt, response, room)
        if fitted is None:
            return None
        ids = fitted[0]
        pad = self.seq_length - len(ids)
        return {
            "tokens": torch.tensor(ids + [self.tokenizer.pad_id] * pad, dtype=torch.long),
            "end_index": torch.tensor(len(ids) - 1, dtype=torch.long),
        }

    def _micro_batches(self, rows: list[tuple[Any, ...]]) -> tuple[list[dict[str, torch.Tensor]], list[int], int]:
        """(micro-batches, row index of each batched item, sequence length of the schedule).

        Items are ordered longest first; each micro-batch keeps only the positions up to its
        longest row (see the module docstring). Rows whose response does not fit are left out.
        """
        encoded = [self._encode(*row) for row in rows]
        items = {i: item for i, item in enumerate(encoded) if item is not None}
        if not items:
            return [], [], 0
        order = sorted(items, key=lambda i: -int(items[i]["end_index"]))
        order += [order[-1]] * (-len(order) % self.micro_batch_size)  # pad the last micro-batch
        multiple = length_multiple(self.parallel.layout)
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
    def _local_rewards(self, rows: list[tuple[Any, ...]]) -> torch.Tensor:
        """Rewards ``[len(rows), K]`` of this data-parallel rank's rows, on every pipeline stage."""
        outputs: list[torch.Tensor] = []
        batches, order, _ = self._micro_batches(rows) if rows else ([], [], 0)
        if batches:

            def forward_step(data_iterator: Any, model: Any) -> tuple[torch.Tensor, Any]:
                batch = to_device(next(data_iterator))
                return self.step.forward(model, batch, self.parallel), lambda out, non_loss_data=True: out

            self.model.set_training(False)
            outputs = self.model.run_schedule(batches, forward_step, forward_only=True, collect_outputs=True)
        rewards = torch.zeros(len(rows), self.step.head_size, dtype=torch.float32)
        scored = len(set(order))
        if outputs and self.parallel.is_last_stage():
            batched = torch.cat([o.float().cpu() for o in outputs])[:scored]  # drop the padding items
            rewards[torch.tensor(order[:scored])] = batched
        unfit = sorted(set(range(len(rows))) - set(order))
        if unfit:  # no score is read from a cut response
            rewards[unfit] = float("nan")
        if unfit and self.parallel.tp_rank == 0 and self.parallel.is_last_stage():  # once per replica
            logger.warning("%d of %d rows not scored (NaN): the response alone is longer than seq_length=%d",
                           len(unfit), len(rows), self.seq_length, extra=EVERY_RANK)  # of this replica's rows
        return from_last_stage(rewards, self.parallel)

    def score(self, rows: Sequence[tuple[Any, ...]]) -> torch.Tensor:
        """Rewards ``[len(rows), K]`` for ``(prompt, response[, room])`` rows, in order, on every rank.

        A row whose response does not fit ``seq_length`` gets NaN (see the module docstring).
        """
        dp_size, dp_rank = self.parallel.layout.data, self.parallel.dp_rank
        local = self._local_rewards([rows[i] for i in range(dp_rank, len(rows), dp_size)])
        return gather_data_parallel_rows(local, len(rows), self.parallel)

    def scalar(self, rewards: torch.Tensor, weights: Optional[dict[str, float]] = None) -> torch.Tensor:
        """One score per row: BT reward, or the weighted attributes (``weights`` or the model's)."""
        if self.step.rm.type == "bt" or weights is None:
            return self.step.scores(rewards)
        vector = torch.tensor([weights.get(a, 0.0) for a in self.step.rm.attributes])
        return (rewards * vector).sum(-1)


def reward_model_config(checkpoint: str, overrides: Sequence[str] = (),
                        setting: str = "") -> tuple[Path, RewardTrainConfig]:
    """(resolved path, saved config with ``overrides``) of a reward-model checkpoint; nothing is built. ``setting``:
    the option that named it (``reward_model``), said when it is refused."""
    from engine.checkpoint import dist as ckpt
    from engine.config import checked_overrides, from_dict, merge_dicts

    override_tree = checked_overrides(RewardTrainConfig, list(overrides))
    path = ckpt.locate(checkpoint, "reward model")
    meta = ckpt.read_meta(path)
    if meta.get("algorithm") != "rm":  # its saved config would fail as a reward model's, naming a data format
        named = f"{setting}=" if setting else ""
        raise ConfigError(f"{named}{checkpoint}: a {meta.get('algorithm')} checkpoint, not a reward model (keel train "
                          "rm)")
    saved = dict(meta["config"])
    saved["parallel"] = scoring_layout(saved.get("parallel", {}), override_tree.get("parallel", {}))
    if saved.get("data", {}).get("overlong") == "truncate":  # runs saved before reward data refused it
        saved["data"] = dict(saved["data"], overlong="cut_prompt")
    saved["data"] = {k: v for k, v in saved.get("data", {}).items() if f"data.{k}" not in RewardTrainConfig.IGNORED}
    config = from_dict(RewardTrainConfig, merge_dicts(saved, override_tree), f"{path}/{ckpt.META}")
    return path, config


def scoring_layout(saved: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """The ``parallel`` section to score with. The saved one is where the reward model was trained, not a
    property of its weights (checkpoints load at any layout): its tensor and pipeline sizes are kept when no
    ``parallel.*`` is given and this world's size admits them; sequence parallelism, virtual stages and the
    rest take the defaults (a reward model trained with them failed to load alone or beside a policy)."""
    from engine.parallel.layout import read_launch_env

    tensor, pipeline = int(saved.get("tensor") or 1), int(saved.get("pipeline") or 1)
    if given or (tensor, pipeline) == (1, 1):
        return {}
    world = read_launch_env().world_size
    if world % (tensor * pipeline):
        logger.info("the reward model was trained at parallel.tensor=%d parallel.pipeline=%d, which %d rank(s) "
                    "cannot hold: it scores at tensor=1 pipeline=1", tensor, pipeline, world)
        return {}
    return {"tensor": tensor, "pipeline": pipeline}


def load_scorer(checkpoint: str, overrides: Sequence[str] = (),
                weights: Optional[dict[str, float]] = None) -> RewardScorer:
    """Build the reward model of ``checkpoint`` at the current layout (process groups created if needed);
    ``weights`` to score with that the model cannot use are refused first (:func:`check_weights`)."""
    from engine.data.tokenizers import load_tokenizer
    from engine.parallel.layout import ParallelLayout, ParallelState, read_launch_env
    path, config = reward_model_config(checkpoint, overrides)
    check_weights(weights, config.rm, checkpoint)  # before the model is built
    env = read_launch_env()
    layout = ParallelLayout.from_config(config.parallel, env.world_size)
    parallel = ParallelState(layout, env) if dist.is_initialized() else \
        ParallelState.initialize(layout, env, config.run.seed, config.parallel.timeout_minutes)
    step = RewardStep(config.rm)
    model = ModelRunner.frozen(config, parallel, step.model_class())
    model.load(path)  # strict: every key
    return RewardScorer(model, step, load_tokenizer(config.data.tokenizer), parallel, config.data.seq_length,
                        config.data.micro_batch_size, config.data.chat_template)


def check_weights(weights: Optional[dict[str, float]], rm: RewardConfig, checkpoint: str) -> None:
    """Refuse ``--weights`` the model cannot use: any on a Bradley-Terry model (it gives one score), and an
    attribute it does not predict (unknown, as ``rm.score_weights`` refuses in training, or not in its
    ``rm.attributes``), which weighed nothing: every pair tied at 0 and scored 0% accuracy."""
    if weights is None:
        return
    if rm.type == "bt":
        raise ConfigError(f"--weights: {checkpoint} is a Bradley-Terry reward model, which gives one score; "
                          "attribute weights apply to regression models only: leave --weights out")
    unknown = [name for name in weights if name not in ATTRIBUTES]
    if unknown:
        raise ConfigError(f"--weights has unknown attributes {unknown}; this model ({checkpoint}) predicts "
                          f"{', '.join(rm.attributes)}")
    unpredicted = [name for name in weights if name not in rm.attributes]
    if unpredicted:
        raise ConfigError(f"--weights names {', '.join(unpredicted)}, which {checkpoint} does not predict; it "
                          f"predicts {', '.join(rm.attributes)} (its rm.attributes)")
    if not any(weights.get(name) for name in rm.attributes):
        raise ConfigError(f"--weights gives every attribute weight 0, so every pair ties; {checkpoint} predicts "
                          f"{', '.join(rm.attributes)}")


def pair_fit(scorer: RewardScorer, row: dict[str, Any]) -> tuple[str, int]:
    """(status, room) of a pair: ``"whole"``, ``"prompt_cut"`` or ``"dropped"``, and its longer reply length."""
    room = max(scorer.reply_length(row["chosen"]), scorer.reply_length(row["rejected"]))
    fitted = scorer.fit(row["prompt"], row["chosen"], room)
    return ("dropped" if fitted is None else "prompt_cut" if fitted[1] else "whole"), room


SCORE_CHUNK = 512  # responses scored between two updates of the progress bar


def score_in_chunks(scorer: RewardScorer, rows: Sequence[tuple[Any, ...]], progress: bool = False) -> torch.Tensor:
    """:meth:`RewardScorer.score` of ``rows``, :data:`SCORE_CHUNK` at a time, with a progress bar on rank 0."""
    from engine.progress import progress_bar

    bar = progress_bar(total=len(rows), desc="scoring", unit="response") \
        if progress and scorer.parallel.is_main else None
    parts = []
    for start in range(0, len(rows), SCORE_CHUNK):
        parts.append(scorer.score(rows[start: start + SCORE_CHUNK]))
        if bar is not None:
            bar.update(len(parts[-1]))
    if bar is not None:
        bar.close()
    return torch.cat(parts) if parts else torch.empty(0, scorer.step.head_size)


def score_pairs_from_checkpoint(
    checkpoint: str, rows: list[dict[str, Any]], weights: Optional[dict[str, float]], overrides: Sequence[str] = (),
    progress: bool = False,
) -> tuple[list[float], list[float], Optional[dict[str, Any]], list[str]]:
    """(chosen scores, rejected scores, attributes, fit status per pair), on every rank.

    ``attributes``: None for a Bradley-Terry model, else ``{"names", "chosen", "rejected"}`` with the
    per-attribute rewards of each response.

    Status per pair (see :func:`pair_fit`); a ``"dropped"`` pair is not scored (NaN scores). ``weights``
    the model cannot use are refused (:func:`check_weights`) before it is built. ``progress``: a bar on rank 0.
    """
    owns_group = not dist.is_initialized()
    scorer = load_scorer(checkpoint, overrides, weights)
    fits = [pair_fit(scorer, row) for row in rows]
    flat = [(row["prompt"], row[side], room) for row, (status, room) in zip(rows, fits, strict=True)
            if status != "dropped" for side in ("chosen", "rejected")]
    kept = torch.tensor([status != "dropped" for status, _ in fits], dtype=torch.bool)
    rewards = torch.full((2 * len(rows), scorer.step.head_size), float("nan"))
    rewards[kept.repeat_interleave(2)] = score_in_chunks(scorer, flat, progress)
    scores = scorer.scalar(rewards, weights if weights is not None else None)
    chosen, rejected = scores[0::2].tolist(), scores[1::2].tolist()
    attributes = ({"names": list(scorer.step.rm.attributes), "chosen": rewards[0::2].tolist(),
                   "rejected": rewards[1::2].tolist()} if scorer.step.rm.type == "regression" else None)
    if owns_group:  # created here for this call: tear it down again
        scorer.parallel.destroy_model_parallel()
        dist.barrier()
        dist.destroy_process_group()
    return chosen, rejected, attributes, [status for status, _ in fits]
