"""The ``keel data`` sub-commands, mounted on a bare argparse parser."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from engine.data.cli import register


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="keel data")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_synth_validate_convert(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ratings = str(tmp_path / "helpsteer.jsonl")
    assert _run(["synth", "helpsteer", ratings, "--num", "40", "--seed", "1"]) == 0
    assert _run(["validate", ratings, "--format", "attributes", "--seq-length", "512"]) == 0
    assert "40 valid of 40 rows" in capsys.readouterr().out
    dpo = str(tmp_path / "dpo.jsonl")
    assert _run(["convert-helpsteer2-dpo", ratings, dpo]) == 0
    assert _run(["validate", dpo, "--format", "pairs", "--json", "--seq-length", "512"]) == 0
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1])["ok"]
    steer = str(tmp_path / "steer.jsonl")
    assert _run(["convert-steerlm", ratings, steer]) == 0
    assert _run(["validate", steer, "--template", "nemotron", "--seq-length", "1024"]) == 0
    prefs = str(tmp_path / "prefs.jsonl")
    assert _run(["synth", "builtin:helpsteer2_preference", prefs, "--num", "30"]) == 0
    assert _run(["convert-helpsteer2-preference-bt", prefs, str(tmp_path / "bt.jsonl")]) == 0


def test_synth_writes_a_split(tmp_path: Path) -> None:
    from engine.data.synthetic import helpsteer_rows

    path = tmp_path / "eval.jsonl"
    assert _run(["synth", "helpsteer", str(path), "--num", "20", "--seed", "3", "--split", "eval"]) == 0
    assert [json.loads(line) for line in path.read_text().splitlines()] == helpsteer_rows(20, 3, "eval")


def test_validate_reports_bad_rows_and_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    assert _run(["validate", str(path)]) == 1
    out = capsys.readouterr().out
    assert "bad.jsonl, line 1: field 'messages[0].role'" in out and "PROBLEMS FOUND" in out
    assert _run(["validate", str(path), "--on-error", "raise"]) == 1
    assert _run(["convert-steerlm", str(tmp_path / "missing.jsonl"), str(tmp_path / "o.jsonl")]) == 1
