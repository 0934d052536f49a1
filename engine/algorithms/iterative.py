"""What the sample-and-train recipes share (iterative DPO, SteerLM 2.0; loop in :mod:`engine.iterative_trainer`).

Both sample ``rollout.samples_per_prompt`` responses per prompt from the current policy on the
generation backend (temperature 0.7, top-p 0.9 by default, as the HelpSteer2 recipes), score them,
and train one round on the result, for ``iterative.iterations`` iterations. The sections are those
of the online algorithms (:class:`~engine.algorithms.online.OnlineTrainConfig`: ``rollout``,
``reward_functions``, ``reward_model``, ``reference``) plus ``iterative``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch

from engine.algorithms.online import OnlineTrainConfig, RolloutConfig
from engine.config import ConfigError, OptimizerConfig, RunConfig, SchedulerConfig, doc

logger = logging.getLogger(__name__)


@dataclass
class IterativeConfig:
    iterations: int = doc("Sample-and-train iterations.", 3)
    chunk_prompts: int = doc(
        "Prompts per chunk of samples: each chunk (its prompts' n samples, scored) is written to "
        "<run>/iterations/iter_<k>/chunks/ as one file, the unit a killed iteration resumes from.", 16)
    evaluate: bool = doc("Greedy answers to rollout.eval_prompts, scored, before the first iteration and after "
                         "each one (validation rows of metrics.jsonl).", True)

    def __post_init__(self) -> None:
        for name in ("iterations", "chunk_prompts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"iterative.{name}={getattr(self, name)} must be >= 1")


def recipe_rollout(epochs: int) -> RolloutConfig:
    """The HelpSteer2 sampling: n=10 per prompt, temperature 0.7, top-p 0.9; ``epochs`` passes per round."""
    return RolloutConfig(samples_per_prompt=10, temperature=0.7, top_p=0.9, epochs=epochs, prompts_per_iteration=64,
                         max_new_tokens=256)


def constant_schedule() -> SchedulerConfig:
    return SchedulerConfig(type="constant", warmup_steps=0)


@dataclass
class IterativeTrainConfig(OnlineTrainConfig):
    """The online sections (``rollout``, rewards, ``reference``) plus ``iterative``."""

    BUFFER_IS_BATCH: ClassVar[bool] = False  # a round trains on pairs / weighted samples, not on the buffer
    FINE_TUNE_LR: ClassVar[Optional[float]] = None  # each recipe's own default rate is already a fine-tuning one

    iterative: IterativeConfig = field(default_factory=IterativeConfig)
    scheduler: SchedulerConfig = field(default_factory=constant_schedule)

    def validate(self, world_size: int) -> None:
        super().validate(world_size)
        if self.rollout.prompts_per_iteration > self.rollout.num_prompts:
            raise ConfigError(f"rollout.prompts_per_iteration={self.rollout.prompts_per_iteration} is more than "
                              f"rollout.num_prompts={self.rollout.num_prompts}")
        self._refuse_step_counts()

    def _refuse_step_counts(self) -> None:
        """A round trains as many steps as its samples make; ``run.train_steps`` and ``run.eval_interval`` (set,
        they used to be accepted and ignored, bar the cosine's horizon) are refused with what to set instead."""
        default = RunConfig()
        rounds = ("a round trains ceil(rollout.epochs x its pairs or samples / data.global_batch_size) steps, "
                  "for iterative.iterations rounds")
        if self.run.train_steps != default.train_steps:
            raise ConfigError(f"run.train_steps={self.run.train_steps} does not apply to {self.ALGORITHM}: {rounds}; "
                              "set those instead")
        if self.run.eval_interval != default.eval_interval:
            raise ConfigError(f"run.eval_interval={self.run.eval_interval} does not apply to {self.ALGORITHM}: "
                              "iterative.evaluate answers rollout.eval_prompts before the first round and after each")
        if self.scheduler.type == "cosine" and self.scheduler.decay_steps is None:
            raise ConfigError(f"scheduler.type=cosine in {self.ALGORITHM} needs scheduler.decay_steps: {rounds}, so "
                              "the total is not known before sampling")


def optimizer_with_lr(lr: float) -> Any:
    """An optimizer section default with the recipe's learning rate."""
    return field(default_factory=lambda: OptimizerConfig(lr=lr))


def copy_weights(source: Any, target: Any) -> None:
    """Every parameter of ``target``'s chunks := ``source``'s (two :class:`~engine.runner.ModelRunner` of one
    model at one layout; DDP / fp16 wrappers are looked through)."""
    for source_chunk, target_chunk in zip(source.chunks, target.chunks, strict=True):
        mine = dict(_unwrap(source_chunk).named_parameters())
        theirs = dict(_unwrap(target_chunk).named_parameters())
        if mine.keys() != theirs.keys():
            raise RuntimeError(f"copy_weights: the models differ ({sorted(set(mine) ^ set(theirs))[:4]})")
        with torch.no_grad():
            for name, parameter in theirs.items():
                parameter.copy_(mine[name])


def _unwrap(module: Any) -> Any:
    while hasattr(module, "module"):
        module = module.module
    return module


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
