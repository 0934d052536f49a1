"""What every benchmark script records and how it writes its report.

* :func:`machine_info`: platform, CPU model and counts, memory, torch's CPU backends;
* :func:`versions`: torch, megatron-core and transformers;
* :func:`load_average` / :func:`machine_busy`: the load on the machine before and after a run
  (a result is only trustworthy when nothing else ran);
* :func:`trim_memory`, :func:`rss_bytes`, :class:`RssSampler`, :func:`ru_maxrss_bytes`: process
  memory (torch keeps no CPU allocator statistics);
* :class:`Timer` / :func:`interleave`: wall and CPU times of timed calls, sides alternated A B, B A, ...;
* :func:`run_child`: one measurement in a fresh Python process, its ``RESULT {json}`` line,
  peak RSS and the load around it; :func:`side_processes`: one process per side and round,
  in A B C, C B A ... order;
* :func:`write_report`: the JSON report, written to a temporary file and renamed, so an
  interrupted run never leaves a half-written result behind.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch

MIB = 2**20
RESULT_PREFIX = "RESULT "
#: What :func:`run_child` adds to a child's report: the process's peak RSS, wall time and the load around it.
PROCESS_KEYS = ("peak_rss_mib", "wall_s", "load_before", "load_after")


def machine_info() -> dict[str, Any]:
    import psutil

    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(), "python": platform.python_version(), "cpu_model": cpu_model,
        "logical_cpus": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_total_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "mkl": torch.backends.mkl.is_available(),
    }


def versions() -> dict[str, str]:
    import megatron.core
    import transformers

    return {"torch": torch.__version__, "megatron_core": megatron.core.__version__,
            "transformers": transformers.__version__}


def write_report(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)


# ---------------------------------------------------------------------------- machine load


def load_average() -> dict[str, float]:
    """:func:`os.getloadavg` now, as ``{"1m", "5m", "15m"}``."""
    one, five, fifteen = os.getloadavg()
    return {"1m": round(one, 2), "5m": round(five, 2), "15m": round(fifteen, 2)}


def machine_busy(*loads: dict[str, float]) -> bool:
    """Whether any 1-minute load average in ``loads`` exceeds the CPU count (+0.5): other work shared the cores."""
    return max(load["1m"] for load in loads) > (os.cpu_count() or 1) + 0.5


# ---------------------------------------------------------------------------- memory


def trim_memory() -> None:
    """``gc.collect()`` then glibc's ``malloc_trim(0)``, so RSS reflects live memory."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def ru_maxrss_bytes() -> int:
    """This process's RSS high-water mark (``getrusage``; monotonic over the process's life)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


class RssSampler:
    """Samples this process's RSS on a background thread; ``peak`` is the maximum seen."""

    def __init__(self, interval_s: float):
        import psutil

        self.interval_s = interval_s
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._proc = psutil.Process()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, int(self._proc.memory_info().rss))
            time.sleep(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


# ---------------------------------------------------------------------------- timing


class Timer:
    """Wall and process-CPU times of one side's timed calls."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.warmup_times: list[float] = []

    def run(self, fn: Callable[[], Any], timed: bool = True) -> Any:
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if timed:
            self.times.append(wall)
            self.cpu_times.append(cpu)
        else:
            self.warmup_times.append(wall)
        return out

    def summary(self, units_per_call: int, unit: str, threads: int) -> dict[str, Any]:
        total = sum(self.times)
        return {
            f"{unit}_per_s": round(units_per_call * len(self.times) / total, 2),
            f"{unit}_per_s_median": round(units_per_call / statistics.median(self.times), 2),
            f"{unit}_per_s_best": round(units_per_call / min(self.times), 2),
            f"{unit}_per_cpu_s": round(units_per_call * len(self.times) / sum(self.cpu_times), 2),
            "time_s": {"mean": round(total / len(self.times), 4), "median": round(statistics.median(self.times), 4),
                       "min": round(min(self.times), 4), "max": round(max(self.times), 4)},
            "times_s": [round(t, 4) for t in self.times],
            "cpu_times_s": [round(t, 4) for t in self.cpu_times],
            "cpu_utilisation": round(sum(self.cpu_times) / total / threads, 3),
            "warmup_times_s": [round(t, 4) for t in self.warmup_times],
        }


def interleave(names: list[str], rounds: int, call: Callable[[str], None]) -> None:
    """A B, B A, A B, ...: ``rounds`` calls of each side."""
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            call(name)


# ---------------------------------------------------------------------------- child processes


def print_result(result: dict[str, Any]) -> None:
    """What a child process ends with: one ``RESULT {json}`` line on stdout, read by :func:`run_child`."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_child(cmd: list[str], label: str, cwd: Path, env: Optional[dict[str, str]] = None,
              result_file: Optional[Path] = None) -> dict[str, Any]:
    """Run ``cmd`` to completion; its last ``RESULT`` line (or, with ``result_file``, that file's JSON: what a
    multi-rank launch writes from one rank), plus ``peak_rss_mib`` (``ru_maxrss`` of the child, or of its largest
    descendant, via ``wait4``), ``wall_s`` and the load average before and after it. Exits with the output's tail
    on failure."""
    load_before = load_average()
    began = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, text=True,
                                env=env if env is not None else dict(os.environ))
        _, status, usage = os.wait4(proc.pid, 0)
        out.seek(0)
        text = out.read()
    lines = [line for line in text.splitlines() if line.startswith(RESULT_PREFIX)]
    found = result_file.is_file() if result_file is not None else bool(lines)
    if status != 0 or not found:
        raise SystemExit(f"{label} failed:\n{text[-4000:]}")
    result: dict[str, Any] = json.loads(result_file.read_text() if result_file is not None
                                        else lines[-1][len(RESULT_PREFIX):])
    result.update(peak_rss_mib=round(usage.ru_maxrss / 1024, 1), wall_s=round(time.perf_counter() - began, 1),
                  load_before=load_before, load_after=load_average())
    return result


def side_processes(sides: list[str], rounds: int, command: Callable[[str, Path], list[str]], cwd: Path,
                   log: Optional[Callable[[str, int, dict[str, Any]], None]] = None) -> list[tuple[str, int, dict[str, Any]]]:
    """Each side alone in a fresh process, ``rounds`` times, in A B C, C B A, ... order.

    ``command(side, out)`` is the child's command line; the child writes its JSON report to ``out``.
    Returns ``(side, round, report)`` in run order, each report with :func:`run_child`'s additions.
    """
    done: list[tuple[str, int, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory(prefix="keel-bench-sides-") as tmp:
        for r in range(rounds):
            for side in sides if r % 2 == 0 else sides[::-1]:
                out = Path(tmp) / f"{side}_{r}.json"
                report = run_child(command(side, out), f"{side} (round {r + 1})", cwd, result_file=out)
                done.append((side, r + 1, report))
                if log is not None:
                    log(side, r + 1, report)
    return done


def hf_llama_config(preset: Any, use_cache: bool) -> Any:
    """transformers' ``LlamaConfig`` (SDPA) of ``preset``'s shape."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=preset.vocab_size, hidden_size=preset.hidden_size, intermediate_size=preset.ffn_hidden_size,
        num_hidden_layers=preset.num_layers, num_attention_heads=preset.num_attention_heads,
        num_key_value_heads=preset.num_query_groups, max_position_embeddings=preset.max_sequence_length,
        rms_norm_eps=preset.layernorm_epsilon, rope_parameters={"rope_type": "default", "rope_theta": float(preset.rotary_base)},
        tie_word_embeddings=preset.tie_embeddings, attention_bias=False, mlp_bias=False, hidden_act="silu",
        use_cache=use_cache, attn_implementation="sdpa")


def hf_train_step(model: Any, optimizer: Any, tokens: torch.Tensor, labels: torch.Tensor,
                  forward: Optional[Callable[..., Any]] = None) -> Callable[[int], float]:
    """One HF training step as the benchmarks time it: zero-grad, forward (``forward``, e.g. a compiled
    model, or the model), the model's own loss on ``labels`` (already shifted), backward, clip at 1.0, update."""
    run = forward or model

    def step(n: int) -> float:
        optimizer.zero_grad(set_to_none=True)
        logits = run(input_ids=tokens).logits
        loss = model.loss_function(logits=logits, labels=None, shift_labels=labels, vocab_size=model.config.vocab_size)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return float(loss.detach())

    return step
