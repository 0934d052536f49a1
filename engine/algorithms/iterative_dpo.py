"""Iterative DPO (HelpSteer2 recipe): sample n, pair the best against the worst, one DPO round; repeat.

Per iteration (loop: :mod:`engine.iterative_trainer`):

1. ``rollout.samples_per_prompt`` (n = 10) responses per prompt from the current policy
   (temperature 0.7, top-p 0.9), scored with the total reward of the sampling phase: the reward
   model's goodness (``reward_model``: helpfulness-weighted attributes of a regression model, or a
   BT score; the recipe) and/or program-checked reward functions (``reward_functions``, e.g.
   ``synthetic_check``); samples a reward function skipped are left out;
2. per prompt the highest-scored sample is chosen and the lowest-scored one rejected (the first of
   equal ones, in sample order); a prompt whose best and worst scores are equal is dropped and
   counted (``ties``) — :func:`best_worst_pairs`;
3. one DPO round (:class:`~engine.algorithms.dpo.DPOStep`, its loss and metrics) of ``rollout.epochs``
   (3) passes over the pairs, **the reference of round k being the policy at the start of round k**
   (its weights are copied into the frozen reference model before the round).

Defaults are the recipe's: n 10, 3 epochs per round, LR 9e-8 constant, β 1e-3.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from engine.algorithms.dpo import DPOConfig, DPOStep
from engine.algorithms.iterative import IterativeTrainConfig, copy_weights, mean, optimizer_with_lr, recipe_rollout
from engine.algorithms.online import PromptSampling, RolloutConfig
from engine.config import ConfigError, DataConfig, OptimizerConfig

logger = logging.getLogger(__name__)


def best_worst_pairs(scores: dict[int, list[Optional[float]]]) -> tuple[list[tuple[int, int, int]], int]:
    """``([(prompt, best sample, worst sample)], ties)`` from each prompt's sample scores (None = left out).

    The best is the first sample with the highest score, the worst the first with the lowest; a prompt
    whose highest and lowest scores are equal (or with fewer than two scored samples) is a tie: dropped.
    """
    pairs, ties = [], 0
    for prompt in sorted(scores):
        scored = [(s, i) for i, s in enumerate(scores[prompt]) if s is not None]
        if len(scored) < 2:
            ties += 1
            continue
        high = max(s for s, _ in scored)
        low = min(s for s, _ in scored)
        if high == low:
            ties += 1
            continue
        best = next(i for s, i in scored if s == high)
        worst = next(i for s, i in scored if s == low)
        pairs.append((prompt, best, worst))
    return pairs, ties


@dataclass
class IterativeDPOTrainConfig(IterativeTrainConfig):
    """``keel train iterative-dpo``: the sampling sections, ``iterative`` and ``dpo`` (its loss settings)."""

    ALGORITHM: ClassVar[str] = "iterative-dpo"
    FROZEN: ClassVar[tuple[str, ...]] = ("reward_model",)  # each round's reference is the policy, not `reference`
    GROUP_NEEDS: ClassVar[str] = "iterative DPO pairs the best and the worst response of a prompt"
    OVERLONG: ClassVar[tuple[str, ...]] = ("cut_prompt", "drop")  # a pair's responses stay whole
    # its pairs of samples are fitted to data.seq_length per data.overlong
    IGNORED: ClassVar[dict[str, str]] = {k: v for k, v in IterativeTrainConfig.IGNORED.items() if k != "data.overlong"}

    rollout: RolloutConfig = field(default_factory=lambda: recipe_rollout(epochs=3))
    dpo: DPOConfig = field(default_factory=lambda: DPOConfig(beta=1e-3))
    optimizer: OptimizerConfig = optimizer_with_lr(9e-8)
    data: DataConfig = field(default_factory=lambda: DataConfig(seq_length=256, overlong="cut_prompt"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dpo.reference is not None or self.dpo.reference_logprobs is not None:
            raise ConfigError("iterative-dpo: the reference of each round is the policy at its start; leave "
                              "dpo.reference and dpo.reference_logprobs unset (checkpoint.load sets the start policy)")


class IterativeDPOStep(PromptSampling, DPOStep):
    """DPO's step, with the iterative trainer's hooks (sampling, pairing, reference refresh)."""

    name = "iterative-dpo"
    iterative = True  # run by engine.iterative_trainer.IterativeTrainer

    def setup(self, config: Any, parallel: Any, tokenizer: Any) -> None:
        """A frozen model the shape of the policy: each round copies the policy's weights into it."""
        from engine.runner import ModelRunner

        self.parallel = parallel
        self.reference = ModelRunner.frozen(config, parallel, self.model_class(), None)

    def target(self, prompt_index: int) -> Optional[str]:
        return None  # not attribute-conditioned

    def score_samples(self, trainer: Any, rows: list[Any], attributes: list[Any], prompts: list[list[int]],
                      rollouts: Any, responses: list[str]) -> list[dict[str, Any]]:
        scores, components, keep = trainer.phase.score(rows, responses, rollouts.lengths)
        return [{"score": float(scores[i]) if keep[i] else None,
                 "components": {name: column[i] for name, column in components.items()}}
                for i in range(len(rows))]

    def round_data(self, trainer: Any, samples: list[dict[str, Any]]) -> tuple[Any, list[dict[str, Any]], str, dict[str, Any]]:
        """(DPO pairs data set, pairs.jsonl rows, its name, summary) of the iteration's samples."""
        from engine.data.dpo import DPOPairs

        by_prompt: dict[int, list[dict[str, Any]]] = {}
        for sample in samples:
            by_prompt.setdefault(sample["prompt_index"], []).append(sample)
        chosen, ties = best_worst_pairs({p: [s["score"] for s in group] for p, group in by_prompt.items()})
        rows = []
        for prompt, best, worst in chosen:
            good, bad = by_prompt[prompt][best], by_prompt[prompt][worst]
            rows.append({"prompt_index": prompt, "prompt": trainer.prompts[prompt].prompt,
                         "chosen": good["response"], "rejected": bad["response"], "chosen_sample": best,
                         "rejected_sample": worst, "chosen_score": good["score"], "rejected_score": bad["score"]})
        data = trainer.config.data
        dataset = DPOPairs(rows, trainer.tokenizer, data.seq_length, template=data.chat_template,
                           overlong=data.overlong, source="the iteration's pairs")
        summary = {"pairs": len(rows), "ties": ties, "pairs_trained": len(dataset),
                   "score_gap": mean([r["chosen_score"] - r["rejected_score"] for r in rows])}
        logger.info("iterative-dpo: %d pairs, %d prompts dropped as ties", len(rows), ties)
        return dataset, rows, "pairs.jsonl", summary

    def begin_round(self, trainer: Any) -> None:
        """The reference of this round := the policy at its start."""
        copy_weights(trainer.model, self.reference)

    def sample_summary(self, samples: list[dict[str, Any]]) -> dict[str, float]:
        scores = [s["score"] for s in samples if s["score"] is not None]
        return {"reward": mean(scores), "reward_max": max(scores, default=float("nan")),
                "reward_min": min(scores, default=float("nan")), "skipped": float(len(samples) - len(scores)),
                "response_length": mean([float(len(s["tokens"])) for s in samples]),
                "stopped": mean([float(s["finish_reason"] == "stop") for s in samples])}

    def evaluate(self, trainer: Any, rows: list[Any]) -> dict[str, float]:
        """Greedy (and ``rollout.eval_samples_per_prompt`` sampled) answers to the held-out prompts, scored like
        the samples."""
        values: dict[str, float] = trainer.phase.evaluate_held_out(rows)
        return values

    def curve_metrics(self) -> tuple[str, ...]:
        return ("reward", "pairs", "dpo_loss", "response_length")


CONFIG = IterativeDPOTrainConfig


def create(config: Any) -> IterativeDPOStep:
    return IterativeDPOStep(config.dpo)
