"""Does DPO learn what is right, on prompts it never saw? SFT -> DPO on synthetic tasks, judged on unseen ones.

    python tools/dpo_learns.py --out runs/dpo-learns [--report tools/bench/results/dpo_learns.json]

1. Data (:mod:`engine.data.synthetic`, ``tools/rm_synthetic_eval.controlled_pairs``): controlled
   pairs (same prompt, style and lead-in, both coherent, only the final answer differs) from the
   ``train`` split for training, and from the ``eval`` split, whose words and number pairs
   never occur in training, for judging. Half the wrong answers are misreadings (a sibling
   task's answer), half have the right answer's form (off by one, two letters swapped).
2. SFT of tiny-llama on the right responses of the training prompts (``builtin-sp`` tokenizer).
3. DPO from the SFT checkpoint (the reference is that checkpoint) on the training pairs.
4. Judge: the implicit reward ``β(log π(y) − log π_ref(y))`` of the right response above the
   wrong one, per kind of wrong answer, on the unseen pairs. Before DPO the policy is its
   reference, so every pair ties (0.5). Log-probs come from ``keel data ref-logprobs`` run with
   the DPO policy and with the SFT reference, so the judge shares the trainer's code.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.data.synthetic import WRONG_KINDS  # noqa: E402
from tools.launch import keel  # noqa: E402
from tools.rm_synthetic_eval import controlled_pairs  # noqa: E402

COMMON = ["model.preset=tiny-llama", "data.tokenizer=builtin-sp", "data.seq_length=224", "logging.progress=false",
          "logging.tensorboard=false", "checkpoint.resume=none", "checkpoint.save_interval=0"]


def write_data(out: Path, train_prompts: int, eval_prompts: int, seed: int) -> None:
    def dump(path: Path, rows: list[dict[str, Any]]) -> None:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    train = controlled_pairs(train_prompts, seed, "train")
    dump(out / "train_pairs.jsonl", [{"prompt": p.prompt, "chosen": p.right, "rejected": p.wrong} for p in train])
    dump(out / "sft.jsonl", [{"messages": [{"role": "user", "content": p.prompt},
                                           {"role": "assistant", "content": p.right}]}
                             for p in train if p.wrong_kind == WRONG_KINDS[0]])
    unseen = controlled_pairs(eval_prompts, seed + 1, "eval")
    for kind in WRONG_KINDS:
        dump(out / f"eval_{kind}.jsonl", [{"prompt": p.prompt, "chosen": p.right, "rejected": p.wrong}
                                          for p in unseen if p.wrong_kind == kind])


def logprobs(checkpoint: Path, pairs: Path, output: Path) -> dict[int, tuple[float, float]]:
    keel(["data", "ref-logprobs", str(output), *COMMON, "data.format=pairs", f"data.source={pairs}",
          f"data.validation_source={pairs}", f"dpo.reference={checkpoint}", "data.num_samples=100000"])
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    return {r["index"]: (r["chosen"], r["rejected"]) for r in rows if r["split"] == "validation"}


def judge(out: Path, policy: Path, reference: Path) -> dict[str, Any]:
    """Implicit-reward accuracy (ties half) per kind of wrong answer on the unseen pairs."""
    report = {}
    for kind in WRONG_KINDS:
        pairs = out / f"eval_{kind}.jsonl"
        pol = logprobs(policy, pairs, out / f"policy_{kind}.jsonl")
        ref = logprobs(reference, pairs, out / f"reference_{kind}.jsonl")
        margins = [(pol[i][0] - ref[i][0]) - (pol[i][1] - ref[i][1]) for i in sorted(pol)]
        wins = sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins)
        report[kind] = {"pairs": len(margins), "accuracy": wins / len(margins)}
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/dpo-learns")
    parser.add_argument("--report", default=None, help="also write the JSON report here")
    parser.add_argument("--train-prompts", type=int, default=4000)
    parser.add_argument("--eval-prompts", type=int, default=300)
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("--dpo-steps", type=int, default=600)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--dpo-lr", type=float, default=3e-4)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--seed", type=int, default=31)
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    write_data(out, args.train_prompts, args.eval_prompts, args.seed)
    began = time.perf_counter()
    sft = train_sft(out, out / "sft.jsonl", args.sft_steps, args.nproc)
    keel(["train", "dpo", *COMMON, f"data.source={out / 'train_pairs.jsonl'}", "data.format=pairs",
          f"data.validation_source={out / 'eval_misreading.jsonl'}", f"checkpoint.load={sft}",
          f"run.train_steps={args.dpo_steps}", f"optimizer.lr={args.dpo_lr}", f"dpo.beta={args.beta}",
          "scheduler.type=constant", "data.micro_batch_size=4", "data.global_batch_size=16",
          "data.num_samples=100000", f"run.output_dir={out / 'dpo'}"], args.nproc)
    report = {"unseen_prompts_after_dpo": judge(out, out / "dpo" / "checkpoints", sft),
              "before_dpo": "0.5 for every kind: the policy is its reference, every pair ties"}
    write_report(report, args, began)
    return 0


def write_report(report: dict[str, Any], args: argparse.Namespace, began: float) -> None:
    """Print ``report`` (plus the settings and wall time) and write it to ``<out>/report.json`` and ``--report``."""
    report.update(settings=vars(args), wall_s=round(time.perf_counter() - began, 1))
    text = json.dumps(report, indent=2) + "\n"
    print(text, end="")
    (Path(args.out) / "report.json").write_text(text)
    if args.report:
        Path(args.report).write_text(text)


def train_sft(out: Path, source: Path, steps: int, nproc: int, extra: tuple[str, ...] = ()) -> Path:
    """tiny-llama SFT on ``source`` (chat rows) into ``<out>/sft``; returns its checkpoint directory."""
    keel(["train", "sft", *COMMON, f"data.source={source}", "data.format=chat", *extra, f"run.train_steps={steps}",
          "optimizer.lr=3e-3", "scheduler.type=cosine", "scheduler.warmup_steps=20", "data.micro_batch_size=8",
          "data.global_batch_size=32", "data.num_samples=100000", f"run.output_dir={out / 'sft'}"], nproc)
    return out / "sft" / "checkpoints"


if __name__ == "__main__":
    raise SystemExit(main())
