"""Judge a regression reward model on held-out synthetic HelpSteer-style rows (ground truth known).

    python tools/rm_synthetic_eval.py --checkpoint runs/rm/checkpoints --seed 777 --num 1200

Reports, as JSON (``--out``) and on stdout:
* pairwise accuracy of the goodness score on held-out pairs (same prompt) whose responses
  differ in correctness — the correct response should score higher — overall and per
  task kind (addition, reversal, ...);
* per-attribute MSE of the predictions, next to the MSE of always predicting the mean of
  the training labels (``--train-seed``/``--train-num`` regenerate the training rows).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from typing import Any

import torch

from engine.data.schemas import ATTRIBUTES
from engine.data.synthetic import helpsteer_rows, task_kind


def _pairs_differing_in_correctness(rows: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """(index of the correct response, index of the wrong one) for prompts with one of each."""
    by_prompt: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        by_prompt[row["prompt"]].append(i)
    pairs = []
    for indices in by_prompt.values():
        right = [i for i in indices if rows[i]["correctness"] == 4]
        wrong = [i for i in indices if rows[i]["correctness"] == 0]
        pairs += [(r, w) for r in right for w in wrong]
    return pairs


def evaluate(checkpoint: str, num: int, seed: int, train_num: int, train_seed: int) -> dict[str, Any]:
    from engine.eval.scoring import load_scorer

    scorer = load_scorer(checkpoint)
    rows = helpsteer_rows(num, seed)
    rewards = scorer.score([(row["prompt"], row["response"]) for row in rows])
    goodness = scorer.scalar(rewards)
    pairs = _pairs_differing_in_correctness(rows)
    wins = [bool(goodness[r] > goodness[w]) for r, w in pairs]
    by_kind: dict[str, list[bool]] = defaultdict(list)
    for (r, _), win in zip(pairs, wins, strict=True):
        by_kind[task_kind(rows[r]["prompt"])].append(win)
    train = helpsteer_rows(train_num, train_seed)
    attributes = scorer.step.rm.attributes
    mse: dict[str, dict[str, float]] = {}
    for k, name in enumerate(attributes):
        labels = torch.tensor([float(row[name]) for row in rows])
        mean = sum(float(row[name]) for row in train) / len(train)
        mse[name] = {
            "model": float((rewards[:, k] - labels).pow(2).mean()),
            "predict_training_mean": float((mean - labels).pow(2).mean()),
        }
    return {
        "checkpoint": checkpoint,
        "held_out_rows": len(rows),
        "held_out_seed": seed,
        "pairs_differing_in_correctness": len(pairs),
        "pairwise_accuracy": sum(wins) / max(len(pairs), 1),
        "pairwise_accuracy_by_kind": {kind: {"pairs": len(v), "accuracy": sum(v) / len(v)}
                                      for kind, v in sorted(by_kind.items())},
        "mse": mse,
        "attributes": list(attributes),
        "all_attributes": list(ATTRIBUTES),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint dir, run checkpoint dir, or best/latest pointer")
    parser.add_argument("--num", type=int, default=1200, help="held-out rows to generate")
    parser.add_argument("--seed", type=int, default=777, help="seed of the held-out rows (not the training seed)")
    parser.add_argument("--train-num", type=int, default=None,
                        help="training rows, for the mean baseline (default: the run's data.num_samples)")
    parser.add_argument("--train-seed", type=int, default=None, help="training seed (default: the run's run.seed)")
    parser.add_argument("--out", help="write the report as JSON here")
    args = parser.parse_args()
    from engine.checkpoint.dist import read_meta, resolve

    saved = read_meta(resolve(args.checkpoint))["config"]
    train_num = args.train_num if args.train_num is not None else int(saved["data"]["num_samples"])
    train_seed = args.train_seed if args.train_seed is not None else int(saved["run"]["seed"])
    report = evaluate(args.checkpoint, args.num, args.seed, train_num, train_seed)
    report["training_rows"] = {"num": train_num, "seed": train_seed, "source": saved["data"]["source"]}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
