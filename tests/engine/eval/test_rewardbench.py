"""RewardBench-style report, with every expected number worked out by hand."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import pytest

from engine.data.errors import DataError
from engine.eval.rewardbench import (
    EXAMPLE_COUNTS,
    SECTIONS,
    ScoreError,
    calibration,
    evaluate,
    format_table,
    goodness_stats,
    load_rows,
)
from tests.engine.eval.conftest import SCORED_ROWS, bench_row

CHOSEN = [c for _, c, _ in SCORED_ROWS]
REJECTED = [r for _, _, r in SCORED_ROWS]


def test_weight_table_matches_rewardbench_0_1_4() -> None:
    assert len(EXAMPLE_COUNTS) == 23
    assert SECTIONS["Safety"]["xstest-should-refuse"] == 154 and SECTIONS["Safety"]["xstest-should-respond"] == 250
    code = [n for s, n in SECTIONS["Reasoning"].items() if s.startswith("hep-")]
    assert code == [164] * 6 and SECTIONS["Reasoning"]["math-prm"] == sum(code) == 984


def test_report_numbers_by_hand(bench_file: str) -> None:
    rows = load_rows(bench_file)
    report = evaluate(rows, CHOSEN, REJECTED)
    subsets = report["subsets"]
    assert {name: (e["correct"], e["count"]) for name, e in subsets.items()} == {
        "alpacaeval-easy": (1, 2), "alpacaeval-length": (1, 1), "mt-bench-easy": (1, 2),
        "mt-bench-hard": (0, 1), "llmbar-natural": (2, 2),
        "xstest-should-refuse": (1, 1), "xstest-should-respond": (1, 2),
        "math-prm": (2, 2), "hep-python": (0, 1), "hep-go": (1, 2),
        "shp": (1, 2), "anthropic_harmless": (1, 1), "my-own-set": (1, 1),
    }
    assert subsets["mt-bench-easy"]["ties"] == 1 and report["ties"] == 1  # the tie counts as incorrect

    chat = (100 * 0.5 + 95 * 1.0 + 28 * 0.5) / (100 + 95 + 28)            # = 159 / 223
    chat_hard = (37 * 0.0 + 100 * 1.0) / (37 + 100)                        # = 100 / 137
    safety = (154 * 1.0 + 250 * 0.5) / (154 + 250)                         # = 279 / 404
    reasoning = (984 * 1.0 + 164 * 0.0 + 164 * 0.5) / (984 + 164 + 164)    # = 1066 / 1312
    sections = report["sections"]
    assert sections["Chat"]["score"] == pytest.approx(chat)
    assert sections["Chat Hard"]["score"] == pytest.approx(chat_hard)
    assert sections["Safety"]["score"] == pytest.approx(safety)
    assert sections["Reasoning"]["score"] == pytest.approx(reasoning)
    assert sections["Reasoning"]["weights"] == pytest.approx({"math-prm": 984 / 1312, "hep-go": 164 / 1312,
                                                              "hep-python": 164 / 1312})
    assert report["sections_absent"] == []
    assert report["overall"] == pytest.approx((chat + chat_hard + safety + reasoning) / 4)
    assert "4 sections" in report["overall_note"]

    # Prior Sets: only shp of the four scored prior sets is present; harmless is listed, not scored
    assert report["prior_sets"]["score"] == pytest.approx(0.5)
    assert report["prior_sets"]["subsets_in_score"] == ["shp"]
    assert subsets["anthropic_harmless"]["group"] == "Prior Sets"
    # the unknown subset is "other": counted and reported, in no section
    assert subsets["my-own-set"]["group"] == "other"
    assert report["other"] == {"pairs": 1, "subsets": ["my-own-set"], "note": report["other"]["note"]}
    assert (report["pairs"], report["correct"]) == (20, 13) and report["accuracy"] == pytest.approx(13 / 20)
    json.dumps(report)  # JSON-ready

    table = format_table(report)
    assert f"{100 * chat:5.1f}" in table and "my-own-set" in table and "count as incorrect" in table


def test_absent_sections_and_overall_note() -> None:
    rows = [bench_row(0, "alpacaeval-easy"), bench_row(1, "donotanswer"), bench_row(2, "donotanswer")]
    report = evaluate(rows, [1.0, 1.0, 0.0], [0.0, 0.0, 1.0])
    assert set(report["sections"]) == {"Chat", "Safety"}
    assert report["sections_absent"] == ["Chat Hard", "Reasoning"]
    assert report["overall"] == pytest.approx((1.0 + 0.5) / 2)
    assert "2 of 4 sections" in report["overall_note"] and "Chat Hard, Reasoning" in report["overall_note"]
    assert report["prior_sets"]["score"] is None
    assert "absent" in format_table(report)

    only_other = evaluate([bench_row(0, "mine")], [1.0], [0.0])
    assert only_other["overall"] is None and only_other["sections"] == {}


def test_missing_field_names_file_line_and_field(write_jsonl: Callable[..., str]) -> None:
    path = write_jsonl([bench_row(0, "shp"), {"prompt": "q", "rejected": "r", "subset": "shp"}], "bad.jsonl")
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2: field 'chosen'") as caught:
        load_rows(path)
    assert caught.value.row == 2 and caught.value.field == "chosen"
    with pytest.raises(DataError, match=r"line 1: field '<json>'"):
        load_rows(write_jsonl(["{not json"], "broken.jsonl"))
    with pytest.raises(DataError, match=r"line 1: field 'prompt\[0\].role'"):
        load_rows(write_jsonl([{"prompt": [{"role": "bot", "content": "x"}], "chosen": "a", "rejected": "b"}],
                              "roles.jsonl"))


def test_rows_normalised_and_unknown_subsets_kept(write_jsonl: Callable[..., str]) -> None:
    messages = [{"role": "user", "content": "hi"}]
    path = write_jsonl([
        {"prompt": messages, "chosen": messages + [{"role": "assistant", "content": "hello"}], "rejected": "go away",
         "subset": "custom"},
        {"prompt": "q", "chosen": "a", "rejected": "b"},  # no subset
    ], "bench.jsonl")
    rows = load_rows(path)
    assert rows[0]["chosen"] == "hello" and rows[0]["prompt"] == messages
    assert rows[0]["_where"].endswith("bench.jsonl, line 1")
    report = evaluate(rows, [1.0, 1.0], [0.0, 0.0])
    assert report["other"]["pairs"] == 2 and report["other"]["subsets"] == ["(no subset)", "custom"]


def test_non_finite_score_names_the_row(bench_file: str) -> None:
    rows = load_rows(bench_file)
    chosen = list(CHOSEN)
    chosen[6] = math.nan
    with pytest.raises(ScoreError, match=r"row 7 \(.*bench\.jsonl, line 7, subset 'llmbar-natural'\): the chosen "
                                         r"score is nan"):
        evaluate(rows, chosen, REJECTED)
    rejected = list(REJECTED)
    rejected[0] = math.inf
    with pytest.raises(ScoreError, match=r"row 1 .*rejected score is inf"):
        evaluate(rows, CHOSEN, rejected)
    with pytest.raises(ScoreError, match="20 rows but 19 chosen"):
        evaluate(rows, CHOSEN[:-1], REJECTED)


def test_calibration_by_hand() -> None:
    names = ["helpfulness", "correctness", "verbosity"]
    pred = [[1.0, 3.0, 0.0], [2.0, 3.0, 1.0], [3.0, 0.0, 2.0]]
    true = [[1.0, -100, -100], [3.0, 3.0, -100], [2.0, 1.0, -100]]
    stats = calibration(pred, true, names)
    # helpfulness: x = 1, 2, 3 (mean 2); y = 1, 3, 2 (mean 2)
    #   cov = (-1)(-1) + 0*1 + 1*0 = 1, var_x = 2, var_y = 2 -> r = 1 / sqrt(2 * 2) = 0.5
    #   mse = (0^2 + 1^2 + 1^2) / 3 = 2/3; baseline ((1-2)^2 + (3-2)^2 + 0) / 3 = 2/3
    assert stats["helpfulness"] == pytest.approx({"pearson": 0.5, "mse": 2 / 3, "mse_of_mean": 2 / 3, "count": 3})
    # correctness (row 1 missing): x = 3, 0; y = 3, 1 -> two points on a rising line, r = 1
    #   mse = (0^2 + 1^2) / 2 = 0.5; baseline mean 2: ((3-2)^2 + (1-2)^2) / 2 = 1
    assert stats["correctness"] == pytest.approx({"pearson": 1.0, "mse": 0.5, "mse_of_mean": 1.0, "count": 2})
    assert stats["verbosity"] == {"pearson": None, "mse": None, "mse_of_mean": None, "count": 0}
    with pytest.raises(ScoreError, match="row 2, attribute 'helpfulness'"):
        calibration([[1.0], [math.nan]], [[1.0], [2.0]], ["helpfulness"])


def test_goodness_stats() -> None:
    # mean (1+2+3+4)/4 = 2.5; population variance (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25
    assert goodness_stats([1.0, 2.0, 3.0, 4.0]) == pytest.approx({"mean": 2.5, "std": math.sqrt(1.25), "count": 4})
    with pytest.raises(ScoreError, match="row 2"):
        goodness_stats([1.0, math.nan])
    with pytest.raises(ValueError):
        goodness_stats([])


def test_cross_prompt_leaves_out_pairs_of_the_same_prompt() -> None:
    from engine.eval.rewardbench import cross_prompt

    # two prompts with a per-prompt offset of 10: each pair is right within its prompt, but prompt B's
    # rejected responses outscore prompt A's chosen ones
    rows = [{"prompt": "A"}, {"prompt": "A"}, {"prompt": "B"}]
    chosen, rejected = [1.0, 2.0, 12.0], [0.0, 0.5, 11.0]
    cross = cross_prompt(rows, chosen, rejected)
    # different-prompt comparisons: A's chosen (1, 2) vs B's rejected 11 -> 0/2; B's chosen 12 vs A's (0, 0.5) -> 2/2
    assert cross["comparisons"] == 4 and cross["accuracy"] == pytest.approx(2 / 4)
    assert cross["within_prompt_accuracy"] == 1.0


def test_attribute_calibration_of_labelled_pairs() -> None:
    from engine.eval.rewardbench import attribute_calibration

    rows = [{"chosen_helpfulness": 4, "rejected_helpfulness": 1}, {"chosen_helpfulness": 3}]
    attributes = {"names": ["helpfulness"], "chosen": [[3.5], [3.0]], "rejected": [[1.5], [9.0]]}
    stats = attribute_calibration(rows, attributes)
    assert stats is not None and stats["helpfulness"]["count"] == 3  # row 2's rejected has no label
    assert stats["helpfulness"]["mse"] == pytest.approx((0.25 + 0.25 + 0.0) / 3)
    assert attribute_calibration([{"prompt": "p"}, {"prompt": "q"}], attributes) is None
    assert attribute_calibration(rows, None) is None


def test_bad_rows_hint_names_what_rewardbench_reads_and_skip_counts_them(write_jsonl: Callable[..., str]) -> None:
    """The hint of a bad conversation said "or set data.on_error=skip", which keel eval rewardbench never read."""
    from engine.data.loaders import ReadStats

    bad_turns = {"prompt": "q", "chosen": [{"role": "user", "content": "x"}], "rejected": "b", "subset": "shp"}
    path = write_jsonl([bench_row(0, "shp"), bad_turns, "{not json", bench_row(3, "shp")], "mixed.jsonl")
    with pytest.raises(DataError, match=r"mixed\.jsonl, line 2: field 'chosen\[0\]\.role'") as caught:
        load_rows(path)
    assert "--on-error skip" in str(caught.value) and "data.on_error" not in str(caught.value)
    stats = ReadStats(path)
    rows = load_rows(path, "skip", stats)
    assert [row["_where"].rsplit(" ", 1)[1] for row in rows] == ["1", "4"]
    assert (stats.records, stats.skipped, stats.valid) == (4, 2, 2)
    assert stats.problems[0].endswith("mixed.jsonl, line 2: field 'chosen[0].role': expected the conversation to "
                                      "end with an 'assistant' turn, got 'user'")
    assert "line 3: field '<json>'" in stats.problems[1]
    with pytest.raises(DataError, match=r"all 2 rows were bad"):
        load_rows(write_jsonl([bad_turns, bad_turns], "all_bad.jsonl"), "skip")
