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
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tools.bench.common import machine_info, print_result, run_child, write_report  # noqa: E402

DEFAULT_OUT = REPO / "tools" / "bench" / "results" / "gpu_train_step.json"
SIDES = ("keel_bf16", "keel_fp8", "hf_eager", "hf_compiled")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--preset", default="bench-1b")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--allow-cpu", action="store_true", help="smoke-test the code path without a GPU")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # run one side, write its JSON here
    parser.add_argument("--side", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _gpu() -> bool:
    return torch.cuda.is_available()


def _sync() -> None:
    if _gpu():
        torch.cuda.synchronize()


def _batch(args: argparse.Namespace, vocab: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(args.seed)
    return torch.randint(0, vocab, (args.batch, args.seq_len + 1), generator=generator)


def _preset(args: argparse.Namespace) -> Any:
    from engine.config import ModelConfig
    from engine.models.presets import resolve_preset

    return resolve_preset(ModelConfig(preset=args.preset))


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
                  if _gpu() else ["model.layer_spec=local", "precision.dtype=fp32"])
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
    from transformers import LlamaConfig, LlamaForCausalLM

    preset = _preset(args)
    config = LlamaConfig(
        vocab_size=preset.vocab_size, hidden_size=preset.hidden_size, intermediate_size=preset.ffn_hidden_size,
        num_hidden_layers=preset.num_layers, num_attention_heads=preset.num_attention_heads,
        num_key_value_heads=preset.num_query_groups, max_position_embeddings=preset.max_sequence_length,
        rms_norm_eps=preset.layernorm_epsilon, rope_parameters={"rope_type": "default", "rope_theta": float(preset.rotary_base)},
        tie_word_embeddings=preset.tie_embeddings, attention_bias=False, mlp_bias=False, hidden_act="silu",
        use_cache=False, attn_implementation="sdpa")
    device, dtype = ("cuda", torch.bfloat16) if _gpu() else ("cpu", torch.float32)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                                  fused=True)
    forward = torch.compile(model) if compiled and _gpu() else model
    batch = _batch(args, preset.vocab_size).to(device)
    tokens, labels = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
    info.update(parameters=preset.parameter_count(), dtype=str(dtype), compiled=compiled and _gpu())

    def step(n: int) -> float:
        optimizer.zero_grad(set_to_none=True)
        logits = forward(input_ids=tokens).logits
        loss = model.loss_function(logits=logits, labels=None, shift_labels=labels, vocab_size=config.vocab_size)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return float(loss.detach())

    return step


def run_side(args: argparse.Namespace) -> dict[str, Any]:
    """Build one side, run its warm-up and timed steps; the JSON of one child process."""
    info: dict[str, Any] = {"side": args.side}
    makers = {"keel_bf16": lambda: keel_step(args, False, info), "keel_fp8": lambda: keel_step(args, True, info),
              "hf_eager": lambda: hf_step(args, False, info), "hf_compiled": lambda: hf_step(args, True, info)}
    step = makers[args.side]()
    losses, times = [], []
    for n in range(1, args.warmup + args.steps + 1):
        _sync()
        began = time.perf_counter()
        losses.append(step(n))
        _sync()
        if n > args.warmup:
            times.append(time.perf_counter() - began)
    tokens = args.batch * args.seq_len
    preset = _preset(args)
    per_token = 6 * preset.non_embedding_parameter_count() + 12 * preset.num_layers * preset.hidden_size * args.seq_len
    median = statistics.median(times)
    info.update(step_s_median=round(median, 5), step_s_all=[round(t, 5) for t in times],
                tokens_per_s=round(tokens / median, 1), model_tflops=round(tokens / median * per_token / 1e12, 1),
                loss_first_last=[round(losses[0], 4), round(losses[-1], 4)],
                max_memory_allocated_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if _gpu() else None)
    return info


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        write_report(Path(args.child), run_side(args))
        print_result({"side": args.side})
        return 0
    if not _gpu() and not args.allow_cpu:
        print("gpu_train_step: no CUDA GPU here (use --allow-cpu to smoke-test the code path)", file=sys.stderr)
        return 2
    passed = [f"--preset={args.preset}", f"--batch={args.batch}", f"--seq-len={args.seq_len}",
              f"--warmup={args.warmup}", f"--steps={args.steps}", f"--seed={args.seed}"]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="keel-gpu-bench-") as tmp:
        for side in args.sides.split(","):
            out = Path(tmp) / f"{side}.json"
            cmd = [sys.executable, __file__, *passed, "--side", side, "--child", str(out)]
            try:
                results[side] = run_child(cmd, side, REPO, result_file=out)
            except SystemExit as failed:  # one side's failure is a result, not the end of the run
                results[side] = {"error": str(failed)[-3000:]}
            print(side, {k: results[side].get(k) for k in ("tokens_per_s", "model_tflops", "error")}, flush=True)
    device = torch.cuda.get_device_name(0) if _gpu() else "cpu (smoke test)"
    write_report(args.out, {"benchmark": "gpu_train_step", "device": device, "machine": machine_info(),
                            "torch": torch.__version__, "shape": {"preset": args.preset, "batch": args.batch,
                                                                  "seq_length": args.seq_len},
                            "warmup_steps": args.warmup, "timed_steps": args.steps, "sides": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
