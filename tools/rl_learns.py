"""Does online RL raise correctness on prompts never seen in training? SFT -> GRPO / REINFORCE, judged on unseen ones.

    python tools/rl_learns.py --out runs/rl-learns [--algorithms grpo,reinforce] [--report tools/bench/results/rl_learns.json]

1. Data (:mod:`engine.data.synthetic`): right answers (each one checked with ``check_response``)
   to prompts of the ``train`` split of ``builtin:prompts``' task family (sums, products,
   reversals of made-up words; :func:`~engine.data.synthetic.sft_task`), as chat rows; half of
   them concise (``explained``: the working, then the answer), half ``rambling`` (fillers,
   the task restated, the working, the answer: 71-110 tokens). Judged on the prompts of
   ``builtin:prompts:eval``, whose words and number pairs never occur in training.
2. SFT of tiny-llama on those rows (``--nproc`` ranks), stopped while still partial (about 0.6 of
   greedy held-out answers right, about 0.2 of sampled ones), so the rewards of a prompt's samples differ.
3. For each algorithm, ``keel train <algorithm>`` from the SFT checkpoint (also the KL
   reference) with the program-checked reward ``synthetic_check`` on ``builtin:prompts``
   (train split), a rollout budget of ``--max-new-tokens`` (48) and greedy held-out evaluation
   in the run (validation rows of ``metrics.jsonl``, ``curves.png``) at iteration 0 (the SFT
   policy), every ``--eval-interval`` iterations and at the last one.
4. Judge: ``keel generate`` on the same unseen prompts with the SFT checkpoint and with each RL
   policy: ``--samples`` sampled answers per prompt at the rollout temperature and budget, each
   checked with ``check_response``; greedy correctness is the run's own evaluation.
   ``passes``: sampled correctness rose by at least ``--bar`` (0.15).

Measured with the defaults (tools/bench/results/rl_learns.json, 2 cores, about 4 minutes in all):
sampled correctness 0.209 -> 0.409 (GRPO) and 0.421 (RLOO), about 60 s of RL each; with
``--seed 11`` 0.234 -> 0.485 and 0.489. PPO (``--algorithms ppo``, critic ``ppo.critic=init``: a
value head on the SFT trunk) from the same SFT checkpoint: 0.209 -> 0.409 in 339 s on shared cores
(tools/bench/results/rl_learns_ppo.json).

What RL learns here (measured, see the report's ``cut`` and ``finished_correct``): a rambling
answer does not finish within the 48-token budget, so it never reaches its final answer and
scores 0; about half of the SFT model's sampled answers ramble. GRPO and RLOO learn within
~60 iterations to answer concisely on every kind of prompt, unseen ones included, which is
where the rise of sampled correctness comes from; the share of right answers among those
that finish barely moves, and greedy answers (already concise) stay about level. With
concise-only SFT data the same recipes moved held-out correctness by at most a few points
(and learning rates >= 2e-4 lowered it): this tiny model does not get better at arithmetic
from a minute of RL.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.data.synthetic import (  # noqa: E402
    STYLES,
    check_response,
    compose_response,
    rollout_prompt_rows,
    sft_task,
    task_kind,
)
from tools.dpo_learns import train_sft, write_report  # noqa: E402
from tools.launch import keel  # noqa: E402

ALGORITHMS = ("grpo", "reinforce", "ppo")
EXTRA = {"ppo": ["ppo.critic=init"]}  # the critic: a value head on the SFT trunk (no reward model here)
SHARED = ["model.preset=tiny-llama", "data.tokenizer=builtin-sp", "logging.progress=false",
          "logging.tensorboard=false", "checkpoint.resume=none", "checkpoint.save_interval=0"]


def dump(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def sft_rows(num: int, seed: int, styles: list[str]) -> list[dict[str, Any]]:
    """``num`` chat rows: a train-split question and its right answer in one of ``styles`` (drawn per row)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num):
        task = sft_task(rng, "train")
        answer = compose_response(task, task.answer, True, rng.choice(styles), rng)
        if not check_response(task.question, answer):
            raise SystemExit(f"the checker rejects the SFT answer {answer!r} to {task.question!r}")
        rows.append({"messages": [{"role": "user", "content": task.question},
                                  {"role": "assistant", "content": answer}]})
    return rows


def write_data(out: Path, args: argparse.Namespace) -> None:
    """sft.jsonl and eval_sampled.jsonl: each unseen prompt ``--samples`` times, the prompts the runs evaluate greedily."""
    dump(out / "sft.jsonl", sft_rows(args.sft_rows, args.seed, args.styles.split(",")))
    unseen = rollout_prompt_rows(args.eval_prompts, args.seed, "eval")  # what the run evaluates (run.seed)
    dump(out / "eval_sampled.jsonl", [row for row in unseen for _ in range(args.samples)])


def share(flags: list[bool]) -> float:
    return round(sum(flags) / len(flags), 4) if flags else 0.0


def correctness(completions: Path) -> dict[str, Any]:
    """Share of right answers (overall, per task kind, among answers that finished) and of answers cut at the budget."""
    rows = [json.loads(line) for line in completions.read_text().splitlines()]
    right = [check_response(r["prompt"], r["completion"]) for r in rows]
    cut = [r["finish_reason"] == "length" for r in rows]
    kinds = [task_kind(r["prompt"]) for r in rows]
    return {"correct": share(right), "answers": len(rows), "cut": share(cut),
            "finished_correct": share([ok for ok, c in zip(right, cut, strict=True) if not c]),
            "per_kind": {kind: share([ok for ok, k in zip(right, kinds, strict=True) if k == kind])
                         for kind in sorted(set(kinds))}}


def judge(out: Path, checkpoint: Path, name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Held-out correctness of ``checkpoint``'s sampled answers (rollout temperature and budget)."""
    output = out / f"answers_{name}_sampled.jsonl"
    keel(["generate", str(checkpoint), str(out / "eval_sampled.jsonl"), str(output), "--quiet",
          f"--temperature={args.temperature}", f"--max-new-tokens={args.max_new_tokens}", "--batch-size=64",
          f"--seed={args.seed}"])
    return correctness(output)


def rl_overrides(algorithm: str, args: argparse.Namespace) -> list[str]:
    """The recipe of ``keel train <algorithm>`` (everything but the paths)."""
    buffer = args.prompts_per_iteration * args.samples_per_prompt
    return [f"run.train_steps={args.iterations}", f"run.eval_interval={args.eval_interval}", "run.eval_at_start=true",
            f"rollout.prompts={args.rl_prompts}", f"rollout.prompts_per_iteration={args.prompts_per_iteration}",
            f"rollout.samples_per_prompt={args.samples_per_prompt}", f"rollout.max_new_tokens={args.max_new_tokens}",
            f"rollout.temperature={args.temperature}", f"rollout.eval_num_prompts={args.eval_prompts}",
            f"data.seq_length={args.max_new_tokens + 32}", f"data.micro_batch_size={min(buffer, 32)}",
            f"data.global_batch_size={buffer}", f"optimizer.lr={args.lr}", "scheduler.type=constant",
            "scheduler.warmup_steps=0", "reward_workers=0", f"{algorithm}.kl_coef={args.kl_coef}",
            f"run.seed={args.seed}", *EXTRA.get(algorithm, [])]


def metric_rows(run: Path, split: str) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("split") == split]


def curves(run: Path, every: int) -> dict[str, list[list[float]]]:
    """The run's greedy held-out reward per evaluation, and its rollouts' reward and length averaged per ``every``."""
    train = metric_rows(run, "train")

    def windowed(name: str) -> list[list[float]]:
        points = []
        for first in range(0, len(train), every):
            window = train[first: first + every]
            points.append([window[-1]["step"], round(sum(r[name] for r in window) / len(window), 4)])
        return points

    return {"held_out_greedy": [[r["step"], round(r["reward_synthetic_check"], 4)]
                                for r in metric_rows(run, "validation")],
            "rollout_reward": windowed("reward"), "rollout_length": windowed("response_length")}


def run_algorithm(out: Path, sft: Path, algorithm: str, before: dict[str, Any],
                  args: argparse.Namespace) -> dict[str, Any]:
    """``keel train <algorithm>`` from ``sft``, then the judge. Greedy correctness is the run's own held-out
    evaluation (same prompts) at iteration 0 (the SFT policy) and at the last iteration."""
    began = time.perf_counter()
    run = out / algorithm
    shutil.rmtree(run, ignore_errors=True)  # a fresh run appends to an old metrics.jsonl and keeps old checkpoints
    keel(["train", algorithm, *SHARED, *rl_overrides(algorithm, args), f"checkpoint.load={sft}", f"reference={sft}",
          f"run.output_dir={run}"])
    trained = time.perf_counter() - began
    sampled = judge(out, run / "checkpoints", algorithm, args)
    curve = curves(run, args.eval_interval)
    greedy = {"before": curve["held_out_greedy"][0][1], "after": curve["held_out_greedy"][-1][1]}
    rise = {"sampled": round(sampled["correct"] - before["correct"], 4),
            "greedy": round(greedy["after"] - greedy["before"], 4)}
    return {"sampled": sampled, "greedy": greedy, "rise": rise, "passes": rise["sampled"] >= args.bar, **curve,
            "curves_png": str(run / "curves.png"), "train_s": round(trained, 1),
            "wall_s": round(time.perf_counter() - began, 1)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/rl-learns")
    parser.add_argument("--report", default=None, help="also write the JSON report here")
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS), help="comma-separated: grpo, reinforce, ppo")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--styles", default="explained,rambling",
                        help=f"SFT answers' styles, one drawn per row (comma-separated from {', '.join(STYLES)})")
    parser.add_argument("--sft-rows", type=int, default=20000)
    parser.add_argument("--sft-steps", type=int, default=1600, help="SFT steps of 32 rows (partial training)")
    parser.add_argument("--sft-checkpoint", default=None, help="start from this SFT checkpoint (no SFT run)")
    parser.add_argument("--nproc", type=int, default=2, help="ranks of the SFT run (1: leave a core free)")
    parser.add_argument("--eval-prompts", type=int, default=200, help="unseen prompts judged")
    parser.add_argument("--samples", type=int, default=4, help="sampled answers per unseen prompt")
    parser.add_argument("--rl-prompts", default="builtin:prompts", help="rollout prompts (default: train split)")
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--eval-interval", type=int, default=20)
    parser.add_argument("--prompts-per-iteration", type=int, default=16)
    parser.add_argument("--samples-per-prompt", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--kl-coef", type=float, default=0.05)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=48, help="rollout (and judge) budget")
    parser.add_argument("--bar", type=float, default=0.15, help="the rise of sampled correctness that passes")
    args = parser.parse_args(argv)
    unknown = set(args.algorithms.split(",")) - set(ALGORITHMS)
    if unknown:
        parser.error(f"--algorithms: unknown {', '.join(sorted(unknown))}; choose from {', '.join(ALGORITHMS)}")
    if args.iterations % args.eval_interval:
        parser.error("--iterations must be a multiple of --eval-interval (the last iteration is judged greedily)")
    if set(args.styles.split(",")) - set(STYLES):
        parser.error(f"--styles: choose from {', '.join(STYLES)}")
    return args


def main() -> int:
    args = parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    write_data(out, args)
    if args.sft_checkpoint:
        sft = Path(args.sft_checkpoint).resolve()
    else:
        shutil.rmtree(out / "sft", ignore_errors=True)
        sft = train_sft(out, out / "sft.jsonl", args.sft_steps, args.nproc, ("data.seq_length=128",))
    report: dict[str, Any] = {"sft_s": round(time.perf_counter() - began, 1)}
    report["sampled_before_rl"] = judge(out, sft, "sft", args)
    for algorithm in args.algorithms.split(","):
        report[algorithm] = run_algorithm(out, sft, algorithm, report["sampled_before_rl"], args)
    report["passes"] = all(report[a]["passes"] for a in args.algorithms.split(","))
    write_report(report, args, began)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
