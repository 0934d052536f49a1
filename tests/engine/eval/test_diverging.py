"""Diverging preferences: the rule, accuracy split, listing, and ``keel data diverging``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from engine.data.cli import register
from engine.eval.diverging import is_diverging, list_diverging, split_accuracy

ROWS: list[dict[str, Any]] = [
    {"prompt": "p0", "chosen": "a", "rejected": "b", "annotator_strengths": [2, 3]},    # unanimous
    {"prompt": "p1", "chosen": "a", "rejected": "b", "annotator_strengths": [1, -1]},   # direction
    {"prompt": "p2", "chosen": "a", "rejected": "b", "annotator_strengths": [3, 0]},    # spread 3
    {"prompt": "p3", "chosen": "a", "rejected": "b", "annotator_strengths": [-2, 2, 3]},  # direction
    {"prompt": "p4", "chosen": "a", "rejected": "b"},                                   # no annotators
]
CHOSEN = [1.0, 1.0, 0.0, 0.0, 1.0]
REJECTED = [0.0, 0.0, 1.0, 0.0, 0.0]  # row 3 ties: incorrect


def test_is_diverging() -> None:
    assert is_diverging([1, -1]) and is_diverging([-3, 0, 2])
    assert not is_diverging([3, 0]) and not is_diverging([0, 0]) and not is_diverging([]) and not is_diverging(None)
    # "spread above a threshold" (recipes.md): strictly above, so a spread equal to it is not diverging
    assert is_diverging([3, 0], spread_threshold=2) and not is_diverging([3, 1], spread_threshold=2)
    assert not is_diverging([3, 0], spread_threshold=3)


def test_split_accuracy_by_hand() -> None:
    split = split_accuracy(ROWS, CHOSEN, REJECTED)
    # unanimous: rows 0 (correct) and 2 (wrong) -> 1/2; diverging: rows 1 (correct) and 3 (tie) -> 1/2
    assert split["unanimous"] == {"count": 2, "correct": 1, "accuracy": 0.5}
    assert split["diverging"] == {"count": 2, "correct": 1, "accuracy": 0.5}
    assert split["without_annotators"] == 1
    by_spread = split_accuracy(ROWS, CHOSEN, REJECTED, spread_threshold=2)
    # row 2 moves to diverging: unanimous row 0 -> 1/1; diverging rows 1, 2, 3 -> 1/3
    assert by_spread["unanimous"]["accuracy"] == 1.0
    assert by_spread["diverging"]["accuracy"] == pytest.approx(1 / 3)
    assert "spread max-min > 2" in by_spread["rule"]
    assert split_accuracy(ROWS, CHOSEN, REJECTED, spread_threshold=3)["diverging"]["count"] == 2  # 3 is not above 3


def test_list_diverging_counts() -> None:
    rows, counts = list_diverging(ROWS)
    assert [r["prompt"] for r in rows] == ["p1", "p3"]
    assert counts == {"rows": 5, "with_annotators": 4, "unanimous": 2, "diverging": 2, "direction": 2,
                      "spread_only": 0}
    rows, counts = list_diverging(ROWS, spread_threshold=2)
    assert [r["prompt"] for r in rows] == ["p1", "p2", "p3"] and counts["spread_only"] == 1


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="keel data")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_data_diverging_command(write_jsonl: Callable[..., str], tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    preference = write_jsonl([
        {"prompt": "p0", "response_1": "x", "response_2": "y", "preference_strength": 2,
         "individual_preference": [2, 3]},
        {"prompt": "p1", "response_1": "x", "response_2": "y", "preference_strength": 0,
         "individual_preference": [{"score": -1}, {"score": 1}]},
    ], "prefs.jsonl")
    out = str(tmp_path / "diverging.jsonl")
    assert _run(["diverging", preference, "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "(helpsteer2_preference): 2 rows, 2 with annotators: 1 unanimous, 1 diverging" in printed
    written = [json.loads(line) for line in Path(out).read_text().splitlines()]
    assert [row["prompt"] for row in written] == ["p1"]

    pairs = write_jsonl(ROWS, "pairs.jsonl")
    assert _run(["diverging", pairs, "--threshold", "2"]) == 0
    assert "(pairs): 5 rows, 4 with annotators: 1 unanimous, 3 diverging" in capsys.readouterr().out

    bad = write_jsonl([{"prompt": "p", "chosen": "a", "rejected": "b", "annotator_strengths": [9]}], "bad.jsonl")
    assert _run(["diverging", bad]) == 1
    assert "bad.jsonl, line 1: field 'annotator_strengths[0]'" in capsys.readouterr().out
