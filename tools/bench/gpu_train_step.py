"""GPU benchmark: Keel's SFT training step against Hugging Face Llama on the same shape and batch.

Default shape: ``bench-1b`` (24 layers, hidden 2048, 16 heads / 8 KV heads, FFN 5632, vocab 32000,
1.26B parameters), sequence 2048, micro-batch 4: the shape of the peer table in
``../shared/gpu/README.md``. Each side runs alone in a fresh process, one after the other:

* ``keel_bf16`` / ``keel_fp8``: ``Trainer(config, SFTStep(), parallel).train_step(n)`` on one GPU,
  TE layer spec, bf16 (megatron's optimizer keeps fp32 main weights over fused AdamW), and for
  ``keel_fp8`` ``precision.fp8=hybrid`` (TE delayed scaling). The data pull is replaced by the fixed
  batch, as in ``tools/bench/train_step.py``.
* ``hf_eager`` / ``hf_compiled``: ``LlamaForCausalLM`` (sdpa) in bf16, ``AdamW(fused=True)``,
  ``clip_grad_norm_(1.0)``; ``hf_compiled`` wraps the model in ``torch.compile`` (the peer at its
  best in that table). Its parameters are bf16 with no fp32 copy: less optimizer work than Keel's.

A step (zero-grad, forward, loss, backward, clip, update) is timed with ``torch.cuda.synchronize``
on both ends; ``--warmup`` steps (compilation, FP8 amax history) are not timed. Reported per side:
median step, tokens/s, model TFLOP/s (``6 N_non-embedding + 12 layers hidden seq`` per token, the
README's formula) and peak ``torch.cuda.max_memory_allocated``. A side that fails is reported
with its error; the others still run.

It has not run on a GPU yet. ``--allow-cpu`` runs the code path on the CPU (local spec, fp32,
no compile): a smoke test whose numbers mean nothing.

    python tools/bench/gpu_train_step.py [--sides keel_bf16,keel_fp8,hf_eager,hf_compiled] [--out FILE]
    python tools/bench/gpu_train_step.py --allow-cpu --preset tiny-llama --seq-len 64 --batch 2 --steps 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tools.bench.common import hf_train_step  # noqa: E402
from tools.bench.gpu_common import bench_parser, drive, hf_llama, on_gpu, preset_of, summary, timed  # noqa: E402

DEFAULT_OUT = REPO / "tools" / "bench" / "results" / "gpu_train_step.json"
SIDES = ("keel_bf16", "keel_fp8", "hf_eager", "hf_compiled")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = bench_parser(__doc__, DEFAULT_OUT, SIDES)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    return parser.parse_args(argv)


def _batch(args: argparse.Namespace, vocab: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(args.seed)
    return torch.randint(0, vocab, (args.batch, args.seq_len + 1), generator=generator)


def keel_step(args: argparse.Namespace, fp8: bool, info: dict[str, Any]) -> Callable[[int], float]:
    from engine.algorithms.sft import SFTStep
    from engine.config import TrainConfig, load_config
    from engine.parallel.layout import ParallelLayout, ParallelState
    from engine.trainer import Trainer

    run_dir = tempfile.mkdtemp(prefix="keel-gpu-bench-")
    overrides = [f"model.preset={args.preset}", f"data.seq_length={args.seq_len}", f"data.micro_batch_size={args.batch}",
                 f"data.global_batch_size={args.batch}", "data.loss_on=all", "data.num_samples=64",
                 f"run.train_steps={args.warmup + args.steps + 8}", f"run.output_dir={run_dir}", f"run.seed={args.seed}",
                 "logging.tensorboard=false", "logging.progress=false", "checkpoint.save_interval=0",
                 "checkpoint.resume=none", "optimizer.weight_decay=0.0", "optimizer.clip_grad=1.0",
                 "scheduler.type=constant", "scheduler.warmup_steps=0"]
    overrides += (["model.layer_spec=te", "precision.dtype=bf16"] + (["precision.fp8=hybrid"] if fp8 else [])
                  if on_gpu() else ["model.layer_spec=local", "precision.dtype=fp32"])
    config = load_config(TrainConfig, None, overrides)
    parallel = ParallelState.initialize(ParallelLayout.from_config(config.parallel, 1), seed=args.seed)
    trainer = Trainer(config, SFTStep(), parallel)
    preset = trainer.model.preset
    batch = _batch(args, preset.vocab_size)
    micro = {"tokens": batch[:, :-1].contiguous(), "labels": batch[:, 1:].contiguous(),
             "loss_mask": torch.ones(args.batch, args.seq_len)}
    trainer._next_micro_batches = lambda sampler, dataset: [micro]  # type: ignore[method-assign]
    info.update(config_overrides=overrides, parameters=preset.parameter_count())
    return lambda n: float(trainer.train_step(n)["lm_loss"])


def hf_step(args: argparse.Namespace, compiled: bool, info: dict[str, Any]) -> Callable[[int], float]:
    preset = preset_of(args.preset)
    torch.manual_seed(args.seed)
    model = hf_llama(preset, use_cache=False).train()
    device, dtype = model.device, model.dtype
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                                  fused=True)
    forward = torch.compile(model) if compiled and on_gpu() else model
    batch = _batch(args, preset.vocab_size).to(device)
    tokens, labels = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
    info.update(parameters=preset.parameter_count(), dtype=str(dtype), compiled=compiled and on_gpu())
    return hf_train_step(model, optimizer, tokens, labels, forward)


def run_side(args: argparse.Namespace) -> dict[str, Any]:
    """Build one side, run its warm-up and timed steps; the JSON of one child process."""
    info: dict[str, Any] = {"side": args.side}
    makers = {"keel_bf16": lambda: keel_step(args, False, info), "keel_fp8": lambda: keel_step(args, True, info),
              "hf_eager": lambda: hf_step(args, False, info), "hf_compiled": lambda: hf_step(args, True, info)}
    losses, times = timed(makers[args.side](), args.warmup, args.steps)
    tokens, preset = args.batch * args.seq_len, preset_of(args.preset)
    per_token = 6 * preset.non_embedding_parameter_count() + 12 * preset.num_layers * preset.hidden_size * args.seq_len
    info.update(summary(times), loss_first_last=[round(losses[0], 4), round(losses[-1], 4)])
    info.update(tokens_per_s=round(tokens / info["seconds_median"], 1),
                model_tflops=round(tokens / info["seconds_median"] * per_token / 1e12, 1))
    return info


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = {"shape": {"preset": args.preset, "batch": args.batch, "seq_length": args.seq_len},
              "warmup_steps": args.warmup, "timed_steps": args.steps}
    return drive("gpu_train_step", args, run_side, __file__, ("tokens_per_s", "model_tflops"), report)


if __name__ == "__main__":
    sys.exit(main())
