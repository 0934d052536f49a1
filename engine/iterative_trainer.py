"""The loop of the sample-and-train recipes (iterative DPO, SteerLM 2.0): :class:`IterativeTrainer`.

Each iteration ``k = 1 .. iterative.iterations``:

1. **sample** (:class:`~engine.sampling_phase.SamplingPhase`): the iteration's
   ``rollout.prompts_per_iteration`` prompts (window ``k`` of a permutation of the prompt set
   seeded by ``run.seed``), in chunks of ``iterative.chunk_prompts``: the policy is resharded into
   the generation backend once, then per chunk ``rollout.samples_per_prompt`` samples per prompt are
   generated (the step may condition each prompt on target attributes), the backend is released, the
   step scores them, and the chunk is written to ``iterations/iter_<k>/chunks/`` (atomically). Chunk
   ``c`` samples with seeds that depend only on ``(run.seed, k, c)``, so an interrupted iteration,
   started again, reuses the chunks on disk and regenerates exactly the rest;
2. the step turns the samples into the round's data (``pairs.jsonl`` / ``weights.jsonl``);
3. **train** one round from the current policy: ``ceil(rollout.epochs × items / data.global_batch_size)``
   optimizer steps of the shared :class:`~engine.trainer.Trainer` step (its schedules, loss checks and
   optimizer), after the step's ``begin_round`` hook (iterative DPO: reference := the policy now);
4. greedy held-out evaluation (``iterative.evaluate``), ``summary.json``, one ``metrics.jsonl`` row per
   iteration (``step`` = the iteration; held-out rows also at iteration 0), and a checkpoint whose
   step number is the iteration, so a run killed after an iteration resumes at the next one.

SIGTERM (pre-emption) stops the run cleanly between two chunks of samples (they are on disk; the
last checkpoint is the iteration's start) or after an iteration's checkpoint; the same command resumes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from typing import Any, Optional

import torch

from engine.checkpoint import dist as ckpt
from engine.data.sampler import GlobalBatchSampler
from engine.faults import maybe_fail
from engine.parallel import failures
from engine.sampling_phase import SampleStore
from engine.trainer import FitResult, Trainer

logger = logging.getLogger(__name__)


# what the first stop signal's line says, by phase (the run stops between chunks, or after an iteration's checkpoint)
CHUNK_STOP = "will stop after the chunk of samples being made (kept on disk; the same command resumes)"
ROUND_STOP = "will finish this iteration, checkpoint it and exit (the same command resumes)"


class _Stopped(Exception):
    """SIGTERM between two chunks of samples: what is sampled is on disk, the last checkpoint is the start."""


class IterativeTrainer(Trainer):
    """:class:`~engine.trainer.Trainer` whose unit is a sample → score → train iteration.

    The step (``IterativeDPOStep``, ``SteerLM2Step``) provides ``target(prompt_index)`` (attributes
    a prompt is conditioned on, or None), ``score_samples(trainer, rows, attributes, prompts,
    rollouts, responses)`` (per-sample fields stored on disk), ``round_data(trainer, samples)``
    (dataset, rows of the round's file, its file name, summary), ``begin_round(trainer)``,
    ``sample_summary(samples)`` and ``evaluate(trainer, rows)``.
    """

    step: Any  # an IterativeDPOStep or SteerLM2Step (the hooks above)

    def __init__(self, config: Any, step: Any, parallel: Any):
        from engine.sampling_phase import SamplingPhase

        super().__init__(config, step, parallel)
        self.prompts: list[Any] = list(self.train_data)  # type: ignore[call-overload]  # PromptRows
        self.held_out: list[Any] = list(self.valid_data)  # type: ignore[call-overload]
        self.phase = SamplingPhase(config, parallel, self.model, self.tokenizer, step)
        self.prompt_sampler = self.sampler  # what checkpoints record (a round's sampler changes every iteration)
        self.new_chunks = 0  # chunks this process generated (the in-sample fault point counts them)
        self.signals.intent = ROUND_STOP  # until sampling says otherwise

    def maybe_resume(self) -> int:
        """As :meth:`Trainer.maybe_resume`; a fresh run (``checkpoint.resume=none``) also moves the earlier run's
        samples aside, which its first iteration would otherwise take up as its own, made by another policy."""
        if self.config.checkpoint.resume == "none":
            self._set_aside_samples()
        return super().maybe_resume()

    def _set_aside_samples(self) -> None:
        import os
        from pathlib import Path

        import torch.distributed as dist

        samples = Path(self.run_dir) / "iterations"
        earlier = samples.is_dir() and any(samples.iterdir())
        dist.barrier()  # every rank has looked before rank 0 moves anything
        if earlier and self.parallel.is_main:
            target = samples.with_name(f"iterations.earlier-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(samples, target)
            logger.warning("checkpoint.resume=none: moved the earlier run's samples %s to %s", samples, target)
        dist.barrier()

    # ------------------------------------------------------------------ sampling
    def iteration_prompts(self, iteration: int) -> list[int]:
        """Indices of iteration ``iteration``'s prompts: window ``iteration`` of a seeded permutation (wrapping)."""
        count = self.config.rollout.prompts_per_iteration
        generator = torch.Generator().manual_seed(self.config.run.seed)
        order = torch.randperm(len(self.prompts), generator=generator).tolist()
        first = (iteration - 1) * count
        return [order[(first + j) % len(order)] for j in range(count)]

    def sample(self, iteration: int, store: SampleStore) -> tuple[list[dict[str, Any]], dict[str, float]]:
        """Every sample of the iteration (chunks on disk reused, the others generated and written)."""
        indices = self.iteration_prompts(iteration)
        size = self.config.iterative.chunk_prompts
        chunks = [indices[i: i + size] for i in range(0, len(indices), size)]
        per_prompt = self.config.rollout.samples_per_prompt
        store.check_inputs(self.sampling_inputs(iteration, indices))
        done = store.done_chunks(len(chunks))
        samples: list[dict[str, Any]] = []
        times = {"refit": 0.0, "generate_and_score": 0.0, "chunks_reused": 0.0, "chunks_generated": 0.0}
        refitted = False
        for number, chunk in enumerate(chunks):
            stored = done.get(number)
            if stored is not None and len(stored) == len(chunk) * per_prompt \
                    and [s["prompt_index"] for s in stored[::per_prompt]] == chunk:
                samples += stored
                times["chunks_reused"] += 1
                continue
            # a stop signal is acted on after this chunk, or after the round and its checkpoint when it is the last
            self.signals.intent = CHUNK_STOP if number + 1 < len(chunks) else ROUND_STOP
            if not refitted:
                times["refit"] = self.phase.refit()
                refitted = True
            began = time.perf_counter()
            samples += self._sample_chunk(iteration, number, chunk, store)
            times["generate_and_score"] += time.perf_counter() - began
            times["chunks_generated"] += 1
            if number + 1 < len(chunks) and self._stop_agreed():
                raise _Stopped(f"iteration {iteration}: {number + 1} of {len(chunks)} chunks sampled")
        if times["chunks_reused"]:
            logger.info("iteration %d: %d chunk(s) of samples reused from %s", iteration, times["chunks_reused"],
                        store.dir)
        store.write_jsonl("samples.jsonl", samples)
        self.signals.intent = ROUND_STOP
        return samples, times

    def sampling_inputs(self, iteration: int, indices: list[int]) -> dict[str, Any]:
        """What iteration ``iteration``'s samples depend on, the policy included: after the first iteration it is
        this run's checkpoint of the one before (which a restart resumes); the first samples the starting
        weights, ``checkpoint.load`` (as it resolves now: a run directory's newest checkpoint moves on) or the
        model's own initialisation."""
        config, rollout = self.config, self.config.rollout
        prompts = [[self.prompts[i].prompt, self.step.target(i)] for i in indices]
        load = config.checkpoint.load
        policy: Any = (f"this run's checkpoint of iteration {iteration - 1}" if iteration > 1 else
                       [str(ckpt.resolve(load).resolve()) if load else None, dataclasses.asdict(config.model)])
        return {"prompts": hashlib.sha256(json.dumps(prompts, sort_keys=True).encode()).hexdigest(),
                "policy": policy,
                "sampling": [rollout.samples_per_prompt, rollout.max_new_tokens, rollout.temperature, rollout.top_p,
                             rollout.top_k, config.iterative.chunk_prompts, config.run.seed],
                "template": [config.data.tokenizer, config.data.chat_template, config.data.seq_length],
                "rewards": [[dataclasses.asdict(f) for f in config.reward_functions], config.reward_model,
                            config.reward_model_weight, config.reward_model_mean, config.reward_model_std]}

    def _sample_chunk(self, iteration: int, number: int, indices: list[int], store: SampleStore) -> list[dict[str, Any]]:
        per_prompt = self.config.rollout.samples_per_prompt
        targets = [self.step.target(i) for i in indices]
        rows = [self.prompts[i] for i in indices for _ in range(per_prompt)]
        attributes = [t for t in targets for _ in range(per_prompt)]
        prompts = [self.phase.render(r, a) for r, a in zip(rows, attributes, strict=True)]
        # row j of chunk c: seed base(k) + c * chunk_prompts * n + j, the same whichever chunks are on disk
        base = self.config.run.seed * 1_000_003 + iteration * 10_000_019
        seed = base + number * self.config.iterative.chunk_prompts * per_prompt
        rollouts, responses = self.phase.generate(prompts, seed)
        fields = self.step.score_samples(self, rows, attributes, prompts, rollouts, responses)
        samples = []
        for j, (tokens, reason, response, extra) in enumerate(
                zip(rollouts.tokens, rollouts.finish_reasons, responses, fields, strict=True)):
            samples.append({"prompt_index": indices[j // per_prompt], "sample": j % per_prompt,
                            "attributes": attributes[j], "tokens": list(tokens), "finish_reason": reason,
                            "response": response, **extra})
        store.write_chunk(number, samples)
        self.parallel.barrier()  # the chunk is on disk before any rank goes on (or is killed by in-sample)
        self.new_chunks += 1
        maybe_fail("in-sample", self.new_chunks)
        return samples

    # ------------------------------------------------------------------ training
    def train_round(self, iteration: int, dataset: Any) -> dict[str, float]:
        """``rollout.epochs`` passes over ``dataset`` from the current policy; mean metrics of its steps."""
        data = self.config.data
        if len(dataset) == 0:
            logger.warning("iteration %d: nothing to train on (every prompt dropped); the policy is unchanged",
                           iteration)
            return {"optimizer_steps": 0.0}
        self.train_data = dataset
        self.sampler = GlobalBatchSampler(len(dataset), data.global_batch_size, data.micro_batch_size,
                                          self.parallel.dp_rank, self.layout.data, self.config.run.seed + iteration)
        steps = math.ceil(self.config.rollout.epochs * len(dataset) / data.global_batch_size)
        self.model.set_training(True)
        records = []
        for number in range(1, steps + 1):
            records.append(self.train_step(number))
            logger.info("iteration %d step %d/%d: %s %.5f", iteration, number, steps, self.step.loss_name,
                        records[-1][self.step.loss_name])
        metrics = {name: sum(r[name] for r in records) / len(records) for name in records[0]}
        metrics["optimizer_steps"] = float(steps)
        return metrics

    # ------------------------------------------------------------------ the loop
    def _checkpoint_extra(self) -> dict[str, Any]:
        return {**super()._checkpoint_extra(), "sampler": self.prompt_sampler.state_dict()}

    def _evaluate(self, iteration: int) -> dict[str, float]:
        if not (self.config.iterative.evaluate and self.held_out):
            return {}
        self.model.set_training(False)
        values: dict[str, float] = self.step.evaluate(self, self.held_out)
        self.metrics.write(iteration, values, prefix="validation")
        logger.info("held-out after iteration %d: %s", iteration,
                    ", ".join(f"{k} {v:.4f}" for k, v in sorted(values.items())))
        return values

    def run_iteration(self, iteration: int) -> dict[str, Any]:
        """Sample, make the round's data, train, evaluate; returns the iteration's summary."""
        store = SampleStore(self.run_dir, iteration, self.parallel.is_main)
        self.model.set_training(False)
        samples, times = self.sample(iteration, store)
        # the chunks generated now (none for chunks read back from disk); evaluations keep theirs apart
        failures = self.phase.take_failures()
        dataset, rows, file_name, round_summary = self.step.round_data(self, samples)
        store.write_jsonl(file_name, rows)
        self.step.begin_round(self)
        began = time.perf_counter()
        trained = self.train_round(iteration, dataset)
        times["train"] = time.perf_counter() - began
        summary: dict[str, Any] = {"iteration": iteration, "samples": len(samples),
                                   **self.step.sample_summary(samples), **failures, **round_summary, **trained,
                                   **{f"time_{k}" if not k.startswith("chunks") else k: v for k, v in times.items()}}
        self.metrics.write(iteration, {k: v for k, v in summary.items() if isinstance(v, (int, float))})
        summary["held_out"] = self._evaluate(iteration)
        store.write_summary(summary)
        return summary

    def fit(self) -> FitResult:
        cfg = self.config
        start = self._begin(cfg.iterative.iterations)  # iterations after the checkpoint are logged again
        result = FitResult(start_step=start, end_step=start, run_dir=self.run_dir)
        self.signals.install()
        progress = self._progress(start, cfg.iterative.iterations, "iteration")
        peer_failed = False
        try:
            if start == 0:
                self._evaluate(0)
            for iteration in range(start + 1, cfg.iterative.iterations + 1):
                summary = self.run_iteration(iteration)
                loss: Optional[float] = summary.get(self.step.loss_name)
                result.losses[iteration] = float("nan") if loss is None else loss
                result.end_step = iteration
                result.checkpoint = self.save_checkpoint(iteration)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss="n/a" if loss is None else f"{loss:.4f}")
                if iteration < cfg.iterative.iterations and self._stop_agreed():
                    raise _Stopped(f"after iteration {iteration} (checkpointed)")
        except _Stopped as stopped:
            result.stopped_by = self.signals.received or "a signal on another rank"
            logger.warning("stopped on %s %s; the same command resumes", result.stopped_by, stopped)
        except Exception as exc:
            peer_failed = failures.is_peer_failure(exc)
            raise
        finally:
            if progress is not None:
                progress.close()
            self.phase.close()
            self.metrics.close()
            self.signals.restore(ignore=peer_failed)  # the CLI prints another rank's failure and exits
        return result  # curves.png was drawn with each iteration's checkpoint
