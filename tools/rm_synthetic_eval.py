"""Judge a regression reward model on unseen synthetic prompts (ground truth known).

    python tools/rm_synthetic_eval.py --checkpoint runs/rm/checkpoints/best --seed 777 --prompts 600

Every prompt comes from the ``eval`` split of :mod:`engine.data.synthetic`: its word or
number pair never appears in training rows (``builtin:helpsteer``, the train split).
``--split train`` asks the same about the training distribution, for comparison.
Reports, as JSON (``--out``) and on stdout:

* **controlled pairwise accuracy** per kind of wrong answer: for each prompt, one style
  (bare, explained or rambling) and one right answer; for each kind of wrong answer
  (``misreading``: a sibling task's answer; ``same_form``: off by 1 or 10, a count off by
  one, two letters swapped) a wrong response that is the right one with only the answer
  changed (same lead-in, both coherent). The pair is won when the goodness score of the
  right response is higher. Overall per kind and per kind × task (addition, reversal, ...);
* per-attribute MSE of the predictions on eval-split rows, next to the MSE of always
  predicting the mean of the training labels (``--train-seed``/``--train-num``
  regenerate the training rows).

A response longer than the model's ``seq_length`` gets no score (no reward is read from a cut
response). As in ``keel eval rewardbench``, a pair with an unscored side is left out of every
accuracy and counted (``unscored``), and the MSE is over the scored rows only (``unscored_rows``).
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch

from engine.data.schemas import ATTRIBUTES
from engine.data.synthetic import (
    SPLITS,
    STYLES,
    WRONG_KINDS,
    compose_response,
    helpsteer_rows,
    make_task,
    prompt_text,
    task_kind,
    wrong_answer,
)


@dataclass(frozen=True)
class ControlledPair:
    prompt: str
    right: str
    wrong: str
    wrong_kind: str  # "misreading" | "same_form"
    task: str  # "addition", "reversal", ...
    style: str


def controlled_pairs(num_prompts: int, seed: int, split: str = "eval") -> list[ControlledPair]:
    """One right/wrong pair per kind of wrong answer for each of ``num_prompts`` prompts of ``split``.

    Right and wrong responses share the prompt, the style and the lead-in (rendered from the
    same random state); only the answer differs, and both are coherent.
    """
    rng = random.Random(seed)
    pairs = []
    for _ in range(num_prompts):
        task = make_task(rng, split)
        prompt = prompt_text(rng, task, split)
        style = rng.choice(STYLES)
        for kind in WRONG_KINDS:
            wrong = wrong_answer(task, kind, rng)
            lead_seed = rng.random()
            right_text = compose_response(task, task.answer, True, style, random.Random(lead_seed))
            wrong_text = compose_response(task, wrong, True, style, random.Random(lead_seed))
            pairs.append(ControlledPair(prompt, right_text, wrong_text, kind, task_kind(prompt), style))
    return pairs


def _accuracy(wins: list[bool], unscored: int = 0) -> dict[str, Any]:
    """``pairs`` scored, their ``accuracy`` (None when none was scored), and the ``unscored`` pairs left out."""
    return {"pairs": len(wins), "accuracy": sum(wins) / len(wins) if wins else None, "unscored": unscored}


def pairwise_report(pairs: list[ControlledPair], goodness: dict[tuple[str, str], float]) -> dict[str, Any]:
    """Accuracy per kind of wrong answer, and per kind × task, from goodness scores of (prompt, response).

    A pair with a side that has no score (NaN: the response does not fit) is left out and counted.
    """
    by_kind: dict[str, list[bool]] = defaultdict(list)
    by_kind_task: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    unscored: dict[str, int] = defaultdict(int)
    unscored_task: dict[tuple[str, str], int] = defaultdict(int)
    for pair in pairs:
        right, wrong = goodness[(pair.prompt, pair.right)], goodness[(pair.prompt, pair.wrong)]
        if math.isnan(right) or math.isnan(wrong):
            unscored[pair.wrong_kind] += 1
            unscored_task[(pair.wrong_kind, pair.task)] += 1
            by_kind_task[pair.wrong_kind].setdefault(pair.task, [])
            continue
        by_kind[pair.wrong_kind].append(right > wrong)
        by_kind_task[pair.wrong_kind][pair.task].append(right > wrong)
    return {kind: {**_accuracy(by_kind[kind], unscored[kind]),
                   "by_task": {task: _accuracy(wins, unscored_task[(kind, task)])
                               for task, wins in sorted(by_kind_task[kind].items())}}
            for kind in WRONG_KINDS}


def _mse(rewards: torch.Tensor, rows: list[dict[str, Any]], train: list[dict[str, Any]],
         attributes: list[str]) -> dict[str, dict[str, Any]]:
    """Per attribute: MSE of the predictions and of the training mean, over the rows the model scored."""
    scored = ~rewards.isnan().any(-1)
    mse: dict[str, dict[str, Any]] = {}
    for k, name in enumerate(attributes):
        labels = torch.tensor([float(row[name]) for row in rows])[scored]
        mean = sum(float(row[name]) for row in train) / len(train)
        mse[name] = {"model": float((rewards[scored, k] - labels).pow(2).mean()) if len(labels) else None,
                     "predict_training_mean": float((mean - labels).pow(2).mean()) if len(labels) else None,
                     "rows": len(labels)}
    return mse


def evaluate(checkpoint: str, num_prompts: int, num_rows: int, seed: int, train_num: int,
             train_seed: int, split: str = "eval") -> dict[str, Any]:
    from engine.eval.scoring import load_scorer

    scorer = load_scorer(checkpoint)
    pairs = controlled_pairs(num_prompts, seed, split)
    texts = sorted({(p.prompt, r) for p in pairs for r in (p.right, p.wrong)})
    scores = scorer.scalar(scorer.score(texts))
    goodness = {text: float(score) for text, score in zip(texts, scores, strict=True)}
    rows = helpsteer_rows(num_rows, seed + 1, split)
    rewards = scorer.score([(row["prompt"], row["response"]) for row in rows])
    attributes = list(scorer.step.rm.attributes)
    return {
        "checkpoint": checkpoint,
        "split": split + (" (words and number pairs never in the train split)" if split != "train" else
                          " (the training distribution; rows of another seed)"),
        "seed": seed,
        "prompts": num_prompts,
        "controlled_pairwise_accuracy": pairwise_report(pairs, goodness),
        "eval_rows": len(rows),
        "unscored_rows": int(rewards.isnan().any(-1).sum()),
        "unscored_note": f"responses longer than the model's seq_length={scorer.seq_length} get no score: a pair "
                         "with one is left out of the accuracy (unscored), and the MSE is over scored rows only",
        "mse": _mse(rewards, rows, helpsteer_rows(train_num, train_seed), attributes),
        "attributes": attributes,
        "all_attributes": list(ATTRIBUTES),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint dir, run checkpoint dir, or best/latest pointer")
    parser.add_argument("--prompts", type=int, default=600, help="unseen prompts for the controlled pairs")
    parser.add_argument("--rows", type=int, default=1200, help="unseen rows for the per-attribute MSE")
    parser.add_argument("--seed", type=int, default=777, help="seed of the eval prompts (not the training seed)")
    parser.add_argument("--split", choices=SPLITS, default="eval",
                        help="eval (unseen words and numbers, the default) or train, to compare with the training "
                             "distribution")
    parser.add_argument("--train-num", type=int, default=None,
                        help="training rows, for the mean baseline (default: the run's data.num_samples)")
    parser.add_argument("--train-seed", type=int, default=None, help="training seed (default: the run's run.seed)")
    parser.add_argument("--out", help="write the report as JSON here")
    args = parser.parse_args()
    from engine.checkpoint.dist import read_meta, resolve

    saved = read_meta(resolve(args.checkpoint))["config"]
    train_num = args.train_num if args.train_num is not None else int(saved["data"]["num_samples"])
    train_seed = args.train_seed if args.train_seed is not None else int(saved["run"]["seed"])
    report = evaluate(args.checkpoint, args.prompts, args.rows, args.seed, train_num, train_seed, args.split)
    report["training_rows"] = {"num": train_num, "seed": train_seed, "source": saved["data"]["source"]}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
