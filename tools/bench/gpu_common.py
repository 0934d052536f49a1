"""Shared by the GPU benchmarks (``gpu_train_step.py``, ``gpu_generate.py``): the preset, a Hugging Face
Llama of the same shape, synchronised timing, and sides run one per fresh process where a failing side is a
result rather than the end of the run."""

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

from tools.bench.common import hf_llama_config, machine_info, print_result, run_child, write_report


def on_gpu() -> bool:
    return torch.cuda.is_available()


def sync() -> None:
    if on_gpu():
        torch.cuda.synchronize()


def preset_of(name: str) -> Any:
    from engine.config import ModelConfig
    from engine.models.presets import resolve_preset

    return resolve_preset(ModelConfig(preset=name))


def hf_llama(preset: Any, use_cache: bool) -> Any:
    """A randomly initialised ``LlamaForCausalLM`` of ``preset``'s shape: bf16 on a GPU, fp32 on CPU."""
    from transformers import LlamaForCausalLM

    config = hf_llama_config(preset, use_cache)
    device, dtype = ("cuda", torch.bfloat16) if on_gpu() else ("cpu", torch.float32)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype)


def run_sides(script: str, sides: list[str], passed: list[str], shown: tuple[str, ...],
              after: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """``python script *passed --side S --child OUT`` for each side in turn; ``{side: its JSON or {"error"}}``.
    ``after(results so far)`` runs after each side (the report is rewritten, so a run cut short keeps its sides)."""
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="keel-gpu-bench-") as tmp:
        for side in sides:
            out = Path(tmp) / f"{side}.json"
            cmd = [sys.executable, script, *passed, "--side", side, "--child", str(out)]
            try:
                results[side] = run_child(cmd, side, Path(script).resolve().parents[2], result_file=out)
            except SystemExit as failed:  # one side's failure is a result, not the end of the run
                results[side] = {"error": str(failed)[-3000:]}
            print(side, {k: results[side].get(k) for k in (*shown, "error")}, flush=True)
            after(results)
    return results


def timed(call: Callable[[int], Any], warmup: int, runs: int) -> tuple[list[Any], list[float]]:
    """``call(n)`` for n = 1 .. warmup + runs, synchronised; (every result, the seconds of the timed calls)."""
    results, times = [], []
    for n in range(1, warmup + runs + 1):
        sync()
        began = time.perf_counter()
        results.append(call(n))
        sync()
        if n > warmup:
            times.append(time.perf_counter() - began)
    return results, times


def summary(times: list[float]) -> dict[str, Any]:
    return {"seconds_median": round(statistics.median(times), 5), "seconds_all": [round(t, 5) for t in times],
            "max_memory_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_gpu() else None}


DRIVER_OPTIONS = ("out", "sides", "allow_cpu", "child", "side")  # the parent's; every other option goes to the sides


def bench_parser(doc: str, out: Path, sides: tuple[str, ...]) -> argparse.ArgumentParser:
    """The options every GPU benchmark has (the script adds its shape): the report, the sides, the preset, the
    seed, ``--allow-cpu``, and the hidden ``--side``/``--child`` a side's process is started with."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--out", type=Path, default=out)
    parser.add_argument("--sides", default=",".join(sides))
    parser.add_argument("--preset", default="bench-1b")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--allow-cpu", action="store_true", help="smoke-test the code path without a GPU")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # run one side, write its JSON here
    parser.add_argument("--side", default=None, help=argparse.SUPPRESS)
    return parser


def drive(name: str, args: argparse.Namespace, run_side: Callable[[argparse.Namespace], dict[str, Any]], script: str,
          shown: tuple[str, ...], report: dict[str, Any]) -> int:
    """A GPU benchmark's ``main``: one side when ``--child`` names its output, else every side in turn (each
    given every option but :data:`DRIVER_OPTIONS`) and the JSON report (``report`` plus device, machine and each
    side's result) at ``args.out``."""
    if args.child:
        write_report(Path(args.child), run_side(args))
        print_result({"side": args.side})
        return 0
    if not on_gpu() and not args.allow_cpu:
        print(f"{name}: no CUDA GPU here (use --allow-cpu to smoke-test the code path)", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name(0) if on_gpu() else "cpu (smoke test)"
    header = {"benchmark": name, "device": device, "machine": machine_info(), "torch": torch.__version__, **report}
    passed = [f"--{key.replace('_', '-')}={value}" for key, value in vars(args).items() if key not in DRIVER_OPTIONS]
    results = run_sides(script, args.sides.split(","), passed, shown,
                        lambda done: write_report(args.out, {**header, "sides": done}))
    return 1 if any("error" in result for result in results.values()) else 0
