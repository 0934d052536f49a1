"""``keel eval ...`` sub-commands: score a preference data set with a reward model.

:func:`register` adds the sub-commands to an argparse sub-parsers object; each handler
is ``func(args) -> int`` (0 = success). This module is the evaluation console: it prints
for the user (rank 0 only); the library modules only log.

``keel eval rewardbench --checkpoint DIR --data FILE.jsonl [--weights a=w,...] [--on-error skip]
[--out report.json] [overrides ...]`` runs as one process or under torchrun (every rank scores a shard).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, Optional

from engine.checkpoint import CHECKPOINT_FORMS
from engine.data.errors import DataError
from engine.data.loaders import ReadStats
from engine.errors import ConfigError
from engine.eval.diverging import annotator_strengths, split_accuracy
from engine.eval.rewardbench import (
    ON_ERROR,
    ScoreError,
    attribute_calibration,
    cross_prompt,
    evaluate,
    format_table,
    load_rows,
    overlong_summary,
)
from engine.files import write_text_atomic


def parse_weights(text: str) -> dict[str, float]:
    """``"helpfulness=0.65,correctness=0.8"`` → ``{"helpfulness": 0.65, "correctness": 0.8}``."""
    weights: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        try:
            number: Optional[float] = float(value)
        except ValueError:
            number = None
        if not sep or not name.strip() or number is None or not math.isfinite(number):
            raise argparse.ArgumentTypeError(f"--weights {text!r}: expected name=number items separated by commas, "
                                             "e.g. helpfulness=0.65,correctness=0.8,coherence=0.45")
        weights[name.strip()] = number
    if not weights:
        raise argparse.ArgumentTypeError("--weights is empty; leave it out to use the goodness weights")
    return weights


def rank() -> int:
    """This process's rank: torch.distributed if initialised, else the RANK variable (0 alone)."""
    if "torch" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return int(dist.get_rank())
    return int(os.environ.get("RANK", "0"))


def write_report(report: dict[str, Any], path: str) -> None:
    """Write the report as JSON, atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_text_atomic(path, json.dumps(report, indent=2) + "\n")


def rewardbench_report(rows: list[dict[str, Any]], chosen: list[float], rejected: list[float],
                       spread_threshold: Optional[float] = None, fits: Optional[list[str]] = None,
                       attributes: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """:func:`evaluate` of the pairs that fit, with over-long counts per subset, cross-prompt calibration
    (and attribute calibration for labelled rows), and unanimous vs diverging accuracy when rows carry
    annotator strengths. ``fits``: each pair's status from the scorer (default: all ``whole``)."""
    fits = fits if fits is not None else ["whole"] * len(rows)
    kept = [i for i, status in enumerate(fits) if status != "dropped"]
    if not kept:
        raise ScoreError(f"none of the {len(rows)} pairs fits the model's seq_length: every pair has a response "
                         "longer than it; raise data.seq_length (an override) if the model allows")
    pick = lambda values: [values[i] for i in kept]  # noqa: E731
    report = evaluate(pick(rows), pick(chosen), pick(rejected))
    report["overlong"] = overlong_summary(rows, fits)
    for name, entry in report["overlong"]["subsets"].items():
        if name in report["subsets"]:
            report["subsets"][name].update(prompt_cut=entry["prompt_cut"], dropped=entry["dropped"])
    if attributes:
        attributes = dict(attributes, chosen=pick(attributes["chosen"]), rejected=pick(attributes["rejected"]))
    report["calibration"] = {"cross_prompt": cross_prompt(pick(rows), pick(chosen), pick(rejected)),
                             "attributes": attribute_calibration(pick(rows), attributes)}
    if any(annotator_strengths(rows[i]) is not None for i in kept):
        report["diverging"] = split_accuracy(pick(rows), pick(chosen), pick(rejected), spread_threshold)
    return report


def on_error_of(args: argparse.Namespace) -> tuple[str, list[str]]:
    """(``--on-error``, the model overrides): a ``data.on_error=skip`` override, which earlier hints suggested
    and which loading the model never read, is taken as ``--on-error skip``."""
    overrides = [item for item in args.overrides if item.partition("=")[0].strip() != "data.on_error"]
    given = [item.partition("=")[2].strip() for item in args.overrides if item not in overrides]
    if given and given[-1] not in ON_ERROR:
        raise DataError(None, "data.on_error", f"one of {', '.join(ON_ERROR)}", given[-1], source="command line",
                        hint="pass --on-error skip to leave bad rows out")
    unread = [item for item in overrides if item.partition(".")[0].strip() not in SCORING_SECTIONS]
    if unread:  # run.*, optimizer.*, ... were accepted and did nothing
        raise ConfigError(f"override {unread[0]!r}: scoring reads only the "
                          f"{', '.join(section + '.*' for section in SCORING_SECTIONS)} settings of the model")
    return (given[-1] if given else args.on_error), overrides


SCORING_SECTIONS = ("model", "data", "rm", "parallel", "precision")  # what loading and running the model reads


def cmd_rewardbench(args: argparse.Namespace) -> int:
    main = rank() == 0
    try:
        on_error, overrides = on_error_of(args)
        stats = ReadStats(args.data)
        rows = load_rows(args.data, on_error, stats)
        from engine.eval.scoring import score_pairs_from_checkpoint

        chosen, rejected, attributes, fits = score_pairs_from_checkpoint(args.checkpoint, rows, args.weights,
                                                                         overrides, progress=not args.quiet)
        report = rewardbench_report(rows, chosen, rejected, args.spread_threshold, fits, attributes)
        report["bad_rows"] = {"records": stats.records, "skipped": stats.skipped, "first": stats.problems,
                              "rule": f"--on-error {on_error}: bad rows " + ("are left out of every accuracy"
                                                                            if on_error == "skip" else "stop the run")}
    except (DataError, ScoreError) as error:
        if main:
            print(f"keel eval rewardbench: error: {error}", file=sys.stderr)
        return 1
    if main:
        report.update(checkpoint=os.path.abspath(args.checkpoint), data=args.data,
                      weights=args.weights or "default (goodness weights for a multi-attribute model)")
        print(format_table(report), flush=True)
        if args.out:
            write_report(report, args.out)
            print(f"report written to {os.path.abspath(args.out)}", flush=True)
    return 0


def register(subparsers: Any) -> None:
    """Add ``rewardbench`` to ``subparsers`` (from ``add_subparsers``)."""
    bench = subparsers.add_parser(
        "rewardbench", help="RewardBench-style accuracy of a reward model on preference pairs",
        description="Score every {prompt, chosen, rejected, subset} row with a reward-model checkpoint and report "
        "accuracy per subset, per section (Chat, Chat Hard, Safety, Reasoning), the overall mean of the sections, "
        "Prior Sets separately, and unanimous vs diverging pairs when rows carry annotator_strengths. A pair is "
        "correct when score(chosen) > score(rejected); ties count as incorrect. Responses are never cut: a pair "
        "longer than the model's seq_length loses the start of its prompt, and a pair whose response alone does "
        "not fit is dropped; both are counted per subset. Cross-prompt calibration compares chosen responses "
        "with other prompts' rejected ones. Runs alone or under torchrun.")
    bench.add_argument("--checkpoint", required=True, help=f"the reward model's checkpoint: {CHECKPOINT_FORMS}")
    bench.add_argument("--quiet", action="store_true", help="no progress bar")
    bench.add_argument("--data", required=True, help="rows: .jsonl/.json/.parquet file or hf:<org>/<name>[:<split>]")
    bench.add_argument("--weights", type=parse_weights, default=None,
                       help="attribute weights of a multi-attribute model, e.g. "
                       "helpfulness=0.65,correctness=0.8,coherence=0.45 (default: those goodness weights)")
    bench.add_argument("--spread-threshold", type=float, default=None,
                       help="also call a pair diverging when its annotators' max-min strength is above this")
    bench.add_argument("--on-error", choices=ON_ERROR, default="raise",
                       help="a bad row: 'raise' stops at it naming its file, line and field; 'skip' leaves it out "
                       "and counts it in the report (default: %(default)s)")
    bench.add_argument("--out", default=None, help="write the report as JSON here")
    bench.add_argument("overrides", nargs="*", help="section.field=value overrides for loading the model")
    bench.set_defaults(func=cmd_rewardbench, out_example="report.json")  # what an --out directory is told to hold
