"""The training loop shared by every algorithm.

``Trainer(config, step, parallel).fit()``: builds the trained model (a
:class:`~engine.runner.ModelRunner`: chunks, DDP, optimizer, LR schedule), lets the
step build any frozen models it needs (:meth:`Step.setup`), builds the data sets and the
resumable sampler; then per optimizer step runs the step's forward-only pre-pass and
megatron's forward/backward schedule (pipeline micro-batching, gradient accumulation to
the global batch), checks the loss, steps the optimizer, logs, checkpoints, and handles
SIGTERM and Ctrl-C (save, then exit; :mod:`engine.stop_signals`). Batching helpers live in
:mod:`engine.data.batching`, cross-rank patterns in :mod:`engine.parallel.collectives`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Optional

import torch

from engine.algorithms.base import Batch, Step
from engine.checkpoint import dist as ckpt
from engine.checkpoint.pinning import pin_frozen
from engine.checkpoint.resume import carried_best, changed_data_settings, check_resume
from engine.config import save_config
from engine.data.batching import (  # noqa: F401  (cut_to_length, group_by_length, padded_length: re-exported)
    ReadOnce,
    cut_to_length,
    group_by_length,
    micro_batches_for,
    padded_length,
    to_device,
)
from engine.data.errors import DataError
from engine.data.sampler import GlobalBatchSampler
from engine.data.tokenizers import load_tokenizer, warn_if_foreign
from engine.faults import maybe_fail
from engine.metrics import MetricsWriter
from engine.parallel import failures
from engine.parallel.collectives import any_rank, from_last_stage, sum_over_data_parallel
from engine.run_lock import lock_run_dir
from engine.runner import ModelRunner, build_model, fuse_cpu_adamw  # noqa: F401  (build_model: re-exported)
from engine.stop_signals import StopSignals

_fuse_cpu_adamw = fuse_cpu_adamw  # the name older tests and call sites use

logger = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot continue (non-finite loss, broken data, ...)."""


@dataclass
class FitResult:
    """What a run did, for the CLI summary and for tests."""

    start_step: int
    end_step: int
    losses: dict[int, float] = field(default_factory=dict)
    validation: dict[int, float] = field(default_factory=dict)
    checkpoint: Optional[str] = None
    best_checkpoint: Optional[str] = None
    stopped_by: Optional[str] = None  # the signal that stopped the run early (SIGTERM, SIGINT)
    tokens_per_second: float = 0.0
    run_dir: str = ""


def _memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import psutil

    return psutil.Process().memory_info().rss / 2**20


class Trainer:
    """Runs ``step`` under ``config`` on the process groups of ``parallel``.

    ``self.model`` is the :class:`ModelRunner` that trains; the step may build more
    (frozen) models in its :meth:`Step.setup` hook.
    """

    def __init__(self, config: Any, step: Step, parallel: Any):
        self.config = config
        self.step = step
        self.parallel = parallel
        self.layout = parallel.layout
        self.run_dir = config.run.output_dir
        self.signals = StopSignals()
        self.frozen_ids: dict[str, Optional[str]] = {}
        self._check_load_before_building()
        lock_run_dir(self.run_dir, parallel.is_main, config.checkpoint.dir)  # one run per directory, before any work
        self.tokenizer = load_tokenizer(config.data.tokenizer)  # a bad tokenizer file is refused before the build
        # the data too: a bad row costs seconds here, not the minutes of building the models at scale first
        self.train_data, self.valid_data = step.build_datasets(config, self.tokenizer)
        self._refuse_an_empty_training_set()
        self._warn_of_no_validation()
        self._warn_of_unused_validation()
        self._warn_of_repeats()
        step.check_datasets(config, self.tokenizer, self.train_data, self.valid_data)
        self.model = ModelRunner.trained(config, parallel, step.model_class())
        preset = self.model.preset
        if self.tokenizer.vocab_size > preset.vocab_size:
            raise TrainingError(
                f"tokenizer has {self.tokenizer.vocab_size} tokens but model {preset.name} has vocab_size="
                f"{preset.vocab_size}; set model.vocab_size >= {self.tokenizer.vocab_size}"
            )
        if config.checkpoint.load:  # pretrained weights (a random initialisation takes any tokenizer)
            warn_if_foreign(self.tokenizer, config.data.tokenizer, preset.name, preset.vocab_size)
        step.setup(config, parallel, self.tokenizer)
        data = config.data
        self.sampler = GlobalBatchSampler(
            len(self.train_data), data.global_batch_size, data.micro_batch_size, parallel.dp_rank, self.layout.data,
            config.run.seed,
        )
        self.metrics = MetricsWriter(self.run_dir, parallel.is_main, config.logging.tensorboard)
        self.best_validation: Optional[tuple[int, float]] = None  # (step, loss) of the best checkpoint
        self.resumed_from: Optional[Path] = None  # the checkpoint this run resumed, if it did
        self._told_validation = False  # what a validation reads is logged once

    def _refuse_an_empty_training_set(self) -> None:
        """No training sample left (every row dropped for length, say) is a one-line :class:`DataError` that says
        why, before the models are built; an empty validation set only skips validation."""
        if len(self.train_data):
            return
        drops = getattr(self.train_data, "drops", None)
        if drops is not None and drops.rows:
            raise drops.empty_error()
        raise DataError(None, "<rows>", "at least one training sample, got none", source=self.config.data.source,
                        hint="check the data; raise data.seq_length if its rows were dropped for length")

    @property
    def _samples_its_data(self) -> bool:
        """Online RL and iterative recipes make their training and held-out data by sampling, per iteration."""
        return bool(getattr(self.step, "online", False) or getattr(self.step, "iterative", False))

    def _warn_of_no_validation(self) -> None:
        """Validation asked for (run.eval_interval, run.eval_at_start) and no validation row to do it: said once,
        with the fix (a small file's held-out fraction rounds to none, and validation was skipped silently)."""
        run, data = self.config.run, self.config.data
        if self._samples_its_data or not (run.eval_interval or run.eval_at_start) or len(self.valid_data or ()) \
                or not self.parallel.is_main:
            return
        held = data.validation_source or f"data.validation_fraction={data.validation_fraction:g} of {data.source}"
        logger.warning("no validation rows (%s holds out none): validation is skipped and no best checkpoint is "
                       "kept; set data.validation_source, or raise data.validation_fraction", held)

    def _warn_of_unused_validation(self) -> None:
        """A validation set the user named, read and checked, and never evaluated (run.eval_interval=0, the
        default): said once, with the setting that evaluates it. So are rows held out of the user's own file
        for a validation that never runs: they are not trained on either."""
        run, online, data = self.config.run, getattr(self.step, "online", False), self.config.data
        if getattr(self.step, "iterative", False) or run.eval_interval or run.eval_at_start or not self.parallel.is_main:
            return
        setting, named = (("rollout.eval_prompts", self.config.rollout.eval_prompts) if online
                          else ("data.validation_source", data.validation_source))
        held = len(self.valid_data or ())
        if named and named not in ("auto", "none") and held:
            unit = "iterations" if online else "steps"
            logger.warning("%s=%s is read but never evaluated: run.eval_interval=0 (the default); set "
                           "run.eval_interval=N to evaluate it every N %s", setting, named, unit)
        elif not online and not named and held and not data.source.startswith("builtin:"):
            logger.warning("data.validation_fraction=%g holds %d rows of %s out of training for a validation this run "
                           "never runs (run.eval_interval=0, the default): set data.validation_fraction=0 to train on "
                           "them, or run.eval_interval=N to evaluate them every N steps", data.validation_fraction,
                           held, data.source)

    def _warn_of_repeats(self) -> None:
        """Fewer training samples than one global batch: every step holds some of them more than once."""
        samples, batch = len(self.train_data), self.config.data.global_batch_size
        if samples < batch and self.parallel.is_main and not self._samples_its_data:
            logger.warning("%d training samples for data.global_batch_size=%d: each step repeats samples; lower "
                           "data.global_batch_size or add rows", samples, batch)

    # ------------------------------------------------------------------ one schedule
    def _forward_step(self, data_iterator: Iterator[Batch], model: torch.nn.Module) -> tuple[torch.Tensor, Any]:
        batch = to_device(next(data_iterator))
        output = self.step.forward(model, batch, self.parallel)
        return output, partial(self.step.loss, batch)

    def _run_schedule(self, micro_batches: list[Batch], forward_only: bool) -> torch.Tensor:
        """Pre-pass, then the schedule; returns the global (sum, count) per metric, ``[metrics, 2]``."""
        self.step.before_schedule(micro_batches)
        results = self.model.run_schedule(micro_batches, self._forward_step, forward_only)
        return self._reduce_metrics(results)

    def _means(self, totals: torch.Tensor) -> dict[str, float]:
        return {name: float(totals[i, 0] / totals[i, 1]) if totals[i, 1] > 0 else float("nan")
                for i, name in enumerate(self.step.metric_names())}

    def _reduce_metrics(self, results: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """Global (sum, count) per metric over micro-batches, DP ranks, and from the last stage."""
        names = self.step.metric_names()
        totals = torch.zeros(len(names), 2, dtype=torch.float64)
        for record in results:
            for i, name in enumerate(names):
                if name in record:
                    totals[i] += record[name].detach().to("cpu", torch.float64)
        return from_last_stage(sum_over_data_parallel(totals, self.parallel), self.parallel)

    def _next_micro_batches(self, sampler: GlobalBatchSampler, dataset: Any) -> list[Batch]:
        return micro_batches_for(sampler.next_step(), dataset, self.config.data.seq_length, self.layout,
                                 self.config.data.group_by_length)

    # ------------------------------------------------------------------ one step
    def train_step(self, step_number: int) -> dict[str, float]:
        """Forward/backward over one global batch and one optimizer update."""
        self.model.zero_grad()
        micro_batches = self._next_micro_batches(self.sampler, self.train_data)
        maybe_fail("in-step", step_number)  # peers are already in this step's first collective
        totals = self._run_schedule(micro_batches, forward_only=False)
        if totals[0, 1] == 0:  # no item carries loss: a loss of 0/0, not a step that trained on nothing
            raise TrainingError(f"step {step_number}: no item of the global batch carries {self.step.loss_name} "
                                f"(weight 0 for all); stopping before the optimizer update: "
                                f"{self.step.empty_step_hint()}")
        metrics = self._means(totals)
        loss = metrics[self.step.loss_name]
        if not math.isfinite(loss):
            raise TrainingError(
                f"{self.step.loss_name} is {loss} at step {step_number}; stopping before the optimizer update. "
                "Lower optimizer.lr, check the data of this step, or resume from the last checkpoint."
            )
        metrics["lr"], metrics["grad_norm"] = self.model.optimizer_step()
        metrics["tokens"] = float(sum(self.step.tokens_in(b) for b in micro_batches) * self.layout.data)
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss over the first ``run.eval_batches`` global batches of the validation set (fixed order).

        A set smaller than that is read exactly once when the step's loss reads ``keep``
        (:class:`~engine.data.batching.ReadOnce`): its last global batch is filled with rows that count
        nothing. Otherwise the read wraps around it and says so.
        """
        if len(self.valid_data) == 0:
            return {}
        self.model.set_training(False)
        data = self.config.data
        batches, dataset = self._validation_plan()
        sampler = GlobalBatchSampler(len(dataset), data.global_batch_size, data.micro_batch_size,
                                     self.parallel.dp_rank, self.layout.data, self.config.run.seed, shuffle=False)
        totals = torch.stack([self._run_schedule(self._next_micro_batches(sampler, dataset), True)
                              for _ in range(batches)]).sum(0)
        self.model.set_training(True)
        return self._means(totals)

    def _validation_plan(self) -> tuple[int, Any]:
        """(global batches, data set) of one validation; what it reads is logged once."""
        rows, size = len(self.valid_data), self.config.data.global_batch_size
        batches, read = self.config.run.eval_batches, self.config.run.eval_batches * size
        once = rows < read and self.step.reads_keep
        if once:
            batches = -(-rows // size)
            read = batches * size
        self._say_what_validation_reads(rows, read, once)
        return batches, ReadOnce(self.valid_data, read) if once else self.valid_data

    def _say_what_validation_reads(self, rows: int, read: int, once: bool) -> None:
        """Once: a part of a large validation set; all of a small one, its last batch filled (``once``) or
        wrapped around (some rows then weigh more than others)."""
        if self._told_validation or not self.parallel.is_main:
            return
        self._told_validation = True
        if once:
            batches, filler = read // self.config.data.global_batch_size, read - rows
            what = f"all {rows} validation rows" if rows > 1 else "its 1 validation row"
            fill = "" if not filler else (f"; the last is filled with {filler} rows that count nothing" if filler > 1
                                          else "; the last is filled with 1 row that counts nothing")
            logger.info("each validation reads %s once, in %d global batch%s%s", what, batches,
                        "es" if batches > 1 else "", fill)
        elif rows < read:
            logger.warning("each validation reads %d rows (run.eval_batches x data.global_batch_size) from a validation "
                           "set of %d, so some rows count more than once; give at least %d validation rows, or lower "
                           "run.eval_batches or data.global_batch_size", read, rows, read)
        elif rows > read:
            logger.info("each validation reads the first %d of the %d validation rows (run.eval_batches=%d; raise it "
                        "to read more)", read, rows, self.config.run.eval_batches)

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_extra(self) -> dict[str, Any]:
        return {
            "model_signature": self.model.signature,
            "scheduler": self.model.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "config": self.config.to_dict(),
            "algorithm": self.step.name,
            "best_validation": self.best_validation,
            "frozen_ids": self.frozen_ids,  # which save of each pinned frozen model's step (checkpoint.pinning)
        }

    def save_checkpoint(self, step_number: int) -> str:
        chk = self.config.checkpoint
        path = self.model.save(chk.dir, step_number, self._checkpoint_extra(), chk.keep_last, chk.save_optimizer)
        self.write_curves()
        return path

    def maybe_resume(self) -> int:
        """Resume per ``checkpoint.resume`` (or load weights per ``checkpoint.load``); returns the start step."""
        chk = self.config.checkpoint
        path = self._resume_target()
        if chk.resume == "none":
            ckpt.set_aside(chk.dir, chk.load, self.parallel)
        elif path is not None and not ckpt.is_complete(path):  # a path given (auto finds complete ones only)
            raise ckpt.CheckpointError(f"checkpoint.resume={chk.resume}: not a complete checkpoint")
        if path is not None:
            saved = ckpt.read_meta(path)
            step = int(saved["step"])
            if step > self.config.run.train_steps:
                raise ckpt.CheckpointError(
                    f"{path} is step {step}, past run.train_steps={self.config.run.train_steps}: raise "
                    "run.train_steps to train on, or start a new run (another run.output_dir, or checkpoint.resume=none)")
            check_resume(path, saved, self.config, self.step.name)
            self._check_resumed_data(path, saved)
            meta = self.model.load(path)
            self.sampler.load_state_dict(meta["sampler"])
            self.best_validation = carried_best(path, meta, str(chk.dir))
            self.resumed_from = path
            logger.info("resumed from %s at step %d", path, meta["step"])
            return int(meta["step"])
        if chk.load:
            self.model.load_weights(chk.load)
            logger.info("initialised weights from %s", chk.load)
        return 0

    def _resume_target(self) -> Optional[Path]:
        """The checkpoint ``checkpoint.resume`` names: for ``auto`` the newest complete one in ``checkpoint.dir``
        (None without one), a given path as :func:`~engine.checkpoint.dist.resolve` reads it, None for ``none``."""
        chk = self.config.checkpoint
        if chk.resume == "auto":
            return ckpt.find_latest(chk.dir)
        return None if chk.resume == "none" else ckpt.resolve(chk.resume)

    def _check_resumed_data(self, path: Path, meta: dict[str, Any]) -> None:
        """A resumed run reads the checkpoint's data: another training set size is a one-line error that says how
        to train on the new data; another global batch or sequence length is only warned about."""
        saved = int(meta.get("sampler", {}).get("num_samples", self.sampler.num_samples))
        if saved != self.sampler.num_samples:
            raise ckpt.CheckpointError(
                f"{path} was written for a training set of {saved} samples, this one has {self.sampler.num_samples}; "
                "a resumed run reads the same data: to train on this data, start afresh in this run directory "
                f"(checkpoint.resume=none), or keep the weights with checkpoint.load={path} and another "
                "run.output_dir")
        changed = changed_data_settings(meta, self.config)
        if changed:
            logger.warning("resuming %s with this run's data settings, not the checkpoint's: %s", path,
                           "; ".join(changed))

    # ------------------------------------------------------------------ the loop
    def _check_load_before_building(self) -> None:
        """A ``checkpoint.load`` that a fresh start would need and that is not a complete checkpoint, and the other
        checkpoints the run names that are of the wrong kind (``config.check_checkpoints``), are refused before the
        models are built (minutes at scale), not after. A run that resumes does not read ``checkpoint.load``."""
        from engine.models.presets import resolve_preset

        self.config.check_checkpoints()
        chk = self.config.checkpoint
        signature = ckpt.model_signature(resolve_preset(self.config.model))  # of another shape: refused here too
        resumed = self._resume_target()
        unread = () if getattr(self.step, "uses_reference", True) else ("reference",)  # no KL reference is built
        if resumed is not None:
            if ckpt.is_complete(resumed):  # else the resume's own error, later
                meta = ckpt.read_meta(resumed)
                ckpt.check_compatible(resumed, meta, signature)
                self.frozen_ids = pin_frozen(self.config, meta, unread)  # the frozen models' steps it began with
            return
        self.frozen_ids = pin_frozen(self.config, unread=unread)
        self.config.check_fresh_start()
        if chk.load:
            path = ckpt.locate(chk.load, "checkpoint.load")  # a one-line error naming the forms it takes
            meta = ckpt.read_meta(path)
            ckpt.check_compatible(path, meta, signature)
            if self.step.name != "rm":  # before resume=none sets the earlier run's checkpoints aside
                ckpt.refuse_scorer(path, meta, "a policy's weights")

    def _stop_agreed(self) -> bool:
        """Whether any rank got SIGTERM or Ctrl-C (:mod:`engine.stop_signals`): all stop after the same step."""
        return any_rank(self.signals.requested)

    def _begin(self, total: Optional[int] = None) -> int:
        """Resume, write the resolved config, trim ``metrics.jsonl`` to the start; returns the start step.

        The config is written once the resume is known to go ahead, and only when there is something left to
        train (``total`` steps or iterations): a refused resume or a finished run started again with other
        settings rewrote ``config.yaml`` with settings no step was trained with."""
        start = self.maybe_resume()
        if self.parallel.is_main and start < (self.config.run.train_steps if total is None else total):
            os.makedirs(self.run_dir, exist_ok=True)
            save_config(self.config, os.path.join(self.run_dir, "config.yaml"))
        self.metrics.keep_until(start)  # steps after the checkpoint are logged again
        return start

    def fit(self) -> FitResult:
        cfg = self.config
        start = self._begin()
        result = FitResult(start_step=start, end_step=start, run_dir=self.run_dir)
        self.signals.install()
        if cfg.run.eval_at_start and start == 0:
            self._log_validation(0, result)
        progress = self._progress(start)
        tokens_total, time_total, peer_failed = 0.0, 0.0, False
        try:
            for step_number in range(start + 1, cfg.run.train_steps + 1):
                began = time.perf_counter()
                metrics = self.train_step(step_number)
                elapsed = time.perf_counter() - began
                tokens_total += metrics["tokens"]
                time_total += elapsed
                metrics.update(step_time_s=elapsed, tokens_per_s=metrics["tokens"] / elapsed, memory_mb=_memory_mb())
                result.losses[step_number] = metrics[self.step.loss_name]
                result.end_step = step_number
                if step_number % cfg.logging.log_interval == 0:
                    self.metrics.write(step_number, metrics)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{metrics[self.step.loss_name]:.4f}", lr=f"{metrics['lr']:.2e}")
                improved = False
                if cfg.run.eval_interval and step_number % cfg.run.eval_interval == 0:
                    improved = self._validate(step_number, result)
                maybe_fail("after", step_number)
                stop = self._stop_agreed()
                interval = cfg.checkpoint.save_interval
                if stop or improved or (interval and step_number % interval == 0) or step_number == cfg.run.train_steps:
                    result.checkpoint = self.save_checkpoint(step_number)
                if improved:
                    ckpt.mark_best(str(cfg.checkpoint.dir), step_number, self.parallel)
                    result.best_checkpoint = result.checkpoint
                if stop:
                    result.stopped_by = self.signals.received or "a signal on another rank"
                    logger.warning("stopped on %s after step %d; checkpoint %s; the same command resumes from it",
                                   result.stopped_by, step_number, result.checkpoint)
                    break
        except Exception as exc:
            peer_failed = failures.is_peer_failure(exc)
            raise
        finally:
            if progress is not None:
                progress.close()
            self.metrics.close()
            self.signals.restore(ignore=peer_failed)  # the CLI prints another rank's failure and exits
        result.tokens_per_second = tokens_total / time_total if time_total else 0.0
        return result

    def write_curves(self) -> None:
        """``curves.png`` in the run directory, on rank 0: the step's curve metrics from ``metrics.jsonl``
        (training steps as a line, validation as dots). Drawn with every checkpoint, so a long run's curves can
        be looked at as it goes; every run that trains ends on a checkpoint (its last step, a SIGTERM stop)."""
        if self.parallel.is_main:
            from engine.plots import write_curves

            write_curves(self.run_dir, self.step.curve_metrics())

    def _log_validation(self, step_number: int, result: FitResult) -> Optional[float]:
        """Evaluate and log; returns the validation loss (None without validation data)."""
        valid = self.evaluate()
        if not valid:
            return None
        loss = valid[self.step.loss_name]
        result.validation[step_number] = loss
        self.metrics.write(step_number, valid, prefix="validation")
        return loss

    def _validate(self, step_number: int, result: FitResult) -> bool:
        """Evaluate, log, and say whether this is the best validation loss so far."""
        loss = self._log_validation(step_number, result)
        if loss is None:
            return False
        if self.best_validation is None or loss < self.best_validation[1]:
            self.best_validation = (step_number, loss)
            return True
        return False

    def _progress(self, start: int, total: Optional[int] = None, unit: str = "step") -> Any:
        if not (self.parallel.is_main and self.config.logging.progress):
            return None
        from engine.progress import progress_bar

        return progress_bar(total=total or self.config.run.train_steps, initial=start, desc=f"{self.step.name}",
                            unit=unit)
