"""The loop of online RL: :class:`OnlineTrainer` runs one iteration per training step.

The phases are described in :mod:`engine.algorithms.online`. The policy is the trainer's
:class:`~engine.runner.ModelRunner`; the generation backend and the resharding plan are
built once here, beside it, on the generation layout.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

import torch

from engine.advantages import dynamic_sampling_filter
from engine.algorithms.logprobs import response_logprobs
from engine.algorithms.online import PHASES, Iteration, OnlineStep, rollout_micro_batches
from engine.data.batching import length_multiple
from engine.data.sampler import GlobalBatchSampler
from engine.faults import maybe_fail
from engine.sampling_phase import mean_present
from engine.trainer import FitResult, Trainer, TrainingError

logger = logging.getLogger(__name__)

#: Consecutive iterations in which every prompt's rollouts scored alike before a run comparing them says so.
TIED_ITERATIONS = 5


class OnlineTrainer(Trainer):
    """:class:`~engine.trainer.Trainer` whose step is a whole generate → score → train iteration."""

    step: OnlineStep

    def __init__(self, config: Any, step: OnlineStep, parallel: Any):
        from engine.sampling_phase import SamplingPhase

        super().__init__(config, step, parallel)
        self.signals.intent = "will checkpoint after the current iteration and exit (the same command resumes)"
        self.tied_groups = TiedGroups(config)
        rollout = config.rollout
        # prompts: the same on every rank (generation spreads them over the replicas itself)
        self.sampler = GlobalBatchSampler(len(self.train_data), rollout.prompts_per_iteration,
                                          rollout.prompts_per_iteration, 0, 1, config.run.seed)
        self.phase = SamplingPhase(config, parallel, self.model, self.tokenizer, step)
        self.critic = step.build_critic(config, parallel, self._resumed_critic())
        self.held_out_results: dict[int, dict[str, float]] = {}  # iteration: its held-out evaluation (for the summary)
        self.critic_checkpoint: Optional[str] = None  # the critic's last checkpoint (PPO)

    # ------------------------------------------------------------------ rollouts
    def _score(self, rows: list[Any], responses: list[str],
               lengths: list[int]) -> tuple[torch.Tensor, dict[str, list[float]], list[bool]]:
        """(total reward per rollout, per-component values, keep mask) on every rank (see SamplingPhase.score)."""
        return self.phase.score(rows, responses, lengths)

    def collect(self, step_number: int) -> Iteration:
        """Refit, then generate, release and score rounds of rollouts (one, or with dynamic sampling until the
        iteration's groups are full); every rank gets all of it."""
        refit = self.phase.refit()
        dynamic = getattr(self.step, "dynamic_sampling", None)
        it = self._round(step_number, 0)
        if dynamic is not None:
            it = self._fill_groups(it, step_number, dynamic)
        it.times["refit"] = refit
        return it

    def _round(self, step_number: int, round_number: int) -> Iteration:
        """One round: the sampler's next prompts, ``samples_per_prompt`` rollouts each, scored."""
        rollout = self.config.rollout
        times: dict[str, float] = {}
        prompts_set: list[Any] = self.train_data  # type: ignore[assignment]  # a list of PromptRow
        picked = [prompts_set[i] for group in self.sampler.next_step() for i in group]
        rows = [row for row in picked for _ in range(rollout.samples_per_prompt)]
        prompts = [self.phase.render(row) for row in rows]
        began = time.perf_counter()
        seed = self.config.run.seed * 1_000_003 + step_number * 10_007 + round_number * 101
        rollouts, responses = self.phase.generate(prompts, seed)
        times["generate"] = time.perf_counter() - began
        began = time.perf_counter()
        scores, components, keep = self._score(rows, responses, rollouts.lengths)
        times["score"] = time.perf_counter() - began
        return Iteration(rows, prompts, rollouts, scores, components, keep, responses, times)

    def _fill_groups(self, first: Iteration, step_number: int, dynamic: Any) -> Iteration:
        """DAPO's dynamic sampling: keep groups whose rewards differ, sample more rounds until the iteration's
        groups are full (at most ``max_rounds``); a batch still short is topped up with dropped groups."""
        from engine.advantages import DynamicSampling

        size = self.config.rollout.samples_per_prompt
        target = self.config.rollout.prompts_per_iteration
        book = DynamicSampling(target_groups=target, max_rounds=dynamic)
        rounds, kept, dropped = [first], [], []
        while True:
            it = rounds[-1]
            keep = dynamic_sampling_filter(it.scores, size, it.keep).tolist()
            joined = book.add_round(keep)
            kept += [(len(rounds) - 1, g) for g in joined]
            dropped += [(len(rounds) - 1, g) for g, k in enumerate(keep) if not k]
            if book.done:
                break
            rounds.append(self._round(step_number, len(rounds)))
        groups = kept + dropped[: target - len(kept)]
        merged = _merge_groups(rounds, groups, size)
        merged.times["dynamic_rounds"] = float(book.rounds)
        merged.times["dynamic_dropped"] = float(book.dropped)
        merged.times["dynamic_filled"] = float(max(0, target - len(kept)))
        return merged

    # ------------------------------------------------------------------ training
    def _recompute(self, it: Iteration) -> tuple[list[list[float]], list[list[float]]]:
        """Per-token log-probs of every rollout under the policy (π_old) and the reference."""
        sequences = it.rollouts.sequences()
        lengths = [len(p) for p in it.prompts]
        micro = self.config.data.micro_batch_size
        self.model.set_training(False)
        logps = response_logprobs(self.model, sequences, lengths, micro)
        self.model.set_training(True)
        reference = self.step.reference
        ref_logps = response_logprobs(reference, sequences, lengths, micro) if reference is not None else logps
        return logps, ref_logps

    def _minibatches(self, it: Iteration, per_token: dict[str, list[list[float]]], step_number: int,
                     epoch: int) -> list[list[Any]]:
        """Micro-batches of this rank for each optimizer step of one pass over the buffer."""
        size = len(it.prompts)
        sequences = it.rollouts.sequences()
        lengths = [len(p) for p in it.prompts]
        order = torch.randperm(size, generator=torch.Generator().manual_seed(step_number * 131 + epoch)).tolist()
        data, layout = self.config.data, self.layout
        steps = []
        for first in range(0, size, data.global_batch_size):
            mine = order[first: first + data.global_batch_size][self.parallel.dp_rank:: layout.data]
            # longest first, each micro-batch cut to its longest row (rounded up to the layout's multiple);
            # pipeline stages exchange fixed shapes, so there every micro-batch takes the step's longest row
            mine.sort(key=lambda i: -len(sequences[i]))
            widths = [len(sequences[mine[j]]) for j in range(0, len(mine), data.micro_batch_size)]
            if layout.pipeline > 1:
                widths = [widths[0]] * len(widths)
            multiple = length_multiple(layout)
            steps.append(rollout_micro_batches(sequences, lengths, per_token, mine, data.micro_batch_size,
                                               [-(-w // multiple) * multiple for w in widths]))
        return steps

    def _optimize(self, micro_batches: list[Any], step_number: int) -> dict[str, float]:
        self.model.zero_grad()
        totals = self._run_schedule(micro_batches, forward_only=False)
        metrics = self._means(totals)
        if totals[0, 1] == 0:
            return {}
        if not math.isfinite(metrics[self.step.loss_name]):
            raise TrainingError(f"{self.step.loss_name} is {metrics[self.step.loss_name]} at iteration {step_number}; "
                                "stopping before the optimizer update")
        metrics["lr"], metrics["grad_norm"] = self.model.optimizer_step(advance_schedule=False)
        return metrics

    def train_step(self, step_number: int) -> dict[str, float]:
        """One iteration: collect, recompute log-probs (and values), compute advantages, train ``rollout.epochs`` passes."""
        it = self.collect(step_number)
        maybe_fail("in-step", step_number)  # mid-iteration: rollouts made, nothing trained
        began = time.perf_counter()
        logps, ref_logps = self._recompute(it)
        values = None
        if self.critic is not None:
            values = self.critic.values(it.rollouts.sequences(), [len(p) for p in it.prompts],
                                        self.config.data.micro_batch_size)
        it.times["logprobs"] = time.perf_counter() - began
        per_token: dict[str, list[list[float]]] = dict(self.step.advantages(it.scores, it.rollouts, logps, ref_logps, values,
                                                                                   keep=it.keep))
        per_token.update(old_logps=logps, ref_logps=ref_logps,
                         keep=[[1.0 if keep else 0.0] * len(t) for keep, t in zip(it.keep, it.rollouts.tokens, strict=True)])
        began = time.perf_counter()
        steps = [micro for epoch in range(self.config.rollout.epochs)
                 for micro in self._minibatches(it, per_token, step_number, epoch)]
        metrics = self._train_actor(steps, step_number)
        if self.critic is not None:
            metrics.update(self._train_critic(steps))
        it.times["train"] = time.perf_counter() - began
        metrics.update(self._rollout_metrics(it, logps, ref_logps))
        metrics["tokens"] = float(sum(len(s) for s in it.rollouts.sequences()))
        self.tied_groups.tell(step_number, metrics)
        return metrics

    def _train_actor(self, steps: list[list[Any]], step_number: int) -> dict[str, float]:
        swap = self.critic is not None and self.config.ppo.swap_models
        if swap:
            self.critic.runner.offload()
        # the schedule counts iterations (run.train_steps, scheduler.warmup_steps and decay_steps are iterations):
        # advanced per optimizer step, the default cosine reached LR 0 within a few iterations of several steps
        self.model.advance_schedule()
        updates = [u for u in (self._optimize(micro, step_number) for micro in steps) if u]
        if not updates:
            raise TrainingError(f"iteration {step_number}: every rollout was skipped by the reward functions")
        return {name: sum(u[name] for u in updates) / len(updates) for name in updates[0]}

    def _train_critic(self, steps: list[list[Any]]) -> dict[str, float]:
        """The critic's updates on the same micro-batches, with the actor's training state swapped out."""
        swap = self.config.ppo.swap_models
        if swap:
            moved = self.model.offload()
            self.critic.runner.onload()
        metrics = dict(self.critic.train(steps))
        if swap:
            metrics["swapped_bytes"] = float(sum(moved.values()))
            self.model.onload()
        return metrics

    def _rollout_metrics(self, it: Iteration, logps: list[list[float]], ref_logps: list[list[float]]) -> dict[str, float]:
        lengths = it.rollouts.lengths
        kept = [i for i, keep in enumerate(it.keep) if keep]  # a skipped rollout's reward is a placeholder 0
        mean = lambda column: sum(column[i] for i in kept) / len(kept) if kept else math.nan  # noqa: E731
        values = {"reward": mean(it.scores.tolist()), "response_length": sum(lengths) / len(lengths),
                  "stopped": it.rollouts.finish_reasons.count("stop") / len(lengths),
                  "skipped": float(it.keep.count(False)), **self.phase.take_failures()}
        for name, column in it.components.items():
            values[f"reward_{name}"] = mean_present(column, kept)
        shaping = self.step.reward_shaping(it.rollouts)  # GRPO's overlong penalty: logged beside the reward
        if shaping is not None:
            values["overlong_penalty"] = mean(shaping.tolist())
        per_prompt = self.config.rollout.samples_per_prompt
        if per_prompt > 1:  # groups whose (kept) samples all scored alike teach a group-relative advantage nothing
            differ = dynamic_sampling_filter(it.scores if shaping is None else it.scores + shaping, per_prompt, it.keep)
            values["tied_groups"] = float((~differ).float().mean())
        if self.step.uses_reference:  # without a reference the two log-probs are the policy's own: no KL to log
            tokens = [(a, b) for row, ref in zip(logps, ref_logps, strict=True) for a, b in zip(row, ref, strict=True)]
            values["kl"] = sum(a - b for a, b in tokens) / max(len(tokens), 1)
        backend = [abs(a - b) for row, mine in zip(it.rollouts.logprobs, logps, strict=True) for a, b in zip(row, mine, strict=True)]
        values["rollout_logprob_diff_max"] = max(backend, default=0.0)
        values.update({f"time_{phase}": it.times.get(phase, 0.0) for phase in PHASES})
        values.update({key: value for key, value in it.times.items() if key.startswith("dynamic_")})
        return values

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, step_number: int) -> str:
        """The critic's checkpoint (``<checkpoint.dir>/critic``), then the policy's, whose ``latest`` commits the
        step. Saved the other way, a run killed between the two resumed at a policy step without its critic and
        could not continue. One critic more than ``checkpoint.keep_last`` is kept: the previous policy step's."""
        if self.critic is not None:
            chk = self.config.checkpoint
            extra = {"model_signature": self.critic.runner.signature, "scheduler": self.critic.runner.scheduler.state_dict(),
                     "config": self.critic.config.to_dict(), "algorithm": "critic", "rm": self.critic.rm_settings}
            keep = chk.keep_last + 1 if chk.keep_last else 0
            self.critic_checkpoint = self.critic.runner.save(os.path.join(str(chk.dir), "critic"), step_number, extra,
                                                             keep, chk.save_optimizer)
        return super().save_checkpoint(step_number)

    def _resumed_critic(self) -> Optional[Path]:
        """The critic checkpoint beside the policy step this run resumes, if there is one (its head is rebuilt)."""
        from engine.checkpoint import dist as ckpt

        target = self._resume_target()
        critic = target.parent / "critic" / target.name if target is not None else None
        return critic if critic is not None and ckpt.is_complete(critic) else None

    def maybe_resume(self) -> int:
        start = super().maybe_resume()
        if self.critic is not None and self.resumed_from is not None:
            from engine.checkpoint import dist as ckpt

            path = self.resumed_from.parent / "critic" / self.resumed_from.name  # saved beside the policy's
            if not ckpt.is_complete(path):
                raise ckpt.CheckpointError(f"{self.resumed_from} has no critic beside it ({path} is no complete "
                                           "checkpoint): resume a PPO run's checkpoint, whose critic is saved with it")
            self.critic.runner.load(path)
            logger.info("critic resumed from %s", path)
        return start

    # ------------------------------------------------------------------ held-out evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Greedy (and, with rollout.eval_samples_per_prompt, sampled) answers to the held-out prompts, scored by
        the reward functions."""
        if not self.valid_data:
            return {}
        rows: list[Any] = self.valid_data  # type: ignore[assignment]  # a list of PromptRow
        return self.phase.evaluate_held_out(rows)

    def _log_validation(self, step_number: int, result: FitResult) -> Optional[float]:
        valid = self.evaluate()
        if valid:
            self.held_out_results[step_number] = valid
            self.metrics.write(step_number, valid, prefix="validation")
            logger.info("held-out at iteration %d: %s", step_number,
                        ", ".join(f"{k} {v:.4f}" for k, v in sorted(valid.items())))
        return None

    def _validate(self, step_number: int, result: FitResult) -> bool:
        self._log_validation(step_number, result)
        return False  # no "best" checkpoint by a loss: every iteration's rewards are logged instead

    def fit(self) -> FitResult:
        try:
            return super().fit()  # curves.png: the algorithm's curve metrics, drawn with each checkpoint
        finally:
            self.phase.close()


def _merge_groups(rounds: list[Iteration], groups: list[tuple[int, int]], size: int) -> Iteration:
    """One iteration of the chosen ``(round, group)`` prompt groups (``size`` rollouts each), in that order."""
    from engine.generation.base import Rollouts

    picks = [(r, g * size + j) for r, g in groups for j in range(size)]

    def take(get: Any) -> list[Any]:
        return [get(rounds[r])[i] for r, i in picks]

    rollouts = Rollouts(take(lambda it: it.rollouts.prompts), take(lambda it: it.rollouts.tokens),
                        take(lambda it: it.rollouts.logprobs), take(lambda it: it.rollouts.finish_reasons))
    names = rounds[0].components
    components = {name: take(lambda it, name=name: it.components[name]) for name in names}
    times = {key: sum(it.times.get(key, 0.0) for it in rounds) for key in ("generate", "score")}
    return Iteration(take(lambda it: it.rows), take(lambda it: it.prompts), rollouts,
                     torch.tensor(take(lambda it: it.scores.tolist())), components, take(lambda it: it.keep),
                     take(lambda it: it.responses), times)


class TiedGroups:
    """Where the rollouts of a prompt are compared (GRPO, RLOO), groups that all scored alike have advantage 0:
    :data:`TIED_ITERATIONS` iterations in a row of only such groups are said once. A policy that never earns the
    reward (a random start, a base model that never states an answer) trained on nothing, its loss 0, without a
    word."""

    def __init__(self, config: Any):
        self.watched = ties_teach_nothing(config)
        self.in_a_row = 0  # iterations in a row whose every group tied

    def tell(self, step_number: int, metrics: dict[str, float]) -> None:
        if not self.watched or metrics.get("tied_groups") != 1.0:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        if self.in_a_row == TIED_ITERATIONS:
            logger.warning(
                "iterations %d-%d: every prompt's rollouts scored alike (reward %.4g), so their advantages are 0 and "
                "the policy learns nothing; start from a policy that sometimes earns the reward (checkpoint.load=<an "
                "SFT checkpoint>), or give a reward that tells its rollouts apart", step_number - TIED_ITERATIONS + 1,
                step_number, metrics.get("reward", math.nan))


def ties_teach_nothing(config: Any) -> bool:
    """Whether rollouts of a prompt that scored alike get advantage 0: where they are compared (GRPO, RLOO; with
    GRPO's overlong penalty, ``tied_groups`` is counted on the penalised rewards)."""
    return bool(type(config).GROUP_NEEDS)
