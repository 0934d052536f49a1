"""Do the sample-and-train recipes learn, on prompts never seen in training? Iterative DPO and SteerLM 2.0.

    python tools/iterative_learns.py --recipe iterative-dpo --out runs/iterative-dpo-learns \
        [--report tools/bench/results/iterative_dpo_learns.json]
    python tools/iterative_learns.py --recipe steerlm2 --out runs/steerlm2-learns \
        [--report tools/bench/results/steerlm2_learns.json]

**iterative-dpo**: tiny-llama SFT on right answers to ``train``-split questions (sums, products,
reversals of made-up words; concise and rambling styles, ``tools/rl_learns.sft_rows``), stopped while
partial; then ``keel train iterative-dpo`` from it (``examples/iterative_dpo_tiny.yaml``): per
iteration ``--samples`` samples for each of ``--prompts`` train-split prompts, **scored by the
program check** ``synthetic_check`` (1 when the final answer is right; no reward model), best vs
worst, ties dropped, one DPO round. Judge: the run's held-out evaluation on ``--eval-prompts`` prompts
of the ``eval`` split (words and number pairs never in training), before the first iteration and after
each one, each answer checked by the program: the share of right answers among ``--eval-samples``
samples per prompt at the rollouts' temperature and top-p (the bar), and of the greedy answers
(reported: greedy correctness does not rise reliably at this size; see tests/engine/test_iterative_learns.py).

**steerlm2**: tiny-llama SteerLM SFT (nemotron template, attribute-conditioned; as
``tools/steerlm_learns.py``) and a tiny five-attribute regression reward model trained from scratch
on the built-in HelpSteer-style rows; then ``keel train steerlm2`` from the SFT model
(``examples/steerlm2_tiny.yaml``) with two targets: the attribute sets the data gives bare answers
(verbosity 0) and rambling ones (verbosity 4), each prompt conditioned on one of them. Judge: greedy
answers to every unseen prompt at both targets, before and after each iteration: the mean
``|target - RM-predicted|`` attribute gap (the same reward model that weighted the samples) and the
response length per target.

Per-iteration numbers go to the report (``<out>/report.json``, ``--report``) and a PNG of them into
the run directory (``<out>/<recipe>/iterations.png``). ``passes`` says whether the bar was reached.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.data.convert import attributes_to_steerlm  # noqa: E402
from engine.data.synthetic import helpsteer_rows, prompt_rows, rollout_prompt_rows  # noqa: E402
from engine.plots import write_curves  # noqa: E402
from tools.dpo_learns import train_sft, write_report  # noqa: E402
from tools.launch import keel  # noqa: E402
from tools.rl_learns import dump, metric_rows, sft_rows  # noqa: E402

SHARED = ["logging.progress=false", "logging.tensorboard=false", "checkpoint.resume=none"]


def per_iteration(run: Path, keys: tuple[str, ...], split: str) -> dict[str, list[list[float]]]:
    """``{key: [[iteration, value], ...]}`` from the run's metrics.jsonl rows of ``split``."""
    rows = metric_rows(run, split)
    return {key: [[r["step"], round(r[key], 4)] for r in rows if key in r] for key in keys}


def iterative_dpo(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    began = time.perf_counter()
    dump(out / "sft.jsonl", sft_rows(args.sft_rows, args.seed, args.styles.split(",")))
    dump(out / "eval_prompts.jsonl", rollout_prompt_rows(args.eval_prompts, args.seed + 1, "eval"))
    sft = Path(args.sft_checkpoint).resolve() if args.sft_checkpoint else \
        train_sft(out, out / "sft.jsonl", args.sft_steps, args.nproc, ("data.seq_length=128",))
    sft_s = time.perf_counter() - began
    run = out / "iterative-dpo"
    shutil.rmtree(run, ignore_errors=True)
    keel(["train", "iterative-dpo", "--config", str(REPO / "examples" / "iterative_dpo_tiny.yaml"), *SHARED, "reward_workers=0",
          f"checkpoint.load={sft}", f"run.output_dir={run}", f"run.seed={args.seed}",
          f"rollout.eval_prompts={out / 'eval_prompts.jsonl'}", f"rollout.eval_num_prompts={args.eval_prompts}",
          f"rollout.prompts_per_iteration={args.prompts}", f"rollout.samples_per_prompt={args.samples}",
          f"iterative.iterations={args.iterations}", f"optimizer.lr={args.lr}", f"dpo.beta={args.beta}",
          f"rollout.eval_samples_per_prompt={args.eval_samples}"])
    held_out = per_iteration(run, ("reward_synthetic_check", "response_length", "sampled_reward_synthetic_check"),
                             "validation")
    sampled = per_iteration(run, ("reward", "pairs", "ties", "dpo_loss", "accuracy", "response_length"), "train")
    greedy = [value for _, value in held_out["reward_synthetic_check"]]
    correct = [value for _, value in held_out["sampled_reward_synthetic_check"]]
    write_curves(str(run), ("sampled_reward_synthetic_check", "reward_synthetic_check", "reward", "pairs", "dpo_loss"),
                 str(run / "iterations.png"))
    return {"scorer": "synthetic_check (program-checked final answer), not a reward model",
            "held_out_sampled_correct": held_out["sampled_reward_synthetic_check"],
            "held_out_greedy_correct": held_out["reward_synthetic_check"],
            "held_out_greedy_length": held_out["response_length"], "sampled": sampled,
            "rise": round(correct[-1] - correct[0], 4), "greedy_rise": round(greedy[-1] - greedy[0], 4),
            "passes": correct[-1] - correct[0] >= args.bar,
            "png": str(run / "iterations.png"), "sft_s": round(sft_s, 1),
            "iterative_s": round(time.perf_counter() - began - sft_s, 1)}


def train_reward_model(out: Path, args: argparse.Namespace) -> Path:
    """A five-attribute regression RM from random weights on the built-in HelpSteer-style rows."""
    keel(["train", "rm", "--config", str(REPO / "examples" / "rm_regression_from_scratch.yaml"), *SHARED,
          # SteerLM 2.0's recipe keeps the 4-layer judge it was measured with (the example now has 6 layers).
          "model.num_layers=4", f"run.train_steps={args.rm_steps}", "run.eval_interval=0", "checkpoint.save_interval=0",
          "data.global_batch_size=16", "data.micro_batch_size=8", "scheduler.warmup_steps=10",
          f"run.output_dir={out / 'rm'}"], args.nproc)
    return out / "rm" / "checkpoints"


def steerlm2(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    began = time.perf_counter()
    rows, _ = attributes_to_steerlm(helpsteer_rows(args.sft_rows, args.seed, "train"))
    dump(out / "steerlm.jsonl", rows)
    dump(out / "prompts.jsonl", [{"prompt": r["prompt"]} for r in prompt_rows(2000, args.seed + 2, "train")])
    dump(out / "eval_prompts.jsonl", [{"prompt": r["prompt"]} for r in prompt_rows(args.eval_prompts, args.seed + 1,
                                                                                     "eval")])
    sft = Path(args.sft_checkpoint).resolve() if args.sft_checkpoint else \
        train_sft(out, out / "steerlm.jsonl", args.sft_steps, args.nproc, ("data.chat_template=nemotron",))
    reward_model = Path(args.rm_checkpoint).resolve() if args.rm_checkpoint else train_reward_model(out, args)
    setup_s = time.perf_counter() - began
    run = out / "steerlm2"
    shutil.rmtree(run, ignore_errors=True)
    keel(["train", "steerlm2", "--config", str(REPO / "examples" / "steerlm2_tiny.yaml"), *SHARED,
          f"checkpoint.load={sft}", f"reward_model={reward_model}", f"run.output_dir={run}", f"run.seed={args.seed}",
          f"rollout.prompts={out / 'prompts.jsonl'}", f"rollout.eval_prompts={out / 'eval_prompts.jsonl'}",
          f"rollout.eval_num_prompts={args.eval_prompts}", f"rollout.prompts_per_iteration={args.prompts}",
          f"rollout.samples_per_prompt={args.samples}", f"iterative.iterations={args.iterations}",
          f"optimizer.lr={args.lr}", f"steerlm2.attribute_sigma={args.sigma}",
          *([f"steerlm2.prior_attributes={args.prior_attributes}"] if args.prior_attributes else [])])
    keys = ("attribute_gap", "attribute_gap_target0", "attribute_gap_target1", "response_length_target0",
            "response_length_target1", "predicted_verbosity_target0", "predicted_verbosity_target1")
    held_out = per_iteration(run, keys, "validation")
    sampled = per_iteration(run, ("attribute_gap", "effective_sample_size", "steerlm2_loss",
                                  "response_length_target0", "response_length_target1"), "train")
    gap = [value for _, value in held_out["attribute_gap"]]
    low, high = held_out["response_length_target0"][-1][1], held_out["response_length_target1"][-1][1]
    write_curves(str(run), ("attribute_gap", "response_length_target0", "response_length_target1",
                            "effective_sample_size"), str(run / "iterations.png"))
    return {"targets": {"target0 (verbosity 0)": "helpfulness:3,correctness:4,coherence:4,complexity:1,verbosity:0",
                        "target1 (verbosity 4)": "helpfulness:2,correctness:4,coherence:4,complexity:2,verbosity:4"},
            "held_out_greedy": held_out, "sampled": sampled, "gap_change": round(gap[-1] - gap[0], 4),
            "length_ratio_verbosity_4_over_0": round(high / max(low, 1e-9), 3),
            "passes": gap[-1] <= gap[0] - args.bar and high >= 8 * low,
            "png": str(run / "iterations.png"), "setup_s": round(setup_s, 1),
            "iterative_s": round(time.perf_counter() - began - setup_s, 1)}


DEFAULTS = {  # per recipe
    "iterative-dpo": {"sft_rows": 20000, "sft_steps": 800, "prompts": 128, "samples": 8, "iterations": 2,
                      "lr": 3e-5, "bar": 0.04, "eval_prompts": 200},
    # 64 x 8 over 3 iterations (was 32 x 4 over 2): at the smaller size the gap's fall was within what a
    # rounding-only change to the SFT and RM runs moves it by (README, "Sample-and-train")
    "steerlm2": {"sft_rows": 6000, "sft_steps": 300, "prompts": 64, "samples": 8, "iterations": 3, "lr": 1e-4,
                 "bar": 0.03, "eval_prompts": 100},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", required=True, choices=sorted(DEFAULTS))
    parser.add_argument("--out", default=None, help="default runs/<recipe>-learns")
    parser.add_argument("--report", default=None, help="also write the JSON report here")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--nproc", type=int, default=2, help="ranks of the SFT and RM runs")
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--eval-prompts", type=int, default=None, help="unseen prompts judged greedily")
    parser.add_argument("--eval-samples", type=int, default=4,
                        help="iterative-dpo: samples per unseen prompt (rollout.eval_samples_per_prompt)")
    parser.add_argument("--sft-rows", type=int, default=None)
    parser.add_argument("--sft-steps", type=int, default=None)
    parser.add_argument("--styles", default="explained,rambling,rambling",
                        help="iterative-dpo: SFT answers' styles, one drawn per row (a name twice: twice as likely)")
    parser.add_argument("--sft-checkpoint", default=None, help="start from this (SteerLM) SFT checkpoint (no SFT run)")
    parser.add_argument("--rm-checkpoint", default=None, help="steerlm2: use this regression RM (no RM run)")
    parser.add_argument("--rm-steps", type=int, default=600, help="steerlm2: regression RM steps of 16 rows")
    parser.add_argument("--prompts", type=int, default=None, help="prompts per iteration")
    parser.add_argument("--samples", type=int, default=None, help="samples per prompt (the recipe's n)")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--beta", type=float, default=0.1, help="iterative-dpo: DPO beta")
    parser.add_argument("--prior-attributes", default=None, help="steerlm2: steerlm2.prior_attributes (e.g. target)")
    parser.add_argument("--sigma", type=float, default=0.5, help="steerlm2: attribute_sigma")
    parser.add_argument("--bar", type=float, default=None,
                        help="iterative-dpo: rise of sampled correctness on unseen prompts; steerlm2: fall of the "
                             "attribute gap")
    args = parser.parse_args(argv)
    for name, value in DEFAULTS[args.recipe].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.out = args.out or f"runs/{args.recipe}-learns"
    return args


def main() -> int:
    args = parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    report = iterative_dpo(out, args) if args.recipe == "iterative-dpo" else steerlm2(out, args)
    write_report(report, args, began)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
