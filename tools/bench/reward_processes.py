"""``tools/bench/reward.py --mode processes`` (the default): each side alone in its own process.

Every side (``hf_default``, ``hf_best``, ``keel``) runs ``--rounds`` times in a fresh Python
process (``reward.py --mode one-process --sides <side>``), in A B C, C B A, ... order, so drift
and other load hit all sides alike. Sides that share a process share glibc's heap, and what one
frees the other reuses, so each one's page faults and times would depend on the others (the SFT
benchmark measured it). Every child also builds Keel's trainer, for the data set and the
encoder that all sides use, but times only its own side.

The report pools each side's timed calls over its processes: a rate is units x calls / the sum
of their wall times. ``processes`` lists every child with its own rates and the load around it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from tools.bench.common import PROCESS_KEYS, Timer, side_processes, write_report

logger = logging.getLogger("bench.reward")
SCRIPT = Path(__file__).resolve().parent / "reward.py"
REPO = SCRIPT.parents[2]

TIMING_METHOD = (
    "each side alone in a fresh process (reward.py --mode one-process --sides <side>), --rounds processes per "
    "side in A B C, C B A order; every child builds Keel's trainer (data set and encoder for all sides) and "
    "times only its side: warm-up steps, timed training steps (wall clock per whole step: zero-grad, forward, "
    "loss, backward, clip, AdamW), the same for training on data, then one warm-up scoring call and the timed "
    "scoring calls (encoding + forward of all pairs). Timed calls are pooled per side over its processes: "
    "rate = units x calls / sum of times; cpu_utilisation = process CPU time / wall / threads. Freed host "
    "memory is kept in every child from the start (engine/parallel/host_memory.py, what Keel's CPU layer sets)"
)


def _child_argv(args: argparse.Namespace) -> list[str]:
    options = {"--preset": args.preset, "--batch": args.batch, "--seq-len": args.seq_len, "--warmup": args.warmup,
               "--steps": args.steps, "--data-global-batch": args.data_global_batch,
               "--data-micro-batch": args.data_micro_batch, "--pairs": args.pairs,
               "--score-micro-batch": args.score_micro_batch, "--score-repeats": args.score_repeats,
               "--lr": args.lr, "--seed": args.seed}
    argv = [item for key, value in options.items() for item in (key, str(value))]
    return argv + (["--threads", str(args.threads)] if args.threads else [])


def _pooled(parts: list[dict[str, Any]], units: int, unit: str, threads: int) -> dict[str, Any]:
    timer = Timer()
    for part in parts:
        timer.times += part["times_s"]
        timer.cpu_times += part["cpu_times_s"]
        timer.warmup_times += part["warmup_times_s"]
    return timer.summary(units, unit, threads)


def _pooled_on_data(parts: list[tuple[dict[str, Any], list[int]]]) -> dict[str, Any]:
    """``parts``: (side's on-data dict, real tokens per timed step) of each process."""
    tokens = sum(sum(steps) for _, steps in parts)
    times = [t for part, _ in parts for t in part["times_s"]]
    cpu = [t for part, _ in parts for t in part["cpu_times_s"]]
    first = parts[0][0]
    return {"real_tokens_per_s": round(tokens / sum(times), 2), "real_tokens_per_cpu_s": round(tokens / sum(cpu), 2),
            "positions_computed_per_step": first["positions_computed_per_step"], "times_s": times, "cpu_times_s": cpu,
            "warmup_times_s": [t for part, _ in parts for t in part["warmup_times_s"]], "losses": first["losses"]}


def _section(name: str, runs: list[tuple[str, int, dict[str, Any]]], threads: int) -> dict[str, Any]:
    from tools.bench.reward import NAMES, ratios

    template = dict(runs[0][2][name])
    for side in NAMES:
        template.pop(side, None)
    for key in [k for k in template if k.startswith("keel_over_")]:
        template.pop(key)
    sides: dict[str, Any] = {}
    for side in NAMES:
        mine = [report[name] for s, _, report in runs if s == side]
        if name == "training":
            sides[side] = {**_pooled([m[side] for m in mine], template["batch"]["tokens_per_step"], "tokens", threads),
                           "losses": mine[0][side]["losses"]}
        elif name == "scoring":
            sides[side] = _pooled([m[side] for m in mine], template["pairs"], "pairs", threads)
        else:
            sides[side] = _pooled_on_data([(m[side], m["real_tokens_per_step"]) for m in mine])
    keys = {"training": ("tokens_per_s", "tokens_per_s_best", "tokens_per_cpu_s"),
            "scoring": ("pairs_per_s", "pairs_per_s_best", "pairs_per_cpu_s"),
            "training_on_data": ("real_tokens_per_s", "real_tokens_per_cpu_s")}[name]
    return {**template, **sides, **ratios(sides, keys)}


def _process_row(side: str, r: int, report: dict[str, Any]) -> dict[str, Any]:
    return {"side": side, "round": r, "training_tokens_per_s": report["training"][side]["tokens_per_s"],
            "on_data_real_tokens_per_s": report["training_on_data"][side]["real_tokens_per_s"],
            "scoring_pairs_per_s": report["scoring"][side]["pairs_per_s"],
            **{key: report[key] for key in PROCESS_KEYS}}


def merge(runs: list[tuple[str, int, dict[str, Any]]], wall: float) -> dict[str, Any]:
    """One report from the children's (side, round, report), in run order."""
    first = runs[0][2]
    keel = next(report for side, _, report in runs if side == "keel")
    threads = first["torch_threads"]
    hf_info: dict[str, Any] = {}
    checks: dict[str, Any] = {}
    for _, _, report in runs:
        hf_info.update(report["hf_info"])
        for key, value in report["checks"].items():  # per-side dicts (output shapes) add up
            checks[key] = {**checks.get(key, {}), **value} if isinstance(value, dict) else value
    loads = [report[key]["1m"] for _, _, report in runs for key in ("load_before", "load_after")]
    report = {key: first[key] for key in ("benchmark", "machine", "versions", "torch_threads", "dtype", "device",
                                          "layout", "shape")}
    report.update(
        parameters={**keel["parameters"], "hf": next(r["parameters"]["hf"] for s, _, r in runs if s != "keel")},
        hf_info=hf_info, mode="processes", rounds=max(r for _, r, _ in runs),
        **{name: _section(name, runs, threads) for name in ("training", "training_on_data", "scoring")},
        checks=checks, timing_method=TIMING_METHOD, processes=[_process_row(*run) for run in runs],
        load_average_1m={"before": runs[0][2]["load_before"]["1m"], "after": runs[-1][2]["load_after"]["1m"]},
        machine_busy=max(loads) > (os.cpu_count() or 1) + 0.5, run_wall_s=round(wall, 1),
    )
    return report


def main_processes(args: argparse.Namespace) -> int:
    from tools.bench.reward import NAMES

    def command(side: str, out: Path) -> list[str]:
        return [sys.executable, str(SCRIPT), *_child_argv(args), "--mode", "one-process", "--sides", side,
                "--out", str(out)]

    def log(side: str, r: int, report: dict[str, Any]) -> None:
        row = _process_row(side, r, report)
        logger.info("%s round %d: training %.1f tokens/s, on data %.1f real tokens/s, scoring %.2f pairs/s", side, r,
                    row["training_tokens_per_s"], row["on_data_real_tokens_per_s"], row["scoring_pairs_per_s"])

    began = time.perf_counter()
    runs = side_processes(list(NAMES), args.rounds, command, REPO, log)
    report = merge(runs, time.perf_counter() - began)
    write_report(args.out, report)
    for peer in ("hf_default", "hf_best"):
        logger.info("keel over %s: training tokens/s %.3f, on data real tokens/s %.3f, scoring pairs/s %.3f", peer,
                    report["training"][f"keel_over_{peer}"]["tokens_per_s"],
                    report["training_on_data"][f"keel_over_{peer}"]["real_tokens_per_s"],
                    report["scoring"][f"keel_over_{peer}"]["pairs_per_s"])
    logger.info("-> %s", args.out)
    return 0
