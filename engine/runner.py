"""One model of a run: its chunks, and when it trains, its DDP wrapper, optimizer and LR schedule.

A run can hold several :class:`ModelRunner` objects side by side on the same ranks: the
policy that trains, a frozen reference (DPO, PPO's KL), and later a critic and a reward
model. Each runs megatron's schedules (training or forward-only) under any
pipeline/virtual-pipeline layout, and gives its checkpoint state. A trained runner can
:meth:`~ModelRunner.offload` its optimizer state and free its grad buffers while a rollout
generates, and :meth:`~ModelRunner.onload` them before training resumes. The training loop
(:mod:`engine.trainer`) owns logging, validation, checkpoint timing and signals; it holds
no model-building code of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import torch

from engine.checkpoint import dist as ckpt
from engine.data.batching import Batch, schedule_iterators
from engine.memory_swap import HostSwap, SwapError
from engine.models.presets import resolve_preset

logger = logging.getLogger(__name__)

ForwardStep = Callable[[Iterator[Batch], torch.nn.Module], tuple[torch.Tensor, Any]]


def build_model(config: Any, parallel: Any, wrap_ddp: bool = True, step: Any = None,
                model_class: Optional[tuple[type, dict[str, Any]]] = None) -> tuple[list[Any], Any, Any]:
    """Build this rank's model chunks; returns (chunks, preset, TransformerConfig).

    The class per chunk is ``model_class`` if given, else what ``step`` asks for, else ``GPTModel``.
    """
    from engine.models.builder import build_gpt_chunks, check_fp8, transformer_config, use_transformer_engine
    from engine.models.init import init_layout_invariant

    preset = resolve_preset(config.model)
    use_te = use_transformer_engine(config.model.layer_spec)
    check_fp8(config.precision, use_te)
    tconfig = transformer_config(
        preset, parallel.layout, config.precision, use_te, config.model.recompute,
        config.model.recompute_num_layers, config.model.init_std,
    )
    model_cls, model_kwargs = model_class or (step.model_class() if step is not None else (None, None))
    chunks = build_gpt_chunks(preset, tconfig, use_te, parallel.layout.virtual_pipeline, model_cls, model_kwargs)
    if torch.cuda.is_available():
        chunks = [c.cuda(torch.cuda.current_device()) for c in chunks]
    if config.model.init == "layout_invariant":
        init_layout_invariant(chunks, config.run.seed, config.model.init_std, preset.num_layers, preset.zero_centered_gamma)
    if wrap_ddp:
        chunks = wrap_in_ddp(chunks, tconfig, parallel.layout, config.precision.grad_reduce_in_fp32)
    return chunks, preset, tconfig


def wrap_in_ddp(chunks: list[Any], tconfig: Any, layout: Any, grad_reduce_in_fp32: bool) -> list[Any]:
    from megatron.core.distributed import DistributedDataParallelConfig

    from engine.parallel.ddp import ddp_class

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=grad_reduce_in_fp32,
        overlap_grad_reduce=False,
        use_distributed_optimizer=layout.distributed_optimizer,
    )
    wrapped = [
        ddp_class()(config=tconfig, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
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
    fuse_cpu_adamw(optimizer)
    sched = config.scheduler
    # the schedule is advanced before each update (step k trains at the LR of k), so a horizon of train_steps
    # would spend the last step at min_lr (0 by default); one past the last step keeps every step training
    decay = max(sched.decay_steps or config.run.train_steps + 1, sched.warmup_steps + 1)
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
        # this run's config is the schedule (a resumed run with more steps or another LR trains with them; the
        # checkpoint's values used to win silently, so extra steps of a finished cosine ran at LR 0)
        override_opt_param_scheduler=True,
        use_checkpoint_opt_param_scheduler=False,
    )
    return optimizer, scheduler


SCHEDULE_FIELDS = {"max_lr": "optimizer.lr", "min_lr": "optimizer.min_lr", "lr_warmup_steps": "scheduler.warmup_steps",
                   "lr_decay_steps": "decay steps (scheduler.decay_steps or run.train_steps + 1)",
                   "lr_decay_style": "scheduler.type", "start_wd": "optimizer.weight_decay"}


def schedule_changes(scheduler: Any, saved: dict[str, Any]) -> list[str]:
    """What of the saved schedule this run's config changes, as ``name: checkpoint -> now`` strings; a constant
    schedule before and after has no decay, so its decay steps and minimum LR change nothing (a resume with more
    steps was warned about a change of decay steps)."""
    constant = saved.get("lr_decay_style") == scheduler.lr_decay_style == "constant"
    unread = ("lr_decay_steps", "min_lr") if constant else ()
    return [f"{name}: {saved[key]} -> {getattr(scheduler, key)}" for key, name in SCHEDULE_FIELDS.items()
            if key in saved and key not in unread and saved[key] != getattr(scheduler, key)]


def fuse_cpu_adamw(optimizer: Any) -> None:
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


def starting_weights(reference: Optional[str], load: Optional[str]) -> Optional[str]:
    """The checkpoint a frozen reference (or prior) loads for ``reference``: ``init`` means the weights the policy
    starts from, ``checkpoint.load`` when the run has one (a reference at random weights beside a policy loaded
    from a checkpoint was never what was meant), else the seeded initialisation (None: nothing to load)."""
    if reference == "init":
        return load or None
    return reference


class ModelRunner:
    """One model on this rank. Trained runners own DDP, optimizer and schedule; frozen ones only chunks."""

    def __init__(self, chunks: list[Any], preset: Any, transformer_config: Any, parallel: Any,
                 optimizer: Any = None, scheduler: Any = None):
        self.chunks = chunks
        self.preset = preset
        self.transformer_config = transformer_config
        self.parallel = parallel
        self.optimizer = optimizer
        self.scheduler = scheduler
        self._swap: Optional[HostSwap] = None
        if optimizer is not None:
            self._configure_grad_hooks()

    @classmethod
    def trained(cls, config: Any, parallel: Any, model_class: tuple[type, dict[str, Any]]) -> ModelRunner:
        """A model that trains: DDP-wrapped chunks, megatron optimizer and LR schedule."""
        chunks, preset, tconfig = build_model(config, parallel, model_class=model_class)
        optimizer, scheduler = build_optimizer(config, chunks, parallel.layout)
        return cls(chunks, preset, tconfig, parallel, optimizer, scheduler)

    @classmethod
    def frozen(cls, config: Any, parallel: Any, model_class: tuple[type, dict[str, Any]],
               checkpoint: Optional[str] = None) -> ModelRunner:
        """A forward-only model (no gradients, no optimizer), with weights from ``checkpoint`` if given."""
        chunks, preset, tconfig = build_model(config, parallel, wrap_ddp=False, model_class=model_class)
        for chunk in chunks:
            chunk.requires_grad_(False)
            chunk.eval()
        runner = cls(chunks, preset, tconfig, parallel)
        if checkpoint:
            runner.load_weights(checkpoint)
        return runner

    @property
    def trains(self) -> bool:
        return self.optimizer is not None

    def _configure_grad_hooks(self) -> None:
        from megatron.core.distributed import finalize_model_grads

        self.transformer_config.finalize_model_grads_func = finalize_model_grads
        no_sync = [c.no_sync for c in self.chunks]
        self.transformer_config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync

    # ------------------------------------------------------------------ memory swap between phases
    @property
    def offloaded(self) -> bool:
        return self._swap is not None and self._swap.offloaded

    def offload(self, optimizer_state: bool = True, grad_buffers: bool = True) -> dict[str, int]:
        """Before generation: optimizer state to host memory, grad buffers freed; returns bytes per kind.

        See :mod:`engine.memory_swap`. Weights stay, so forward-only schedules still run; training,
        optimizer steps and checkpoints are refused until :meth:`onload`. Offloading twice, or
        a frozen runner, raises :class:`~engine.memory_swap.SwapError`.
        """
        if self._swap is None:
            self._swap = HostSwap(self.chunks, self.optimizer)
        return self._swap.offload(optimizer_state, grad_buffers)

    def onload(self) -> dict[str, int]:
        """Before training resumes: optimizer state back, grad buffers re-allocated and zeroed.

        Raises :class:`~engine.memory_swap.SwapError` when nothing is offloaded.
        """
        if self._swap is None:
            raise SwapError("onload() without offload(): the model's state is already in place")
        return self._swap.onload()

    def _require_onloaded(self, what: str) -> None:
        if self.offloaded:
            raise SwapError(f"{what} while the optimizer state and grad buffers are offloaded; call onload() first")

    # ------------------------------------------------------------------ schedules
    def run_schedule(self, micro_batches: list[Batch], forward_step: ForwardStep, forward_only: bool,
                     collect_outputs: bool = False) -> list[Any]:
        """megatron's forward(-backward) schedule over ``micro_batches``; returns what it collects.

        ``forward_step(data_iterator, model) -> (output, loss_fn)`` as megatron expects. With
        ``collect_outputs`` (forward-only), the last stage returns ``loss_fn(output, True)`` per
        micro-batch instead of loss records.
        """
        from megatron.core.pipeline_parallel import get_forward_backward_func

        if not forward_only:
            self._require_onloaded("a training schedule")
        if not micro_batches:
            return []
        first = micro_batches[0]["tokens"]
        return list(get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=schedule_iterators(micro_batches, len(self.chunks)),
            model=self.chunks,
            num_microbatches=len(micro_batches),
            # positions and rows per micro-batch as built (micro-batches may be cut to their longest
            # row; pair steps put chosen and rejected side by side)
            seq_length=int(first.shape[1]),
            micro_batch_size=int(first.shape[0]),
            decoder_seq_length=int(first.shape[1]),
            forward_only=forward_only,
            collect_non_loss_data=collect_outputs,
        ) or [])

    def zero_grad(self) -> None:
        self._require_onloaded("zero_grad()")
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

    def optimizer_step(self, advance_schedule: bool = True) -> tuple[float, float]:
        """Advance the LR schedule, then update; returns (learning rate, gradient norm).

        The schedule is advanced first so step k trains at the LR of step k (warm-up starts above 0). Online RL
        advances it once per iteration instead (:meth:`advance_schedule`; ``advance_schedule=False`` here).
        """
        self._require_onloaded("an optimizer step")
        if advance_schedule:
            self.scheduler.step(increment=1)
        lr = float(self.optimizer.param_groups[0]["lr"])
        _, grad_norm, _ = self.optimizer.step()
        return lr, float(grad_norm) if grad_norm is not None else float("nan")

    def advance_schedule(self) -> None:
        """One step of the LR schedule, without an update (online RL: its schedule counts iterations, each of
        several optimizer steps at the same LR, as run.train_steps does)."""
        self.scheduler.step(increment=1)

    def set_training(self, training: bool) -> None:
        for chunk in self.chunks:
            chunk.train(training)

    # ------------------------------------------------------------------ checkpoints
    @property
    def signature(self) -> dict[str, Any]:
        return ckpt.model_signature(self.preset)

    def save(self, directory: str, step: int, extra: dict[str, Any], keep_last: int, with_optimizer: bool) -> str:
        self._require_onloaded("saving a checkpoint")
        optimizer = self.optimizer if with_optimizer else None
        return str(ckpt.save(directory, step, self.chunks, optimizer, self.parallel, extra, keep_last))

    def load(self, path: Path) -> dict[str, Any]:
        """Resume model, optimizer and schedule from ``path``; returns the checkpoint's metadata."""
        self._require_onloaded("loading a checkpoint")
        # megatron's param groups carry max_lr/min_lr, which the scheduler reads before its own: keep this run's
        group_lrs = [{k: g[k] for k in ("max_lr", "min_lr") if k in g} for g in self.optimizer.param_groups] \
            if self.optimizer is not None else []
        meta = ckpt.load(path, self.chunks, self.optimizer, self.parallel, self.signature,
                         load_optimizer=self.optimizer is not None)
        if self.optimizer is not None:
            for group, lrs in zip(self.optimizer.param_groups, group_lrs, strict=True):
                group.update(lrs)
            fuse_cpu_adamw(self.optimizer)  # loaded param groups carry the saving run's flags
            changed = schedule_changes(self.scheduler, meta["scheduler"])
            if changed and self.parallel.is_main:  # every rank compares alike: one says it
                logger.warning("resuming %s with this run's schedule, not the checkpoint's: %s", path, "; ".join(changed))
            self.scheduler.load_state_dict(meta["scheduler"])
        return meta

    def load_weights(self, checkpoint: str) -> list[str]:
        """Initialise weights from ``checkpoint`` at this layout; returns keys left at initialisation."""
        return ckpt.load_weights(ckpt.resolve(checkpoint), self.chunks, self.parallel, self.signature)
