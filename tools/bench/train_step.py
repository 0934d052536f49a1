"""Benchmark Keel's SFT training step against Hugging Face ``LlamaForCausalLM``.

One process, CPU, fp32, TP1. Both sides train a Llama of identical shape (default: the
``bench-34m`` preset with ``model.num_layers=13`` -> 49.3M parameters, untied, vocab
8192) on the *same* random token batch (default 8 x 256), with AdamW at the same
hyper-parameters (lr 3e-4 constant, betas 0.9/0.95, eps 1e-8, no weight decay) and
global-norm gradient clipping at 1.0, under the same number of torch threads.

* Keel: ``Trainer(config, SFTStep(), parallel).train_step(n)`` in a 1-rank gloo world
  (``tests.helpers.single_process_parallel``): megatron GPTModel (local layer spec,
  SDPA attention), megatron DDP grad buffers, megatron's forward/backward schedule,
  megatron optimizer (torch AdamW underneath) with its grad-norm clipping. The
  trainer's data pull is replaced by the fixed batch ``tokens = x[:, :-1]``,
  ``labels = x[:, 1:]``, ``loss_mask = 1``.
* HF: ``transformers`` LlamaForCausalLM (``attn_implementation="sdpa"``), the model's
  own ``loss_function`` with ``shift_labels=labels`` (so exactly the same targets),
  ``clip_grad_norm_(1.0)``, ``torch.optim.AdamW``, as two sides measured in the same run:

  * ``hf_default``: ``AdamW`` as constructed by default (on CPU torch's per-tensor loop);
  * ``hf_best``: ``AdamW(fused=True)``, the kernel Keel's optimizer runs, and freed host
    memory kept in the process as Keel's CPU layer keeps it
    (``engine/parallel/host_memory.py``; ``hf_default`` has glibc's defaults). The batch has no
    padding, so no side gets an attention mask, and length grouping has nothing to group.
    The bar (Keel >= 1.0x) is against ``hf_best``.

Timing (``--mode processes``, the default): each side runs alone in a fresh Python
process, ``--rounds`` processes per side in A B C, C B A, ... order, so drift and other
load hit all sides alike; each process builds its side, runs ``--warmup`` untimed steps
plus one memory step, then ``--steps`` timed steps, and the step times of all its
processes are pooled. A user trains one model per process: when two sides share one
process they also share glibc's heap, and what one frees the other reuses, so each
side's page faults and step time depend on the other side (measured: in one process
with ``hf_best`` built first, Keel's steps took 20k-60k minor page faults and HF's none;
each alone, HF's took 70k-80k). ``--mode interleaved`` builds all sides in one process
(in ``--order``, HF first, before Keel's CPU layer patches ``torch.cuda``/tensor
factories process-wide) and alternates their timed steps (A B, B A, ...);
``--mode sequential`` runs them one after the other in one process. A step is timed whole with ``time.perf_counter``: zero-grad, forward, loss,
backward, clip, optimizer update. tokens/s = tokens per step x timed steps / sum of
step times; process CPU time per step is recorded too (``cpu_utilisation`` well below
1, or ``machine_busy``: load average above the CPU count, means other processes shared
the cores and wall times are inflated, and not alike for both sides). The best (shortest)
step of each side is reported too: on a busy machine it is the closest to an undisturbed
step. With ``--threads 1`` ``tokens_per_cpu_s`` (tokens / process CPU seconds) is a
comparison that other load barely moves.

Memory (torch keeps no CPU allocator statistics): per side, in build order, before any
timed step. ``gc.collect()`` + glibc ``malloc_trim(0)``, then the process RSS
(``psutil``) is the baseline; the model, optimizer (and for Keel the trainer) are built
(the imports happen before the baseline); after the warm-up one more step runs with a
background thread sampling RSS every ``--rss-interval-ms``. ``peak_rss_delta_mib`` is
that sampled maximum minus the baseline (parameters + gradients + optimizer state +
activations + glibc's cached free memory), ``steady_rss_delta_mib`` the RSS after the
step minus the baseline, ``ru_maxrss_mib`` the process-wide ``getrusage`` high-water mark
then (monotonic: for the second side an upper bound only).

    python tools/bench/train_step.py [--out tools/bench/results/train_step.json]
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tools.bench.common import (  # noqa: E402
    MIB,
    PROCESS_KEYS,
    RssSampler,
    hf_llama_config,
    hf_train_step,
    machine_info,
    rss_bytes,
    ru_maxrss_bytes,
    side_processes,
    trim_memory,
    versions,
    write_report,
)

logger = logging.getLogger("bench.train_step")
DEFAULT_OUT = REPO / "tools/bench/results/train_step.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON file to write")
    parser.add_argument("--preset", default="bench-34m", help="Keel model preset")
    parser.add_argument("--model-override", action="append", default=None, metavar="KEY=VALUE",
                        help="model.* shape overrides (repeatable; default num_layers=13 -> ~50M parameters)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--order", default="hf_default,hf_best,keel",
                        help="sides, comma-separated, in build (and memory-measure) order, from hf_default, hf_best "
                             "and keel; HF first keeps it clear of Keel's CPU patches")
    parser.add_argument("--mode", default="processes", choices=["processes", "interleaved", "sequential"],
                        help="processes: each side in its own fresh process, --rounds times, in A B C, C B A order; "
                             "interleaved: all sides in one process, steps alternated; sequential: one process, one "
                             "side after the other")
    parser.add_argument("--rounds", type=int, default=2, help="--mode processes: processes per side")
    parser.add_argument("--rss-interval-ms", type=float, default=2.0)
    parser.add_argument("--profile", type=Path, default=None,
                        help="also run torch.profiler over 2 extra steps per side and write op tables here")
    args = parser.parse_args(argv)
    if args.model_override is None:
        args.model_override = ["num_layers=13"]
    return args


# ---------------------------------------------------------------------------- timing

Builder = Callable[[], tuple[Callable[[int], float], Any]]


class Side:
    """One framework under test: its step function, memory figures, step times and losses."""

    def __init__(self, name: str, info: dict[str, Any]):
        self.name = name
        self.info = info
        self.step: Callable[[int], float] | None = None
        self.keep: Any = None
        self.next_step = 1
        self.memory: dict[str, float] = {}
        self.build_s = 0.0
        self.warmup_times: list[float] = []
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.page_faults: list[int] = []
        self.losses: list[float] = []

    def run(self, timed: bool) -> float:
        assert self.step is not None
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        wall, cpu = time.perf_counter(), time.process_time()
        loss = self.step(self.next_step)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        self.next_step += 1
        self.losses.append(loss)
        (self.times if timed else self.warmup_times).append(wall)
        if timed:
            self.cpu_times.append(cpu)
            self.page_faults.append(faults)
        logger.info("%s step %d%s: %.3f s (cpu %.2f s, %d page faults), loss %.4f", self.name, self.next_step - 1,
                    "" if timed else " (warm-up)", wall, cpu, faults, loss)
        return wall

    def build_and_measure(self, build: Builder, args: argparse.Namespace) -> None:
        """Build, warm up, then one RSS-sampled step: fills ``self.memory``."""
        trim_memory()
        baseline = rss_bytes()
        began = time.perf_counter()
        self.step, self.keep = build()
        self.build_s = time.perf_counter() - began
        trim_memory()
        after_build = rss_bytes()
        for _ in range(args.warmup):
            self.run(timed=False)
        with RssSampler(args.rss_interval_ms / 1000.0) as sampler:
            self.run(timed=False)
        steady = rss_bytes()
        self.memory = {
            "baseline_rss_mib": round(baseline / MIB, 1),
            "after_build_rss_delta_mib": round((after_build - baseline) / MIB, 1),
            "peak_rss_delta_mib": round((sampler.peak - baseline) / MIB, 1),
            "steady_rss_delta_mib": round((steady - baseline) / MIB, 1),
            "ru_maxrss_mib": round(ru_maxrss_bytes() / MIB, 1),
        }

    def absorb(self, child: dict[str, Any], process: dict[str, Any]) -> None:
        """Add one child process's report of this side (``--mode processes``); memory is the first process's."""
        self.times += child["step_times_s"]
        self.cpu_times += child["step_cpu_times_s"]
        self.page_faults += child["step_minor_page_faults"]
        self.warmup_times += child["warmup_step_times_s"]
        if not self.memory:
            self.memory, self.build_s, self.losses = child["memory"], child["build_s"], child["losses"]
            self.info.update({k: v for k, v in child.items() if k not in _MEASURED})
        self.info.setdefault("processes", []).append({"tokens_per_s": child["tokens_per_s"], **process})

    def release(self) -> None:
        self.step = self.keep = None
        trim_memory()

    def report(self, tokens_per_step: int, threads: int) -> dict[str, Any]:
        total = sum(self.times)
        return {
            "tokens_per_s": round(tokens_per_step * len(self.times) / total, 2),
            "tokens_per_s_median_step": round(tokens_per_step / statistics.median(self.times), 2),
            "tokens_per_s_best_step": round(tokens_per_step / min(self.times), 2),
            "step_time_s": {"mean": round(total / len(self.times), 4),
                            "median": round(statistics.median(self.times), 4),
                            "min": round(min(self.times), 4), "max": round(max(self.times), 4)},
            "step_times_s": [round(t, 4) for t in self.times],
            "step_cpu_times_s": [round(t, 4) for t in self.cpu_times],
            "step_minor_page_faults": self.page_faults,
            "cpu_utilisation": round(sum(self.cpu_times) / total / threads, 3),
            "tokens_per_cpu_s": round(tokens_per_step * len(self.times) / sum(self.cpu_times), 2),
            "warmup_step_times_s": [round(t, 4) for t in self.warmup_times],
            "build_s": round(self.build_s, 3),
            "memory": self.memory,
            "losses": [round(x, 4) for x in self.losses],
            **self.info,
        }


def _profile(side: Side, out_dir: Path) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        side.run(timed=False)
        side.run(timed=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{side.name}_ops.txt"
    path.write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=80) + "\n" +
                    prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=60))
    prof.export_chrome_trace(str(out_dir / f"{side.name}_trace.json"))
    return str(path)


def run_sequential(makers: dict[str, Callable[[], Any]], sides: dict[str, Side], args: argparse.Namespace) -> None:
    """Each side alone: build, warm up, RSS-sampled step, timed steps, tear down; then the next."""
    for name, make in makers.items():
        side = sides[name]
        with make() as build:
            side.build_and_measure(build, args)
            for _ in range(args.steps):
                side.run(timed=True)
            if args.profile is not None:
                side.info["profile_table"] = _profile(side, args.profile)
            side.release()


# Report keys a child process writes per side that are measurements, not side information.
_MEASURED = {"tokens_per_s", "tokens_per_s_median_step", "tokens_per_s_best_step", "step_time_s", "step_times_s",
             "step_cpu_times_s", "step_minor_page_faults", "cpu_utilisation", "tokens_per_cpu_s",
             "warmup_step_times_s", "build_s", "memory", "losses"}


def _child_argv(args: argparse.Namespace) -> list[str]:
    argv = ["--preset", args.preset, "--batch", str(args.batch), "--seq-len", str(args.seq_len),
            "--warmup", str(args.warmup), "--steps", str(args.steps), "--lr", str(args.lr), "--seed", str(args.seed),
            "--rss-interval-ms", str(args.rss_interval_ms), "--mode", "sequential"]
    for override in args.model_override:
        argv += ["--model-override", override]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    return argv


def run_processes(sides: dict[str, Side], args: argparse.Namespace) -> None:
    """Each side alone in a fresh Python process, ``--rounds`` processes per side in A B C, C B A ... order.

    A user trains one model per process. Sharing one process, the sides also share glibc's heap: what one side
    frees, the other reuses, so each side's page faults, and with them its step time, depend on the other side.
    """
    def command(name: str, out: Path) -> list[str]:
        cmd = [sys.executable, str(Path(__file__).resolve()), *_child_argv(args), "--order", name, "--out", str(out)]
        if args.profile is not None and not sides[name].times:
            cmd += ["--profile", str(args.profile)]
        return cmd

    def absorb(name: str, r: int, result: dict[str, Any]) -> None:
        sides[name].absorb(result[name], {"round": r, **{k: result[k] for k in PROCESS_KEYS}})
        logger.info("%s round %d: %.1f tokens/s", name, r, result[name]["tokens_per_s"])

    side_processes(list(sides), args.rounds, command, REPO, absorb)


def run_interleaved(makers: dict[str, Callable[[], Any]], sides: dict[str, Side], args: argparse.Namespace) -> None:
    """Build and measure memory side by side in order, then time the steps alternately (AB BA AB ...).

    Alternating cancels drift and other load on the machine; both models stay alive together.
    """
    names = list(makers)
    with ExitStack() as stack:
        for name in names:
            sides[name].build_and_measure(stack.enter_context(makers[name]()), args)
        for r in range(args.steps):
            for name in names if r % 2 == 0 else names[::-1]:
                sides[name].run(timed=True)
        if args.profile is not None:
            for name in names:
                sides[name].info["profile_table"] = _profile(sides[name], args.profile)
        for name in names[::-1]:
            sides[name].release()


# ---------------------------------------------------------------------------- the two sides


def keel_overrides(args: argparse.Namespace, run_dir: str) -> list[str]:
    return [
        f"model.preset={args.preset}", *[f"model.{o}" for o in args.model_override],
        f"data.seq_length={args.seq_len}", f"data.micro_batch_size={args.batch}",
        f"data.global_batch_size={args.batch}", "data.loss_on=all", "data.num_samples=64",
        f"run.seed={args.seed}", f"run.train_steps={args.warmup + args.steps + 8}", f"run.output_dir={run_dir}",
        "logging.tensorboard=false", "logging.progress=false",
        "checkpoint.save_interval=0", "checkpoint.resume=none",
        f"optimizer.lr={args.lr}", "optimizer.min_lr=0.0", "optimizer.weight_decay=0.0",
        "optimizer.beta1=0.9", "optimizer.beta2=0.95", "optimizer.eps=1.0e-8", "optimizer.clip_grad=1.0",
        "scheduler.type=constant", "scheduler.warmup_steps=0", "precision.dtype=fp32",
    ]


@contextmanager
def keel_side(args: argparse.Namespace, batch: torch.Tensor, info: dict[str, Any]) -> Iterator[
        Callable[[], tuple[Callable[[int], float], Any]]]:
    # Import what Trainer builds from now, so ~220 MiB of megatron modules stay out of the RSS deltas.
    import megatron.core.distributed  # noqa: F401
    import megatron.core.models.gpt  # noqa: F401
    import megatron.core.optimizer  # noqa: F401
    import megatron.core.pipeline_parallel  # noqa: F401

    from engine.algorithms.sft import SFTStep
    from engine.config import TrainConfig, load_config
    from engine.parallel import cpu, host_memory
    from engine.trainer import Trainer
    from tests.helpers import single_process_parallel

    with tempfile.TemporaryDirectory(prefix="keel-bench-") as run_dir:
        config = load_config(TrainConfig, None, keel_overrides(args, run_dir))
        config.validate(1)
        micro = {"tokens": batch[:, :-1].contiguous(), "labels": batch[:, 1:].contiguous(),
                 "loss_mask": torch.ones(batch.shape[0], batch.shape[1] - 1, dtype=torch.float)}
        with single_process_parallel(seed=args.seed) as parallel:

            def build() -> tuple[Callable[[int], float], Any]:
                trainer = Trainer(config, SFTStep(), parallel)
                trainer._next_micro_batches = lambda sampler, dataset: [micro]  # type: ignore[method-assign]
                info["parameters"] = sum(p.numel() for c in trainer.model.chunks for p in c.parameters())
                info["host_memory_retained"] = host_memory._applied
                info["config_overrides"] = keel_overrides(args, "<tmp>")

                def step(n: int) -> float:
                    return float(trainer.train_step(n)["lm_loss"])

                return step, trainer

            yield build
        cpu.deactivate()


HF_SIDES = {"hf_default": False, "hf_best": True}  # side -> AdamW(fused=...)


@contextmanager
def hf_side(args: argparse.Namespace, preset: Any, batch: torch.Tensor, info: dict[str, Any], fused: bool) -> Iterator[
        Callable[[], tuple[Callable[[int], float], Any]]]:
    """HF at its default (torch's per-tensor AdamW loop, glibc's default allocator settings) or at its best
    (``AdamW(fused=True)``, Keel's kernel, and freed host memory retained as Keel's CPU layer does).

    The batch has no padding, so neither side passes an attention mask.
    """
    from transformers import LlamaForCausalLM

    from engine.parallel.host_memory import retain_freed_memory

    info["host_memory_retained"] = retain_freed_memory() if fused else False

    config = hf_llama_config(preset, use_cache=False)
    tokens, labels = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    def build() -> tuple[Callable[[int], float], Any]:
        torch.manual_seed(args.seed)
        model = LlamaForCausalLM(config).float().train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                                      fused=fused or None)
        info["parameters"] = sum(p.numel() for p in model.parameters())
        info["attn_implementation"] = model.config._attn_implementation
        info["adamw_fused"] = fused
        return hf_train_step(model, optimizer, tokens, labels), (model, optimizer)

    yield build


def _shape(args: argparse.Namespace, preset: Any) -> dict[str, Any]:
    return {
        "preset": args.preset, "overrides": args.model_override, "num_layers": preset.num_layers,
        "hidden_size": preset.hidden_size, "ffn_hidden_size": preset.ffn_hidden_size,
        "num_attention_heads": preset.num_attention_heads, "num_query_groups": preset.num_query_groups,
        "vocab_size": preset.vocab_size, "tie_embeddings": preset.tie_embeddings,
        "rms_norm_eps": preset.layernorm_epsilon, "rope_theta": preset.rotary_base,
        "parameter_count": preset.parameter_count(),
    }


def _methods(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "timing_method": (
            "wall clock (time.perf_counter) of whole steps after the warm-up; tokens_per_s = tokens per step x "
            "timed steps / sum of step times. processes: each side alone in a fresh process, --rounds processes "
            "per side in A B C, C B A order, step times pooled (per-process rates under 'processes'); "
            "interleaved: all sides in one process (sharing its heap), timed steps alternate AB BA AB ...; "
            "sequential: one process, each side after the other. "
            "cpu_utilisation = process CPU time / wall / threads (well below 1 means the machine was busy)"
        ),
        "memory_method": (
            "per side, in order, before any timed step: gc.collect + malloc_trim(0), baseline = psutil RSS before "
            "building the model (imports done before); after the warm-up one more step with a thread sampling RSS "
            f"every {args.rss_interval_ms} ms; "
            "peak_rss_delta = sampled max - baseline, steady_rss_delta = RSS after that step - baseline; "
            "ru_maxrss = getrusage high-water mark of the whole process after that step (monotonic, so for the "
            "second side of one process an upper bound only). RSS includes glibc's cached free memory, as a user would see it"
        ),
    }


def _results(results: dict[str, Any]) -> dict[str, Any]:
    """Keel over each HF side present (``keel_over_hf_best`` is the one with a bar: >= 1.0)."""
    out: dict[str, Any] = dict(results)
    if "keel" not in results:
        return out
    keel = results["keel"]
    for name in (n for n in HF_SIDES if n in results):
        hf = results[name]
        out[f"keel_over_{name}"] = {
            "tokens_per_s": round(keel["tokens_per_s"] / hf["tokens_per_s"], 3),
            "tokens_per_s_median_step": round(keel["tokens_per_s_median_step"] / hf["tokens_per_s_median_step"], 3),
            "tokens_per_s_best_step": round(keel["tokens_per_s_best_step"] / hf["tokens_per_s_best_step"], 3),
            "tokens_per_cpu_s": round(keel["tokens_per_cpu_s"] / hf["tokens_per_cpu_s"], 3),
            "peak_rss_delta": round(keel["memory"]["peak_rss_delta_mib"] / max(hf["memory"]["peak_rss_delta_mib"], 1e-9), 3),
        }
    return out


def _write(args: argparse.Namespace, report: dict[str, Any], results: dict[str, Any]) -> None:
    counts = {name: side["parameters"] for name, side in results.items()}
    if len(set(counts.values()) | {report["shape"]["parameter_count"]}) != 1:
        logger.warning("parameter counts differ: preset %d, %s", report["shape"]["parameter_count"], counts)
    write_report(args.out, report)
    for name in (n for n in HF_SIDES if n in results and "keel" in results):
        logger.info("tokens/s: %s %.1f, keel %.1f (keel/%s %.3f); peak RSS delta MiB: %s %.0f, keel %.0f", name,
                    results[name]["tokens_per_s"], results["keel"]["tokens_per_s"], name,
                    report[f"keel_over_{name}"]["tokens_per_s"], name, results[name]["memory"]["peak_rss_delta_mib"],
                    results["keel"]["memory"]["peak_rss_delta_mib"])
    logger.info("-> %s", args.out)


def run_sides(sides: dict[str, Side], args: argparse.Namespace, preset: Any, batch: torch.Tensor) -> None:
    """Time every side the way ``--mode`` says; fills the :class:`Side` objects."""
    makers: dict[str, Callable[[], Any]] = {}
    for name, side in sides.items():
        if name not in ("keel", *HF_SIDES):
            raise SystemExit(f"--order: unknown side {name!r} (use keel, {', '.join(HF_SIDES)})")
        makers[name] = (partial(keel_side, args, batch, side.info) if name == "keel"
                        else partial(hf_side, args, preset, batch, side.info, HF_SIDES[name]))
    if args.mode == "processes":
        run_processes(sides, args)
    else:
        (run_interleaved if args.mode == "interleaved" else run_sequential)(makers, sides, args)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("engine", "megatron", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    from engine.config import TrainConfig, load_config
    from engine.models.presets import resolve_preset

    preset = resolve_preset(load_config(TrainConfig, None, keel_overrides(args, "unused")).model)
    generator = torch.Generator().manual_seed(args.seed)
    batch = torch.randint(0, preset.vocab_size, (args.batch, args.seq_len + 1), generator=generator)
    tokens_per_step = args.batch * args.seq_len

    sides = {name: Side(name, {}) for name in args.order.split(",")}
    load_before = os.getloadavg()
    began = time.perf_counter()
    run_sides(sides, args, preset, batch)
    wall = time.perf_counter() - began
    load_after = os.getloadavg()
    if torch.get_num_threads() != threads:
        raise RuntimeError(f"torch threads changed from {threads} to {torch.get_num_threads()} during the run")
    results = {name: side.report(tokens_per_step, threads) for name, side in sides.items()}

    report = {
        "benchmark": "train_step",
        "machine": machine_info(),
        "versions": versions(),
        "torch_threads": threads,
        "dtype": "float32",
        "device": "cpu",
        "layout": "TP1 PP1 DP1 (1 process, gloo)",
        "shape": _shape(args, preset),
        "batch": {"micro_batch_size": args.batch, "seq_length": args.seq_len, "tokens_per_step": tokens_per_step,
                  "data": "uniform random token ids, identical for both; labels = next token, loss on all"},
        "optimizer": {"type": "AdamW (keel: megatron's optimizer over torch's fused AdamW; hf_default: torch's "
                              "default per-tensor loop; hf_best: fused=True)",
 "lr": args.lr, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0,
                      "clip_grad": 1.0},
        "host_memory": "keel and hf_best keep freed host memory in the process (glibc mmap threshold 1 GiB, trim "
                       "threshold 2 GiB: engine/parallel/host_memory.py), hf_default runs with glibc's defaults; "
                       "each side's host_memory_retained says what it ran with",
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "order": args.order,
        "mode": args.mode,
        "rounds": args.rounds if args.mode == "processes" else None,
        **_methods(args),
        "load_average_1m": {"before": round(load_before[0], 2), "after": round(load_after[0], 2)},
        "machine_busy": max(load_before[0], load_after[0]) > (os.cpu_count() or 1) + 0.5,
        "run_wall_s": round(wall, 1),
        **_results(results),
    }
    _write(args, report, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
