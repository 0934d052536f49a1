"""Does a SteerLM policy follow its attributes on prompts it never saw? Verbosity 0 vs 4.

    python tools/steerlm_learns.py --out runs/steerlm-learns [--report tools/bench/results/steerlm_learns.json]

1. SteerLM data: built-in HelpSteer-style rows of the ``train`` split, converted to
   attribute-conditioned chat rows (``keel data convert-steerlm``: the ratings are written
   into the prompt by the ``nemotron`` template). Their verbosity is 0 for bare answers,
   2 for explained ones and 4 for rambling ones.
2. SFT of tiny-llama on them (``data.chat_template=nemotron``, ``builtin-sp`` tokenizer).
3. ``keel generate`` on prompts of the ``eval`` split (words and numbers never in training),
   greedy, and the mean number of generated tokens for:

   * ``verbosity=0`` vs ``verbosity=4``, the other attributes at their defaults
     (helpfulness 4, complexity 2: the ratings of an *explained* answer, verbosity 2);
   * the attribute sets the data gives verbosity 0 and 4 (a bare answer: helpfulness 3,
     complexity 1; a rambling one: helpfulness 2, complexity 2). In the synthetic data the
     five ratings follow from the style, so verbosity never varies alone in training.
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

from engine.data.convert import attributes_to_steerlm  # noqa: E402
from engine.data.synthetic import helpsteer_rows, prompt_rows  # noqa: E402
from tools.dpo_learns import train_sft, write_report  # noqa: E402
from tools.launch import keel  # noqa: E402

SETTINGS = {
    "verbosity_only_0": "verbosity=0", "verbosity_only_4": "verbosity=4",
    "data_attribute_sets_0": "helpfulness=3,complexity=1,verbosity=0",
    "data_attribute_sets_4": "helpfulness=2,complexity=2,verbosity=4",
}


def _lengths(path: Path) -> dict[str, Any]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    tokens = [r["tokens"] for r in rows]
    return {"completions": len(rows), "mean_tokens": sum(tokens) / len(tokens),
            "mean_chars": sum(len(r["completion"]) for r in rows) / len(rows),
            "stopped": sum(r["finish_reason"] == "stop" for r in rows), "example": rows[0]["completion"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/steerlm-learns")
    parser.add_argument("--report", default=None, help="also write the JSON report here")
    parser.add_argument("--rows", type=int, default=6000)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--sft-checkpoint", default=None,
                        help="use this SteerLM SFT checkpoint (no SFT run); tools/iterative_learns.py "
                             "--recipe steerlm2 trains the same one at the same --rows, --steps and --seed")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    prompts = prompt_rows(args.prompts, args.seed + 1, "eval")
    (out / "prompts.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in prompts))
    if args.sft_checkpoint:
        checkpoint = Path(args.sft_checkpoint).resolve()
    else:  # the SFT rows are only needed for this run
        rows, _ = attributes_to_steerlm(helpsteer_rows(args.rows, args.seed, "train"))
        (out / "steerlm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        checkpoint = train_sft(out, out / "steerlm.jsonl", args.steps, args.nproc, ("data.chat_template=nemotron",))
    report: dict[str, Any] = {}
    for name, attributes in SETTINGS.items():
        target = out / f"{name}.jsonl"
        keel(["generate", str(checkpoint), str(out / "prompts.jsonl"), str(target),
              "--attributes", attributes, "--max-new-tokens", str(args.max_new_tokens), "--quiet"])
        report[name] = {"attributes": attributes, **_lengths(target)}
    for kind in ("verbosity_only", "data_attribute_sets"):
        report[f"{kind}_length_ratio_4_over_0"] = report[f"{kind}_4"]["mean_tokens"] / report[f"{kind}_0"]["mean_tokens"]
    write_report(report, args, began)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
