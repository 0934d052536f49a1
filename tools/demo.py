"""The main job, ``make demo``: SFT -> reward model -> DPO and GRPO on the built-in data, one line per stage.

Each stage is a real ``keel train`` run under torchrun (``--nproc`` ranks, data parallel):

1. SFT of tiny-llama on the built-in synthetic chat rows;
2. a five-attribute regression reward model initialised from the SFT trunk, trained on the
   built-in HelpSteer-style rows; its line gives held-out pairwise accuracy of the goodness score;
3. DPO from the SFT checkpoint (the frozen reference is that checkpoint) on HelpSteer-style
   pairs (higher helpfulness chosen); its line gives held-out implicit-reward accuracy before
   training (0.5: the policy is its reference) and after;
4. GRPO from the SFT checkpoint, trained at TP2 while rollouts are generated at TP1 (two
   replicas, weights resharded every iteration), rewarded by the program check of the synthetic
   tasks plus 0.1 x the reward model's goodness; its line gives the program-checked correctness
   of greedy answers to held-out prompts (words and numbers never in the prompts trained on)
   before and after.

``--quick`` cuts every stage to a few steps (the tests run it that way).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.metrics import read_metrics  # noqa: E402
from tools.launch import keel  # noqa: E402

QUICK = {"sft": 6, "rm": 6, "dpo": 6, "grpo": 2}
FULL = {"sft": 60, "rm": 300, "dpo": 60, "grpo": 40}


def _stage(nproc: int, algo: str, run: Path, overrides: list[str], config: str = "") -> float:
    began = time.perf_counter()
    keel(["train", algo, *(["--config", config] if config else []), f"run.output_dir={run}",
          "checkpoint.resume=none", "logging.progress=false", *overrides], nproc)
    return time.perf_counter() - began


def _first_last(run: Path, key: str, split: str = "train") -> tuple[float, float]:
    records = [r for r in read_metrics(str(run), split) if key in r]
    return records[0][key], records[-1][key]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="runs/demo", help="directory of the four runs")
    parser.add_argument("--nproc", type=int, default=2, help="ranks per stage (data parallel)")
    parser.add_argument("--quick", action="store_true", help="a few steps per stage")
    args = parser.parse_args()
    steps = QUICK if args.quick else FULL
    out = Path(args.output).resolve()
    sft, rm, dpo, grpo = out / "sft", out / "rm", out / "dpo", out / "grpo"

    seconds = _stage(args.nproc, "sft", sft, [f"run.train_steps={steps['sft']}", f"run.eval_interval={steps['sft']}"],
                     "examples/sft.yaml")
    first, last = _first_last(sft, "lm_loss")
    valid = _first_last(sft, "lm_loss", "validation")[1]
    print(f"[1/4] sft: lm_loss {first:.3f} -> {last:.3f}, held-out {valid:.3f} ({seconds:.0f} s) -> {sft}", flush=True)

    seconds = _stage(args.nproc, "rm", rm, [
        f"checkpoint.load={sft / 'checkpoints'}", f"run.train_steps={steps['rm']}", "optimizer.lr=2e-3",
        f"run.eval_interval={steps['rm']}", "data.num_samples=8192", "data.global_batch_size=32",
        "data.micro_batch_size=8", "scheduler.type=cosine"])
    accuracy = _first_last(rm, "accuracy", "validation")[1]
    print(f"[2/4] reward model (5 attributes, from the SFT trunk): held-out pairwise accuracy {accuracy:.3f} "
          f"({seconds:.0f} s) -> {rm}", flush=True)

    seconds = _stage(args.nproc, "dpo", dpo, [
        "dpo.reference=null", f"checkpoint.load={sft / 'checkpoints'}", f"run.train_steps={steps['dpo']}",
        f"run.eval_interval={steps['dpo']}", "run.eval_at_start=true", "data.seq_length=256",
        "data.tokenizer=byte"], "examples/dpo_tiny.yaml")  # the SFT model's tokenizer, not the example's
    before, after = _first_last(dpo, "accuracy", "validation")
    print(f"[3/4] dpo (reference = the SFT model): held-out implicit-reward accuracy {before:.3f} -> {after:.3f} "
          f"({seconds:.0f} s) -> {dpo}", flush=True)

    seconds = _stage(args.nproc, "grpo", grpo, [
        f"checkpoint.load={sft / 'checkpoints'}", f"parallel.tensor={args.nproc}", "rollout.generation_tensor=1",
        "data.chat_template=plain", f"run.train_steps={steps['grpo']}", f"run.eval_interval={steps['grpo']}",
        "run.eval_at_start=true", "rollout.prompts_per_iteration=16", "rollout.samples_per_prompt=4",
        "rollout.max_new_tokens=24", "rollout.eval_num_prompts=64", "data.micro_batch_size=8",
        "data.global_batch_size=64", "optimizer.lr=1e-4", "scheduler.type=constant", "scheduler.warmup_steps=0",
        "reward_functions=[{name: synthetic_check}]", f"reward_model={rm / 'checkpoints'}", "reward_model_weight=0.1"])
    before, after = _first_last(grpo, "reward_synthetic_check", "validation")
    print(f"[4/4] grpo (trained at TP{args.nproc}, generated at TP1 x {args.nproc} replicas; reward: program check "
          f"+ 0.1 x RM): held-out correctness {before:.3f} -> {after:.3f} ({seconds:.0f} s) -> {grpo}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
