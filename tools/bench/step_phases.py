"""Where an SFT step's time goes: Keel against Hugging Face at its best, phase by phase.

The model, batch and optimizer of ``tools/bench/train_step.py`` (bench-34m with 13 layers, 8 x 256
random tokens, fp32, AdamW with clipping at 1.0). Both sides live in one process (HF best built
first), and their timed steps alternate (A B, B A, ...). Each phase is timed with
``time.perf_counter`` around the call that does it, with no profiler:

* HF best (``AdamW(fused=True)``), ``train_step.py``'s own step: ``zero_grad(set_to_none=True)``, the
  model's forward, its loss function, ``backward``, ``clip_grad_norm_``, ``optimizer.step``;
* Keel (``Trainer.train_step``): the runner's ``zero_grad`` (megatron's gradient buffers), megatron's
  ``forward_step`` (forward with the loss) and ``backward_step``, ``finalize_model_grads`` (the
  gradient reduction, and the scaling by 1 / tokens of the per-token loss), and the optimizer step,
  split into the gradient norm, the clipping scale and torch's fused AdamW.

The phases are for reading the gap, not a speed result: two sides in one process share one heap,
and ``train_step.py`` (each side alone in its processes) gives the ratio.

    python tools/bench/step_phases.py [--steps 8] [--out tools/bench/results/step_phases.json]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_step  # noqa: E402
from common import load_average, machine_busy, machine_info, versions, write_report  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "step_phases.json"
TIMES: dict[str, list[float]] = defaultdict(list)


def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        began = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMES[name].append(time.perf_counter() - began)

    return wrapper


def instrument_hf(step: Callable[[int], float], model: Any, optimizer: Any) -> Callable[[int], float]:
    """``train_step.py``'s own HF step, its calls timed where they are looked up: the optimizer's and the
    model's attributes, ``clip_grad_norm_`` in ``torch.nn.utils`` and ``Tensor.backward`` (which megatron's
    schedule does not call: it runs ``torch.autograd.backward``)."""
    optimizer.zero_grad = timed("hf/zero_grad", optimizer.zero_grad)
    model.forward = timed("hf/forward", model.forward)
    model.loss_function = timed("hf/loss", model.loss_function)
    torch.Tensor.backward = timed("hf/backward", torch.Tensor.backward)  # type: ignore[method-assign]
    torch.nn.utils.clip_grad_norm_ = timed("hf/clip_grad_norm", torch.nn.utils.clip_grad_norm_)
    optimizer.step = timed("hf/adamw", optimizer.step)
    return timed("hf/step", step)


def instrument_keel(trainer: Any) -> Callable[[int], Any]:
    from megatron.core.optimizer import clip_grads, optimizer
    from megatron.core.pipeline_parallel import schedules

    runner = trainer.model
    runner.zero_grad = timed("keel/zero_grad", runner.zero_grad)
    schedules.forward_step = timed("keel/forward", schedules.forward_step)
    schedules.backward_step = timed("keel/backward", schedules.backward_step)
    config = runner.transformer_config
    config.finalize_model_grads_func = timed("keel/finalize_model_grads", config.finalize_model_grads_func)
    runner.optimizer.get_grad_norm = timed("keel/grad_norm", runner.optimizer.get_grad_norm)
    optimizer.clip_grad_by_total_norm_fp32 = timed("keel/clip_scale", clip_grads.clip_grad_by_total_norm_fp32)
    for chained in runner.optimizer.chained_optimizers:
        chained.optimizer.step = timed("keel/adamw", chained.optimizer.step)
    return timed("keel/step", trainer.train_step)


def summary(steps: int) -> dict[str, dict[str, float]]:
    return {name: {"ms_per_step": round(sum(values) / steps * 1000, 2),
                   "median_ms": round(statistics.median(values) * 1000, 2), "calls_per_step": len(values) / steps}
            for name, values in sorted(TIMES.items())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    bench = train_step.parse_args([])
    from engine.config import TrainConfig, load_config
    from engine.models.presets import resolve_preset

    preset = resolve_preset(load_config(TrainConfig, None, train_step.keel_overrides(bench, "unused")).model)
    batch = torch.randint(0, preset.vocab_size, (bench.batch, bench.seq_len + 1),
                          generator=torch.Generator().manual_seed(bench.seed))
    load_before, began = load_average(), time.perf_counter()
    with contextlib.ExitStack() as stack:
        hf_best, (model, optimizer) = stack.enter_context(train_step.hf_side(bench, preset, batch, {}, True))()
        _, trainer = stack.enter_context(train_step.keel_side(bench, batch, {}))()
        sides = {"hf_best": instrument_hf(hf_best, model, optimizer), "keel": instrument_keel(trainer)}
        for n in range(args.warmup + args.steps):
            if n == args.warmup:
                TIMES.clear()
            order = ["keel", "hf_best"] if n % 2 else ["hf_best", "keel"]
            for name in order:
                sides[name](n)
    load_after = load_average()
    report = {
        "benchmark": "step_phases", "machine": machine_info(), "versions": versions(),
        "torch_threads": torch.get_num_threads(), "shape": train_step._shape(bench, preset),
        "batch": {"micro_batch_size": bench.batch, "seq_length": bench.seq_len},
        "warmup_steps": args.warmup, "timed_steps": args.steps, "mode": "one process, alternating steps",
        "load_average_1m": {"before": load_before["1m"], "after": load_after["1m"]},
        "machine_busy": machine_busy(load_before, load_after),
        "run_wall_s": round(time.perf_counter() - began, 1), "phases": summary(args.steps),
    }
    write_report(args.out, report)
    for name, row in report["phases"].items():
        print(f"{name:28s} {row['ms_per_step']:9.1f} ms/step  (median {row['median_ms']:.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
