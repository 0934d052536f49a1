"""The training loop shared by every algorithm.

``Trainer(config, step, parallel).fit()``: builds the model chunks (megatron GPTModel,
DDP-wrapped), the megatron optimizer (distributed or not) and LR schedule, the data
sets and the resumable sampler; then per optimizer step runs megatron's
forward/backward schedule (pipeline micro-batching, gradient accumulation to the
global batch), checks the loss, steps the optimizer, logs, checkpoints, and handles
SIGTERM (save, then exit) for pre-emptible clusters.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from engine.algorithms.base import Batch, Step
from engine.checkpoint import dist as ckpt
from engine.config import save_config
from engine.data.sampler import GlobalBatchSampler
from engine.data.tokenizers import load_tokenizer
from engine.faults import maybe_fail
from engine.metrics import MetricsWriter
from engine.models.presets import resolve_preset

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
    preempted: bool = False
    tokens_per_second: float = 0.0
    run_dir: str = ""


@dataclass
class ModelBundle:
    """Model chunks (DDP-wrapped), optimizer and schedule of one rank."""

    chunks: list[Any]
    optimizer: Any
    scheduler: Any
    preset: Any
    transformer_config: Any


def build_model(config: Any, parallel: Any, wrap_ddp: bool = True, step: Optional[Step] = None) -> tuple[list[Any], Any, Any]:
    """Build this rank's model chunks (the class ``step`` asks for); returns (chunks, preset, TransformerConfig)."""
    from engine.models.builder import build_gpt_chunks, check_fp8, transformer_config, use_transformer_engine
    from engine.models.init import init_layout_invariant

    preset = resolve_preset(config.model)
    use_te = use_transformer_engine(config.model.layer_spec)
    check_fp8(config.precision, use_te)
    tconfig = transformer_config(
        preset, parallel.layout, config.precision, use_te, config.model.recompute,
        config.model.recompute_num_layers, config.model.init_std,
    )
    model_cls, model_kwargs = step.model_class() if step is not None else (None, None)
    chunks = build_gpt_chunks(preset, tconfig, use_te, parallel.layout.virtual_pipeline, model_cls, model_kwargs)
    if torch.cuda.is_available():
        chunks = [c.cuda(torch.cuda.current_device()) for c in chunks]
    if config.model.init == "layout_invariant":
        init_layout_invariant(chunks, config.run.seed, config.model.init_std, preset.num_layers, preset.zero_centered_gamma)
    if wrap_ddp:
        chunks = wrap_in_ddp(chunks, tconfig, parallel.layout, config.precision.grad_reduce_in_fp32)
    return chunks, preset, tconfig


def wrap_in_ddp(chunks: list[Any], tconfig: Any, layout: Any, grad_reduce_in_fp32: bool) -> list[Any]:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=grad_reduce_in_fp32,
        overlap_grad_reduce=False,
        use_distributed_optimizer=layout.distributed_optimizer,
    )
    wrapped = [
        DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]
    for chunk in wrapped:
        chunk.broadcast_params()
    return wrapped


def build_optimizer(config: Any, chunks: list[Any], layout: Any) -> tuple[Any, Any]:
    """megatron optimizer (AdamW; fp32 master weights under bf16) and LR/WD schedule."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    opt = config.optimizer
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=opt.lr,
            min_lr=opt.min_lr,
            weight_decay=opt.weight_decay,
            adam_beta1=opt.beta1,
            adam_beta2=opt.beta2,
            adam_eps=opt.eps,
            clip_grad=opt.clip_grad,
            bf16=config.precision.dtype == "bf16",
            params_dtype=config.precision.torch_dtype,
            use_distributed_optimizer=layout.distributed_optimizer,
        ),
        chunks,
    )
    _fuse_cpu_adamw(optimizer)
    sched = config.scheduler
    decay = max(sched.decay_steps or config.run.train_steps, sched.warmup_steps + 1)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if sched.warmup_steps else opt.lr,
        max_lr=opt.lr,
        min_lr=opt.min_lr if sched.type == "cosine" else opt.lr,
        lr_warmup_steps=sched.warmup_steps,
        lr_decay_steps=decay,
        lr_decay_style=sched.type,
        start_wd=opt.weight_decay,
        end_wd=opt.weight_decay,
        wd_incr_steps=decay,
        wd_incr_style="constant",
    )
    return optimizer, scheduler


def _fuse_cpu_adamw(optimizer: Any) -> None:
    """Switch torch's AdamW (megatron's fallback without TE/apex) to its fused kernel on CPU.

    torch defaults to the per-tensor Python loop for CPU parameters; the fused kernel does
    the same update in one pass per tensor. GPU runs use TE's or apex's FusedAdam instead.
    """
    inner = [getattr(o, "optimizer", None) for o in getattr(optimizer, "chained_optimizers", [optimizer])]
    for torch_opt in inner:
        if type(torch_opt) is not torch.optim.AdamW:
            continue
        params = [p for group in torch_opt.param_groups for p in group["params"]]
        if not params or any(p.device.type != "cpu" or not p.is_floating_point() for p in params):
            continue
        torch_opt.defaults.update(fused=True, foreach=False)
        for group in torch_opt.param_groups:
            group.update(fused=True, foreach=False)


SEQUENCE_KEYS = ("tokens", "labels", "loss_mask")


def group_by_length(groups: list[list[int]], length: Callable[[int], int]) -> list[list[int]]:
    """The same indices, longest first, in groups of the same sizes.

    The loss is a sum over the step's items divided by their total count, so how rows are
    grouped into micro-batches changes nothing but the order of floating-point sums.
    """
    ordered = sorted((i for indices in groups for i in indices), key=length, reverse=True)
    out, start = [], 0
    for indices in groups:
        out.append(ordered[start: start + len(indices)])
        start += len(indices)
    return out


def padded_length(used: int, seq_length: int, multiple: int) -> int:
    """``used`` rounded up to ``multiple`` (sequence parallelism splits it), at most ``seq_length``."""
    return min(seq_length, -(-max(used, 1) // multiple) * multiple)


def cut_to_length(batch: Batch, length: int) -> Batch:
    """``batch`` with its per-position tensors (:data:`SEQUENCE_KEYS`) cut to ``length`` positions.

    Under causal attention no kept position sees a cut one, and every cut position is padding
    (no loss, after every row's end), so the outputs that matter are unchanged.
    """
    return {key: value[:, :length] if key in SEQUENCE_KEYS else value for key, value in batch.items()}


def schedule_iterators(micro_batches: list[Batch], num_chunks: int) -> Any:
    """Data iterator(s) for megatron's schedule: one, or one per virtual-pipeline chunk."""
    if num_chunks == 1:
        return iter(micro_batches)
    return [iter(micro_batches) for _ in range(num_chunks)]


def _memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import psutil

    return psutil.Process().memory_info().rss / 2**20


class Trainer:
    """Runs ``step`` under ``config`` on the process groups of ``parallel``."""

    def __init__(self, config: Any, step: Step, parallel: Any):
        self.config = config
        self.step = step
        self.parallel = parallel
        self.layout = parallel.layout
        self.run_dir = config.run.output_dir
        self._stop_requested = False
        chunks, preset, tconfig = build_model(config, parallel, step=step)
        optimizer, scheduler = build_optimizer(config, chunks, self.layout)
        self.model = ModelBundle(chunks, optimizer, scheduler, preset, tconfig)
        self._configure_schedule_hooks()
        self.tokenizer = load_tokenizer(config.data.tokenizer)
        if self.tokenizer.vocab_size > preset.vocab_size:
            raise TrainingError(
                f"tokenizer has {self.tokenizer.vocab_size} tokens but model {preset.name} has vocab_size="
                f"{preset.vocab_size}; set model.vocab_size >= {self.tokenizer.vocab_size}"
            )
        self.train_data, self.valid_data = step.build_datasets(config, self.tokenizer)
        data = config.data
        self.sampler = GlobalBatchSampler(
            len(self.train_data), data.global_batch_size, data.micro_batch_size, parallel.dp_rank, self.layout.data,
            config.run.seed,
        )
        self.metrics = MetricsWriter(self.run_dir, parallel.is_main, config.logging.tensorboard)
        self.best_validation: Optional[tuple[int, float]] = None  # (step, loss) of the best checkpoint

    # ------------------------------------------------------------------ set-up helpers
    def _configure_schedule_hooks(self) -> None:
        from megatron.core.distributed import finalize_model_grads

        chunks = self.model.chunks
        tconfig = self.model.transformer_config
        tconfig.finalize_model_grads_func = finalize_model_grads
        no_sync = [c.no_sync for c in chunks]
        tconfig.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync


    def _forward_step(self, data_iterator: Iterator[Batch], model: torch.nn.Module) -> tuple[torch.Tensor, Any]:
        batch = next(data_iterator)
        if torch.cuda.is_available():
            batch = {k: v.cuda(non_blocking=True) for k, v in batch.items()}
        output = self.step.forward(model, batch)
        return output, partial(self.step.loss, batch)

    def _run_schedule(self, micro_batches: list[Batch], forward_only: bool) -> torch.Tensor:
        """Run the schedule; returns the global (sum, count) per metric, ``[metrics, 2]``."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        results = get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=schedule_iterators(micro_batches, len(self.model.chunks)),
            model=self.model.chunks,
            num_microbatches=len(micro_batches),
            # positions and rows per micro-batch as built (micro-batches may be cut to their longest
            # row; pair steps put chosen and rejected side by side)
            seq_length=int(micro_batches[0]["tokens"].shape[1]),
            micro_batch_size=int(micro_batches[0]["tokens"].shape[0]),
            decoder_seq_length=int(micro_batches[0]["tokens"].shape[1]),
            forward_only=forward_only,
        )
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
        device = "cuda" if torch.cuda.is_available() else "cpu"
        totals = totals.to(device)
        dist.all_reduce(totals, group=self.parallel.dp_group)
        if self.layout.pipeline > 1:
            if not self.parallel.is_last_stage():
                totals.zero_()
            dist.all_reduce(totals, group=self.parallel.pp_group)
        return totals.cpu()

    def _next_micro_batches(self, sampler: GlobalBatchSampler, dataset: Any) -> list[Batch]:
        groups = sampler.next_step()
        if not (self.config.data.group_by_length and hasattr(dataset, "length")):
            return [dataset.collate(indices) for indices in groups]
        groups = group_by_length(groups, dataset.length)
        lengths = [max(dataset.length(i) for i in indices) for indices in groups]
        if self.layout.pipeline > 1:  # stages exchange fixed-size activations: one length per step
            lengths = [max(lengths)] * len(lengths)
        multiple = 8 * self.layout.tensor
        return [cut_to_length(dataset.collate(indices), padded_length(n, self.config.data.seq_length, multiple))
                for indices, n in zip(groups, lengths, strict=True)]

    # ------------------------------------------------------------------ one step
    def train_step(self, step_number: int) -> dict[str, float]:
        """Forward/backward over one global batch and one optimizer update."""
        chunks, optimizer = self.model.chunks, self.model.optimizer
        for chunk in chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        micro_batches = self._next_micro_batches(self.sampler, self.train_data)
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
        # The schedule is advanced first so step k trains at the LR of step k (warm-up starts above 0).
        self.model.scheduler.step(increment=1)
        metrics["lr"] = float(optimizer.param_groups[0]["lr"])
        _, grad_norm, _ = optimizer.step()
        metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        metrics["tokens"] = float(sum(self.step.tokens_in(b) for b in micro_batches) * self.layout.data)
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss over ``run.eval_batches`` global batches of the validation set (fixed order)."""
        if len(self.valid_data) == 0:
            return {}
        for chunk in self.model.chunks:
            chunk.eval()
        data = self.config.data
        sampler = GlobalBatchSampler(len(self.valid_data), data.global_batch_size, data.micro_batch_size,
                                     self.parallel.dp_rank, self.layout.data, self.config.run.seed, shuffle=False)
        batches = [self._run_schedule(self._next_micro_batches(sampler, self.valid_data), True)
                   for _ in range(self.config.run.eval_batches)]
        totals = torch.stack(batches).sum(0)
        for chunk in self.model.chunks:
            chunk.train()
        return self._means(totals)

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_extra(self) -> dict[str, Any]:
        return {
            "model_signature": ckpt.model_signature(self.model.preset),
            "scheduler": self.model.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "config": self.config.to_dict(),
            "algorithm": self.step.name,
            "best_validation": self.best_validation,
        }

    def save_checkpoint(self, step_number: int) -> str:
        chk = self.config.checkpoint
        optimizer = self.model.optimizer if chk.save_optimizer else None
        path = ckpt.save(chk.dir, step_number, self.model.chunks, optimizer, self.parallel,
                         self._checkpoint_extra(), chk.keep_last)
        return str(path)

    def maybe_resume(self) -> int:
        """Resume per ``checkpoint.resume`` (or load weights per ``checkpoint.load``); returns the start step."""
        chk = self.config.checkpoint
        signature = ckpt.model_signature(self.model.preset)
        path: Optional[Path] = None
        if chk.resume == "auto":
            path = ckpt.find_latest(chk.dir)
        elif chk.resume != "none":
            path = ckpt.resolve(chk.resume)
            if not ckpt.is_complete(path):
                raise ckpt.CheckpointError(f"checkpoint.resume={chk.resume}: not a complete checkpoint")
        if path is not None:
            meta = ckpt.load(path, self.model.chunks, self.model.optimizer, self.parallel, signature)
            _fuse_cpu_adamw(self.model.optimizer)  # loaded param groups carry the saving run's flags
            self.model.scheduler.load_state_dict(meta["scheduler"])
            self.sampler.load_state_dict(meta["sampler"])
            best = meta.get("best_validation")
            self.best_validation = (int(best[0]), float(best[1])) if best else None
            logger.info("resumed from %s at step %d", path, meta["step"])
            return int(meta["step"])
        if chk.load:
            ckpt.load_weights(ckpt.resolve(chk.load), self.model.chunks, self.parallel, signature)
            logger.info("initialised weights from %s", chk.load)
        return 0

    # ------------------------------------------------------------------ the loop
    def _install_sigterm(self) -> Any:
        def handler(signum: int, frame: Any) -> None:
            logger.warning("SIGTERM received: will checkpoint after the current step and exit")
            self._stop_requested = True

        try:
            return signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread
            return None

    def _stop_agreed(self) -> bool:
        flag = torch.tensor([1.0 if self._stop_requested else 0.0])
        if torch.cuda.is_available():
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def fit(self) -> FitResult:
        cfg = self.config
        if self.parallel.is_main:
            os.makedirs(self.run_dir, exist_ok=True)
            save_config(cfg, os.path.join(self.run_dir, "config.yaml"))
        start = self.maybe_resume()
        result = FitResult(start_step=start, end_step=start, run_dir=self.run_dir)
        previous = self._install_sigterm()
        progress = self._progress(start)
        tokens_total, time_total = 0.0, 0.0
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
                    result.preempted = True
                    logger.warning("stopped on SIGTERM after step %d; checkpoint %s", step_number, result.checkpoint)
                    break
        finally:
            if progress is not None:
                progress.close()
            self.metrics.close()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        result.tokens_per_second = tokens_total / time_total if time_total else 0.0
        return result

    def _validate(self, step_number: int, result: FitResult) -> bool:
        """Evaluate, log, and say whether this is the best validation loss so far."""
        valid = self.evaluate()
        if not valid:
            return False
        loss = valid[self.step.loss_name]
        result.validation[step_number] = loss
        self.metrics.write(step_number, valid, prefix="validation")
        if self.best_validation is None or loss < self.best_validation[1]:
            self.best_validation = (step_number, loss)
            return True
        return False

    def _progress(self, start: int) -> Any:
        if not (self.parallel.is_main and self.config.logging.progress):
            return None
        from tqdm import tqdm

        return tqdm(total=self.config.run.train_steps, initial=start, desc=f"{self.step.name}", unit="step",
                    dynamic_ncols=True)
