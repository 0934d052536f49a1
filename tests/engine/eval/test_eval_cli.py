"""``keel eval rewardbench`` with a stand-in scorer (no model): table on stdout, JSON report."""

from __future__ import annotations

import argparse
import json
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import pytest

from engine.errors import ConfigError
from engine.eval.cli import parse_weights, register
from tests.engine.eval.conftest import SCORED_ROWS

FITS: dict[int, list[str]] = {}  # pair statuses the stand-in scorer reports, by number of rows


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="keel eval")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


@pytest.fixture
def fake_scorer(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replace engine.eval.scoring with a scorer that returns the hand-assigned SCORED_ROWS scores."""
    calls: list[dict[str, Any]] = []

    def score(checkpoint: str, rows: list[dict[str, Any]], weights: Optional[dict[str, float]],
              overrides: list[str], progress: bool = False) -> tuple[list[float], list[float], None, list[str]]:
        calls.append({"checkpoint": checkpoint, "rows": len(rows), "weights": weights, "overrides": overrides})
        fits = FITS.get(len(rows), ["whole"] * len(rows))
        nan = float("nan")
        chosen = [c if f != "dropped" else nan for (_, c, _), f in zip(SCORED_ROWS, fits, strict=True)]
        rejected = [r if f != "dropped" else nan for (_, _, r), f in zip(SCORED_ROWS, fits, strict=True)]
        return chosen, rejected, None, fits

    module = types.ModuleType("engine.eval.scoring")
    module.score_pairs_from_checkpoint = score  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "engine.eval.scoring", module)
    monkeypatch.delenv("RANK", raising=False)
    return calls


def test_rewardbench_command(bench_file: str, tmp_path: Path, fake_scorer: list[dict[str, Any]],
                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "reports" / "report.json"
    assert _run(["rewardbench", "--checkpoint", "ckpt", "--data", bench_file, "--weights",
                 "helpfulness=1,correctness=0.5", "--out", str(out), "model.seq_length=64"]) == 0
    assert fake_scorer == [{"checkpoint": "ckpt", "rows": 20, "weights": {"helpfulness": 1.0, "correctness": 0.5},
                            "overrides": ["model.seq_length=64"]}]
    printed = capsys.readouterr().out
    assert "RewardBench-style evaluation: 20 pairs" in printed and "Overall" in printed
    report = json.loads(out.read_text())
    assert report["correct"] == 13 and report["weights"] == {"helpfulness": 1.0, "correctness": 0.5}
    assert "diverging" not in report  # no row carries annotator strengths


def test_rewardbench_reports_over_long_pairs_per_subset(bench_file: str, tmp_path: Path, fake_scorer: Any,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    # rows 0-1 alpacaeval-easy: prompt cut, then dropped; row 5 (mt-bench-hard, its only row): dropped
    fits = ["prompt_cut", "dropped", "whole", "whole", "whole", "dropped"] + ["whole"] * 14
    monkeypatch.setitem(FITS, 20, fits)
    out = tmp_path / "report.json"
    assert _run(["rewardbench", "--checkpoint", "c", "--data", bench_file, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["pairs"] == 18 and report["overlong"]["prompt_cut"] == 1 and report["overlong"]["dropped"] == 2
    assert report["overlong"]["subsets"]["alpacaeval-easy"] == {"pairs": 2, "prompt_cut": 1, "dropped": 1}
    assert report["overlong"]["subsets"]["mt-bench-hard"] == {"pairs": 1, "prompt_cut": 0, "dropped": 1}
    easy = report["subsets"]["alpacaeval-easy"]
    assert (easy["count"], easy["correct"], easy["prompt_cut"], easy["dropped"]) == (1, 1, 1, 1)
    assert "mt-bench-hard" not in report["subsets"]  # nothing scored: no accuracy from a cut response
    printed = capsys.readouterr().out
    assert "Over-long pairs: prompt cut 1, dropped 2" in printed and "all 1 pairs dropped" in printed
    assert "(prompt cut 1, dropped 1)" in printed


def test_rewardbench_reports_cross_prompt_calibration(bench_file: str, tmp_path: Path, fake_scorer: Any,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report.json"
    assert _run(["rewardbench", "--checkpoint", "c", "--data", bench_file, "--out", str(out)]) == 0
    cross = json.loads(out.read_text())["calibration"]["cross_prompt"]
    chosen = [c for _, c, _ in SCORED_ROWS]
    rejected = [r for _, _, r in SCORED_ROWS]
    # by hand: every (chosen i, rejected j) with i != j (each row has its own prompt)
    above = sum(chosen[i] > rejected[j] for i in range(20) for j in range(20) if i != j)
    assert cross["comparisons"] == 380 and cross["accuracy"] == pytest.approx(above / 380)
    assert cross["within_prompt_accuracy"] == pytest.approx(13 / 20)
    assert "Cross-prompt calibration" in capsys.readouterr().out


def test_rewardbench_command_split_and_quiet_ranks(write_jsonl: Callable[..., str], fake_scorer: Any,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    rows = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b", "subset": s,
             "annotator_strengths": [1, -1] if i % 2 else [2]} for i, (s, _, _) in enumerate(SCORED_ROWS)]
    path = write_jsonl(rows, "annotated.jsonl")
    assert _run(["rewardbench", "--checkpoint", "c", "--data", path]) == 0
    printed = capsys.readouterr().out
    assert "unanimous" in printed and "diverging" in printed
    monkeypatch.setenv("RANK", "1")
    assert _run(["rewardbench", "--checkpoint", "c", "--data", path]) == 0
    assert capsys.readouterr().out == ""  # only rank 0 prints


def test_rewardbench_command_bad_data(write_jsonl: Callable[..., str], fake_scorer: list[dict[str, Any]],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    path = write_jsonl([{"prompt": "q", "chosen": "a", "subset": "shp"}], "bad.jsonl")
    assert _run(["rewardbench", "--checkpoint", "c", "--data", path]) == 1
    assert "bad.jsonl, line 1: field 'rejected'" in capsys.readouterr().err
    assert fake_scorer == []  # the data are checked before any model is loaded


def test_rewardbench_skips_bad_rows_on_request(write_jsonl: Callable[..., str], fake_scorer: list[dict[str, Any]],
                                               tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Its hint said "or set data.on_error=skip", and that override gave the same error: rows could not be skipped."""
    from tests.engine.eval.conftest import bench_row

    rows: list[Any] = [bench_row(i, subset) for i, (subset, _, _) in enumerate(SCORED_ROWS)]
    path = write_jsonl(rows[:3] + [{"prompt": "q", "chosen": "a", "subset": "shp"}] + rows[3:], "bench.jsonl")
    assert _run(["rewardbench", "--checkpoint", "c", "--data", path]) == 1
    assert "line 4: field 'rejected'" in capsys.readouterr().err
    out = tmp_path / "report.json"
    for skip in (["--on-error", "skip"], ["data.on_error=skip"]):  # the override the old hint named works too
        assert _run(["rewardbench", "--checkpoint", "c", "--data", path, "--out", str(out), *skip]) == 0
        report = json.loads(out.read_text())
        assert report["pairs"] == 20 and report["correct"] == 13
        assert (report["bad_rows"]["records"], report["bad_rows"]["skipped"]) == (21, 1)
        assert "Bad rows left out (--on-error skip): 1 of 21 (first: " in capsys.readouterr().out
    assert fake_scorer[-1]["overrides"] == []  # not passed on to the model
    assert _run(["rewardbench", "--checkpoint", "c", "--data", path, "data.on_error=skp"]) == 1
    assert "field 'data.on_error': expected one of raise, skip, got 'skp'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"override 'run.train_steps=5': scoring reads only the model.\*, data.\*"):
        _run(["rewardbench", "--checkpoint", "c", "--data", path, "run.train_steps=5"])  # accepted and ignored


def test_parse_weights() -> None:
    assert parse_weights("helpfulness=0.65, correctness=0.8") == {"helpfulness": 0.65, "correctness": 0.8}
    for bad in ("helpfulness", "helpfulness=x", "=1", "a=nan", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_weights(bad)
