"""validate_file: one streaming pass gives counts, tokens, a histogram and the problems."""

from __future__ import annotations

from typing import Any

import pytest

from engine.data.errors import DataError
from engine.data.tokenizers import ByteTokenizer
from engine.data.validate import validate_file

USER = {"role": "user", "content": "Hi"}


def test_summary_of_a_mixed_file(write_jsonl: Any) -> None:
    rows = [
        {"messages": [USER, {"role": "assistant", "content": "Hello."}]},
        {"messages": [USER, {"role": "assistant", "content": "x" * 100}]},  # over-long
        {"messages": [{"role": "user", "content": "y" * 80}, {"role": "assistant", "content": "z"}]},  # long prompt
        {"messages": [USER, USER]},  # bad
    ]
    path = write_jsonl(rows)
    summary = validate_file(path, "chat", ByteTokenizer(), 64)
    assert (summary["rows"], summary["valid"], summary["skipped"]) == (4, 3, 1)
    assert summary["overlong"] == 2 and summary["prompt_too_long"] == 1 and not summary["ok"]
    assert len(summary["problems"]) == 2 and "line 4" in summary["problems"][0] and path in summary["problems"][0]
    assert summary["problems"][1].startswith(f"{path}, line 3: ")  # the long prompt leaves nothing to learn
    # BOS + "User: Hi\n" + "Assistant: " + "Hello." + EOS
    assert summary["max_length"] == 1 + 9 + 11 + 100 + 1
    assert summary["tokens"] == (1 + 9 + 11 + 6 + 1) + summary["max_length"] + (1 + 6 + 80 + 1 + 11 + 1 + 1)
    assert sum(summary["histogram"].values()) == 3 and summary["histogram"][">63"] == 2
    with pytest.raises(DataError, match="line 4"):
        validate_file(path, "chat", "byte", 64, on_error="raise")


def test_clean_pairs_file_is_ok(write_jsonl: Any) -> None:
    rows = [{"prompt": "What is 1 + 1?", "chosen": "2.", "rejected": "3."}] * 3
    summary = validate_file(write_jsonl(rows), "pairs", "builtin-sp", 64, template="llama3")
    assert summary["ok"] and summary["valid"] == 3 and summary["tokens"] > 0


def test_all_rows_bad_is_reported_not_raised(write_jsonl: Any) -> None:
    summary = validate_file(write_jsonl([{"text": 3}]), "text", "byte", 32)
    assert not summary["ok"] and summary["valid"] == 0 and "all 1 rows were bad" in summary["problems"][-1]


def _verdict(summary: dict[str, Any]) -> tuple[Any, ...]:
    return (summary["overlong_policy"], summary["overlong"], summary["cut"], summary["dropped_by_policy"],
            summary["dropped_no_room"], summary["ok"])


def test_over_long_rows_are_judged_by_the_policy_training_applies(write_jsonl: Any) -> None:
    """An over-long SFT row that data.overlong=truncate keeps (cut) failed validation although training took it
    with a warning; a row training drops for want of room (its prompt fills the sequence) is the problem."""
    fits = {"messages": [USER, {"role": "assistant", "content": "Hello."}]}
    long_reply = {"messages": [USER, {"role": "assistant", "content": "x" * 100}]}
    long_prompt = {"messages": [{"role": "user", "content": "y" * 80}, {"role": "assistant", "content": "z"}]}
    kept = write_jsonl([fits, long_reply], "kept.jsonl")
    assert _verdict(validate_file(kept, "chat", "byte", 64)) == ("truncate", 1, 1, 0, 0, True)
    assert _verdict(validate_file(kept, "chat", "byte", 64, overlong="drop")) == ("drop", 1, 0, 1, 0, True)
    both = write_jsonl([fits, long_reply, long_prompt], "both.jsonl")
    summary = validate_file(both, "chat", "byte", 64)
    assert _verdict(summary) == ("truncate", 2, 1, 0, 1, False)
    # the row training drops is named (it was a count with "problems": [])
    assert summary["problems"] == [f"{both}, line 3: 101 tokens, 99 of them before the response: no room "
                                   "to learn within seq_length=64, so training drops it"], summary["problems"]
    assert _verdict(validate_file(both, "chat", "byte", 64, overlong="drop")) == ("drop", 2, 0, 2, 0, True)
    only_long = write_jsonl([long_reply], "only_long.jsonl")  # training refuses a source it drops whole
    assert _verdict(validate_file(only_long, "chat", "byte", 64, overlong="drop")) == ("drop", 1, 0, 1, 0, False)
    with pytest.raises(ValueError, match="--overlong cut_prompt: chat rows take truncate or drop"):
        validate_file(kept, "chat", "byte", 64, overlong="cut_prompt")


def test_reward_rows_keep_their_response_whole_and_fail_only_when_it_cannot_fit(write_jsonl: Any) -> None:
    long_prompt = {"prompt": "p" * 100, "chosen": "a", "rejected": "b"}  # the prompt is cut from the left
    long_response = {"prompt": "q", "chosen": "c" * 80, "rejected": "d"}  # no prompt cut makes room for it
    cut = write_jsonl([long_prompt], "cut.jsonl")
    assert _verdict(validate_file(cut, "pairs", "byte", 64)) == ("cut_prompt", 1, 1, 0, 0, True)
    both = write_jsonl([long_prompt, long_response], "both.jsonl")
    summary = validate_file(both, "pairs", "byte", 64)
    assert _verdict(summary) == ("cut_prompt", 2, 1, 0, 1, False)
    assert [p.split(": ", 1)[0] for p in summary["problems"]] == [f"{both}, line 2"], summary["problems"]
    assert summary["problems"][0].endswith("no room to learn within seq_length=64, so training drops it")
    assert _verdict(validate_file(both, "pairs", "byte", 64, overlong="drop")) == ("drop", 2, 0, 2, 0, False)
    three = write_jsonl([long_prompt, long_response, {"prompt": "s", "chosen": "e", "rejected": "f"}], "three.jsonl")
    assert _verdict(validate_file(three, "pairs", "byte", 64, overlong="drop")) == ("drop", 2, 0, 2, 0, True)
    prompts = write_jsonl([{"prompt": "r" * 100}], "prompts.jsonl")
    assert _verdict(validate_file(prompts, "prompts", "byte", 64, overlong="truncate")) == ("none", 1, 0, 0, 0, False)
