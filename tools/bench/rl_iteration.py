"""Where an online-RL iteration's time goes: bench-34m, GRPO, 4 gloo ranks.

    python tools/bench/rl_iteration.py [--iterations 4] [--out tools/bench/results/rl_iteration.json]

``keel train grpo`` trains bench-34m at TP2 x DP2 and generates at TP1 (4 replicas) from a
seeded policy (``model.init=layout_invariant``, ``reference=init``) with the built-in prompts
and the built-in program-checked reward (``synthetic_check``, in 2 worker processes). Each
iteration logs its phase times (refit, generate, score, log-prob recompute, train); this tool
reports their medians over the iterations after the first (which builds the plan and warms
caches), each phase's share of the iteration, and the load before and after.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tools.bench.common import load_average, machine_busy, machine_info, versions, write_report  # noqa: E402

PHASES = ("refit", "generate", "score", "logprobs", "train")


def run(args: argparse.Namespace, out: Path) -> None:
    overrides = [
        "model.preset=bench-34m", "model.init=layout_invariant", "reference=init", "data.tokenizer=builtin-sp",
        "parallel.tensor=2", f"rollout.generation_tensor={args.generation_tensor}",
        f"rollout.prompts_per_iteration={args.prompts}", f"rollout.samples_per_prompt={args.samples}",
        f"rollout.max_new_tokens={args.max_new_tokens}", "rollout.eval_prompts=null", "data.seq_length=256",
        "data.micro_batch_size=4", f"data.global_batch_size={args.prompts * args.samples // 2}",
        f"run.train_steps={args.iterations}", "checkpoint.save_interval=0", "checkpoint.resume=none",
        "logging.progress=false", "logging.tensorboard=false", f"run.output_dir={out}",
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
           "-m", "engine", "train", "grpo", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, text=True, capture_output=True,
                          env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                               "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise SystemExit(f"keel train grpo failed:\n{proc.stderr[-4000:]}")


def summarise(run_dir: Path) -> dict[str, object]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("split") == "train"][1:]  # the first iteration builds caches
    phases = {p: statistics.median(r[f"time_{p}"] for r in train) for p in PHASES}
    total = sum(phases.values())
    return {"iterations_measured": len(train), "median_seconds": {p: round(v, 4) for p, v in phases.items()},
            "iteration_seconds": round(total, 4), "share": {p: round(v / total, 4) for p, v in phases.items()},
            "targets": {"refit_share_below": 0.05, "score_share_below": 0.05},
            "refit_share_ok": phases["refit"] / total < 0.05, "score_share_ok": phases["score"] / total < 0.05}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--generation-tensor", type=int, default=1)
    parser.add_argument("--out", default=str(REPO / "tools/bench/results/rl_iteration.json"))
    args = parser.parse_args()
    before = load_average()
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        run(args, Path(tmp) / "run")
        summary = summarise(Path(tmp) / "run")
    after = load_average()
    report = {"benchmark": "rl_iteration", "model": "bench-34m", "layout": "training TP2xDP2, generation "
              f"TP{args.generation_tensor}", "settings": vars(args), **summary, "wall_s": round(time.perf_counter() - began, 1),
              "load_before": before, "load_after": after, "machine_busy": machine_busy(before),
              "machine": machine_info(), "versions": versions()}
    write_report(Path(args.out), report)
    print(json.dumps({k: report[k] for k in ("median_seconds", "share", "iteration_seconds", "machine_busy")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
