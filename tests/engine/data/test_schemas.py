"""Every row format on valid and invalid rows; errors name the file, the row and the field."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from engine.data.errors import DataError
from engine.data.loaders import ReadStats, iter_rows, load_rows
from engine.data.schemas import MISSING, check_row

USER = {"role": "user", "content": "What is 2 + 2?"}
ASSISTANT = {"role": "assistant", "content": "4."}
RATINGS = {"helpfulness": 4, "correctness": 4, "coherence": 4, "complexity": 1, "verbosity": 0}

GOOD = {
    "chat": {"messages": [{"role": "system", "content": "Be brief."}, USER, ASSISTANT]},
    "text": {"text": "hello"},
    "attributes": {"prompt": "What is 2 + 2?", "response": "4.", **RATINGS},
    "helpsteer2_preference": {"prompt": "p", "response_1": "a", "response_2": "b", "preference_strength": -2,
                              "individual_preference": [{"score": -2}, {"score": -1}, {"score": -3}]},
    "pairs": {"prompt": [USER], "chosen": "4.", "rejected": "5.", "margin": 2, "subset": "math"},
    "prompts": {"prompt": "What is 2 + 2?", "attributes": "helpfulness:4,verbosity:2"},
}

USER_HI, ASSISTANT_HELLO = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}

# (format, bad row, field named in the error, words of the expectation)
BAD = [
    ("chat", {"messages": [USER, {"role": "bot", "content": "x"}]}, "messages[1].role", "system/user/assistant"),
    ("chat", {"messages": [USER, USER, ASSISTANT]}, "messages[1].role", "alternate"),
    ("chat", {"messages": [USER, ASSISTANT, {"role": "system", "content": "x"}, ASSISTANT]}, "messages[2].role",
     "first turn"),
    ("chat", {"messages": [ASSISTANT]}, "messages[0].role", "starting with user"),
    ("chat", {"messages": [USER]}, "messages[0].role", "end with an 'assistant'"),
    ("chat", {"messages": [USER, {"role": "assistant", "content": 4}]}, "messages[1].content", "a string"),
    ("chat", {"messages": []}, "messages", "non-empty list"),
    ("chat", {"conversation": []}, "messages", "got no such field (the row has 'conversation')"),
    ("chat", {"conversations": [{"from": "human", "value": "hi"}]}, "messages[0].role", "end with an 'assistant'"),
    ("chat", {"conversations": [{"from": "bot", "value": "hi"}]}, "conversations[0].from", "one of assistant, "),
    ("chat", {"mask": "Assistant", "conversations": [{"from": "User", "value": "hi"}]}, "mask", "'User'"),
    ("chat", {"conversations": [{"from": "User", "value": "a"}, {"from": "Assistant", "value": "b", "label": "verbosity:1"},
                                {"from": "User", "value": "c"}, {"from": "Assistant", "value": "d", "label": "verbosity:4"}]},
     "conversations[].label", "one set of attributes"),
    ("pairs", {"prompt": "p", "chosen_response": "a", "rejected_response": "b"}, "chosen",
     "rename chosen_response and rejected_response to chosen and rejected"),
    ("text", {"txt": "hello"}, "text", "a string"),
    ("text", {"text": "   "}, "text", "non-empty"),
    ("attributes", {**GOOD["attributes"], "correctness": 5}, "correctness", "0..4"),
    ("attributes", {**GOOD["attributes"], "verbosity": -1}, "verbosity", "0..4"),
    ("attributes", {**GOOD["attributes"], "coherence": "4"}, "coherence", "0..4"),
    ("attributes", {**GOOD["attributes"], "helpfulness": True}, "helpfulness", "0..4"),
    ("attributes", {"prompt": "p", "response": "r"}, "helpfulness", "at least one rating"),
    ("attributes", {"response": "r", **RATINGS}, "prompt", "a string"),
    ("helpsteer2_preference", {**GOOD["helpsteer2_preference"], "preference_strength": 4}, "preference_strength",
     "-3..3"),
    ("helpsteer2_preference", {**GOOD["helpsteer2_preference"], "response_2": "a"}, "response_2", "different"),
    ("helpsteer2_preference", {**GOOD["helpsteer2_preference"], "individual_preference": [1, 9]},
     "individual_preference[1]", "-3..3"),
    ("pairs", {**GOOD["pairs"], "rejected": "4."}, "rejected", "different from chosen"),
    ("pairs", {**GOOD["pairs"], "margin": "big"}, "margin", "a number"),
    ("pairs", {**GOOD["pairs"], "prompt": [USER, ASSISTANT]}, "prompt[1].role", "end with a 'user'"),
    ("pairs", {"prompt": "p", "chosen": "a"}, "rejected", "a string"),
    ("prompts", {"prompt": "p", "attributes": {"humour": 3}}, "attributes.humour", "an attribute among"),
    ("prompts", {"prompt": "p", "attributes": "helpfulness=4"}, "attributes", "name:value"),
    ("prompts", {"question": "p"}, "prompt", "a string"),
]


@pytest.mark.parametrize("fmt", sorted(GOOD))
def test_valid_rows_pass(fmt: str, write_jsonl: Any) -> None:
    path = write_jsonl([GOOD[fmt], GOOD[fmt]])
    assert len(load_rows(path, fmt)) == 2


@pytest.mark.parametrize("fmt,bad,field,expected", BAD, ids=[f"{b[0]}-{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_row_names_file_line_and_field(fmt: str, bad: dict[str, Any], field: str, expected: str,
                                           write_jsonl: Any) -> None:
    path = write_jsonl([GOOD[fmt], "", bad])  # the blank line still counts: the bad row is line 3
    with pytest.raises(DataError) as info:
        load_rows(path, fmt)
    message = str(info.value)
    assert path in message and "line 3" in message and f"field '{field}'" in message and expected in message
    assert (info.value.row, info.value.field) == (3, field)


def test_skip_counts_and_logs_bad_rows(write_jsonl: Any, caplog: pytest.LogCaptureFixture) -> None:
    path = write_jsonl([GOOD["chat"], {"messages": [USER]}, "{not json", [1, 2], GOOD["chat"]])
    stats = ReadStats()
    with caplog.at_level(logging.WARNING):
        rows = load_rows(path, "chat", on_error="skip", stats=stats)
    assert len(rows) == 2 and (stats.records, stats.valid, stats.skipped) == (5, 2, 3)
    assert "line 3" in stats.problems[1] and "'<json>'" in stats.problems[1]
    assert "line 4" in stats.problems[2] and "'<row>'" in stats.problems[2]
    assert "skipped 3 of 5 rows" in caplog.text


def test_malformed_json_line_is_reported(write_jsonl: Any) -> None:
    path = write_jsonl([GOOD["text"], '{"text": "unterminated'])
    with pytest.raises(DataError, match=r"line 2: field '<json>': expected a valid JSON object"):
        load_rows(path, "text")


def test_empty_and_all_bad_data_sets(write_jsonl: Any, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="at least one row, found none"):
        load_rows(write_jsonl(["", ""], "empty.jsonl"), "chat")
    with pytest.raises(DataError, match="all 1 rows were bad"):
        load_rows(write_jsonl([{"text": ""}], "bad.jsonl"), "text", on_error="skip")
    with pytest.raises(DataError, match="an existing file"):
        load_rows(str(tmp_path / "missing.jsonl"), "chat")


def test_missing_ratings_become_the_sentinel() -> None:
    row = check_row("attributes", {"prompt": "p", "response": "r", "helpfulness": 3, "verbosity": None})
    assert row["helpfulness"] == 3 and row["verbosity"] == row["correctness"] == MISSING
    assert check_row("attributes", {**GOOD["attributes"], "coherence": 2.0})["coherence"] == 2


def test_normal_forms() -> None:
    pref = check_row("helpsteer2_preference", GOOD["helpsteer2_preference"])
    assert pref["individual_preference"] == [-2, -1, -3]
    pair = check_row("pairs", {"prompt": USER["content"], "chosen": [USER, ASSISTANT], "rejected": "no", "margin": 1})
    assert pair["chosen"] == "4." and pair["margin"] == 1.0 and pair["prompt"] == USER["content"]
    # TRL's conversational preference rows: the prompt's turns, and each reply's own turn alone
    trl = check_row("pairs", {"prompt": [USER], "chosen": [ASSISTANT], "rejected": [{**ASSISTANT, "content": "5."}]})
    assert (trl["chosen"], trl["rejected"]) == ("4.", "5.")
    prompt = check_row("prompts", GOOD["prompts"])
    assert prompt["attributes"] == {"helpfulness": 4, "verbosity": 2}


def test_pairs_of_whole_conversations_keep_their_context() -> None:
    """chosen/rejected as whole conversations kept only the last reply: the turns before it were dropped, so a
    multi-turn pair trained without its context, and a prompt that contradicted them was accepted. TRL's
    implicit-prompt rows (no prompt) were refused."""
    story = [{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": "Once upon a time."},
             {"role": "user", "content": "Shorter"}]
    row = {"chosen": [*story, {"role": "assistant", "content": "ok"}],
           "rejected": [*story, {"role": "assistant", "content": "no"}]}
    implicit = check_row("pairs", row)
    assert (implicit["prompt"], implicit["chosen"], implicit["rejected"]) == (story, "ok", "no")
    assert check_row("pairs", {**row, "prompt": story})["prompt"] == story  # the same context, said twice
    with pytest.raises(DataError, match=r"field 'chosen': expected a reply, or a whole conversation whose turns "
                                        r"before the reply are the prompt's .* got .a conversation of 3 earlier turns"):
        check_row("pairs", {**row, "prompt": "Shorter"})  # the last turn only: which context is meant?
    with pytest.raises(DataError, match=r"field 'rejected': expected a conversation whose turns before the reply "
                                        r"are chosen's"):
        check_row("pairs", {**row, "rejected": [story[0], {"role": "assistant", "content": "no"}]})
    with pytest.raises(DataError, match=r"field 'prompt': expected a string or a list of turns .*or chosen and "
                                        r"rejected as whole conversations"):
        check_row("pairs", {"chosen": "ok", "rejected": "no"})


def test_json_array_rows_are_numbered(tmp_path: Path) -> None:
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([GOOD["attributes"], {**GOOD["attributes"], "complexity": 7}]))
    with pytest.raises(DataError, match=r"rows\.json, row 2: field 'complexity'"):
        load_rows(str(path), "attributes")
    # mixed types defeat Arrow's schema inference: the file is re-read with json, the row still named
    path.write_text(json.dumps([GOOD["attributes"], {**GOOD["attributes"], "complexity": "seven"}]))
    with pytest.raises(DataError, match=r"rows\.json, row 2: field 'complexity'"):
        load_rows(str(path), "attributes")


def test_parquet_rows_are_numbered(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = str(tmp_path / "pairs.parquet")
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "c", "rejected": "c"}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert list(iter_rows(path, "pairs", on_error="skip"))[0]["chosen"] == "a"
    with pytest.raises(DataError, match=r"pairs\.parquet, row 2: field 'rejected'"):
        load_rows(path, "pairs")


def test_builtin_sources_validate() -> None:
    for name, fmt in [("builtin:sft", "chat"), ("builtin:helpsteer", "attributes"), ("builtin:pairs", "pairs"),
                      ("builtin:helpsteer2_preference", "helpsteer2_preference"), ("builtin:prompts", "prompts"),
                      ("builtin:steerlm_prompts", "prompts"), ("builtin:text", "text")]:
        assert len(load_rows(name, fmt, num=20, seed=3)) == 20


def test_a_row_of_another_format_says_which_format_it_has() -> None:
    """A pairs file read with the DPO/RM default format (attributes) said only "field 'response': missing"."""
    from engine.data.errors import Where

    pair = {"prompt": "a?", "chosen": "b", "rejected": "c"}
    with pytest.raises(DataError, match=r"pairs.jsonl, line 3: field 'response'.*set data.format=pairs"):
        check_row("attributes", pair, Where("pairs.jsonl", 3))
    with pytest.raises(DataError, match=r"set data.format=chat"):
        check_row("text", {"messages": []}, Where("sft.jsonl", 1))
    with pytest.raises(DataError) as plain:  # nothing to guess from: the message as before
        check_row("pairs", {"prompt": "a?"}, Where("p.jsonl", 1))
    assert "data.format=" not in str(plain.value)


def test_the_format_hint_names_only_formats_the_run_trains_on() -> None:
    """SFT on a pairs file said "set data.format=pairs", which SFT then refused; DPO on a chat file said
    "set data.format=chat", which DPO refuses."""
    from engine.data.errors import Where

    pair = {"prompt": "a?", "chosen": "b", "rejected": "c"}
    with pytest.raises(DataError) as sft:
        check_row("chat", pair, Where("pairs.jsonl", 1), formats=("chat", "text"))
    assert "set data.format" not in str(sft.value), sft.value
    assert "the row has the fields of data.format=pairs, which this run does not train on; it reads 'chat' or " \
           "'text'" in str(sft.value), sft.value
    chat = {"messages": [USER, ASSISTANT]}
    with pytest.raises(DataError, match=r"data.format=chat, which this run does not train on; it reads 'pairs', "
                                        r"'attributes' or 'helpsteer2_preference'"):
        check_row("attributes", chat, Where("chat.jsonl", 1), formats=("pairs", "attributes", "helpsteer2_preference"))
    with pytest.raises(DataError, match=r"set data.format=pairs"):  # a format the run reads is still suggested
        check_row("attributes", pair, Where("pairs.jsonl", 1), formats=("pairs", "attributes"))


def test_load_rows_passes_the_formats_on(tmp_path: Path) -> None:
    from engine.data.sources import load_rows as load_source_rows
    from engine.data.sources import paired_rows

    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "a?", "chosen": "b", "rejected": "c"}) + "\n")

    class Data:
        source, validation_source, format, num_samples, on_error, validation_fraction = \
            str(path), None, "chat", 8, "raise", 0.0

    with pytest.raises(DataError, match=r"which this run does not train on; it reads 'chat' or 'text'"):
        load_source_rows(Data(), 0, formats=("chat", "text"))
    Data.format = "attributes"
    with pytest.raises(DataError, match=r"which this run does not train on; it reads 'attributes'"):
        paired_rows(Data(), 0, formats=("attributes",))


def test_a_single_exchange_is_a_chat_row_and_trains_steerlm(tmp_path: Path) -> None:
    """`keel data label` writes {prompt, response, attributes} for SteerLM; `keel train sft
    data.chat_template=nemotron` then refused every row for lacking 'messages'. TRL's prompt-completion rows
    read the same way; a row with a messages list is read as it was."""
    from engine.data.documents import render_row
    from engine.data.tokenizers import ByteTokenizer

    labelled = {"prompt": "Say hi.", "response": "Hi!", "attributes": {"helpfulness": 4, "verbosity": 1}, "id": 7}
    row = check_row("chat", labelled)
    assert row["messages"] == [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]
    assert row["attributes"] == {"helpfulness": 4, "verbosity": 1} and row["id"] == 7
    turns = [{"role": "system", "content": "Be brief."}, USER]
    assert check_row("chat", {"prompt": turns, "completion": "ok"})["messages"] == [
        *turns, {"role": "assistant", "content": "ok"}]
    # TRL's conversational prompt-completion (the completion its own assistant turn) was refused: "expected a string"
    conversational = {"prompt": [USER], "completion": [{"role": "assistant", "content": "1."}]}
    assert check_row("chat", conversational)["messages"] == [USER, {"role": "assistant", "content": "1."}]
    with pytest.raises(DataError, match=r"field 'completion\[0\].role'"):
        check_row("chat", {"prompt": [USER], "completion": [{"role": "user", "content": "1."}]})
    assert check_row("chat", {"messages": [USER, ASSISTANT], "prompt": "x", "response": "y"})["messages"] == \
        [USER, ASSISTANT]
    ids, mask = render_row(row, ByteTokenizer(), "chat", "nemotron")
    text = ByteTokenizer().decode(ids)
    trained = ByteTokenizer().decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert "helpfulness:4" in text and "Say hi." in text and trained.startswith("Hi!"), (text, trained)
    with pytest.raises(DataError, match=r"field 'response': expected a non-empty string"):
        check_row("chat", {"prompt": "Say hi.", "response": " "})


def test_sharegpt_and_nemo_aligner_conversations_are_chat_rows() -> None:
    """ShareGPT's and NeMo-Aligner's conversations rows were refused with advice to rewrite them."""
    sharegpt = {"id": 7, "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    assert check_row("chat", sharegpt) == {"id": 7, "messages": [USER_HI, ASSISTANT_HELLO]}
    nemo = {"system": "Be brief.", "mask": "User", "type": "VALUE_TO_TEXT", "conversations": [
        {"from": "User", "value": "Hi", "label": None},
        {"from": "Assistant", "value": "Hello", "label": "quality:4,toxicity:0,helpfulness:3,verbosity:1"}]}
    row = check_row("chat", nemo)
    assert row["messages"] == [{"role": "system", "content": "Be brief."}, USER_HI, ASSISTANT_HELLO]
    assert row["attributes"] == {"helpfulness": 3, "verbosity": 1}  # SteerLM v1's quality and toxicity are not Keel's
    nemo["conversations"][1]["label"] = {"helpfulness": 2, "quality": 4}  # a dict label reads the same
    assert check_row("chat", nemo)["attributes"] == {"helpfulness": 2}
