"""SFTDataset: templates, over-long policy, rows with no loss token, padding statistics."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from engine.data.packing import PackedSFTDataset
from engine.data.sft import SFTDataset, build_sft_dataset
from engine.data.tokenizers import ByteTokenizer

TOK = ByteTokenizer()


def _chat(user: str, reply: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}


def test_sample_layout_and_shift() -> None:
    data = SFTDataset([_chat("Hi", "Hello.")], TOK, 32)
    item = data[0]
    assert item["tokens"].shape == item["labels"].shape == item["loss_mask"].shape == (32,)
    assert item["tokens"][1:].tolist()[:20] == item["labels"].tolist()[:20]
    assert TOK.decode(item["labels"][item["loss_mask"].bool()].tolist()) == "Hello."  # + EOS (not decoded)
    assert data.collate([0, 0])["tokens"].shape == (2, 32)


def test_overlong_policy_and_prompt_too_long(caplog: pytest.LogCaptureFixture) -> None:
    rows = [_chat("Hi", "x" * 50), _chat("y" * 50, "z"), _chat("Hi", "ok")]
    with caplog.at_level(logging.WARNING):
        truncated = SFTDataset(rows, TOK, 32)
    assert len(truncated) == 2 and "dropped 1 of 3 rows with no loss token" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        dropped = SFTDataset(rows, TOK, 32, overlong="drop")
    assert len(dropped) == 1 and "longer than seq_length+1=33" in caplog.text
    with pytest.raises(ValueError, match="overlong"):
        SFTDataset(rows, TOK, 32, overlong="wrap")


@pytest.mark.parametrize("dataset", [SFTDataset, PackedSFTDataset])
def test_rows_cut_to_no_loss_token_do_not_fit_and_an_empty_set_says_why(
        dataset: type, caplog: pytest.LogCaptureFixture) -> None:
    """A row cut to seq_length + 1 that keeps no loss token did not fit: "all rows fit" is not logged beside
    "dropped N of N rows"; the empty set's error names the source, the count and the reason, and the remedy."""
    rows = [_chat("y" * 60, "ok")] * 3
    with caplog.at_level(logging.INFO):
        data = dataset(rows, TOK, 32, source="long.jsonl")
    assert len(data) == 0 and "rows fit" not in caplog.text, caplog.text
    assert "long.jsonl: dropped 3 of 3 rows with no loss token within seq_length=32" in caplog.text
    message = str(data.drops.empty_error())
    assert message.startswith("long.jsonl: ") and "all 3 rows were dropped (3 with no loss token within " \
        "seq_length=32: prompt too long)" in message and "raise data.seq_length" in message, message
    dropped = dataset([_chat("Hi", "x" * 60)], TOK, 32, overlong="drop", source="long.jsonl")
    assert "1 longer than seq_length+1=33 tokens" in str(dropped.drops.empty_error())


def test_templates_and_attributes(caplog: pytest.LogCaptureFixture) -> None:
    row = {**_chat("Hi", "Hello."), "attributes": {"helpfulness": 4}}
    with caplog.at_level(logging.WARNING, logger="engine.data.documents"):
        plain = SFTDataset([row], TOK, 96, source="steer.jsonl")
    # SteerLM rows under another template trained without their attributes, said only at INFO (a new-user trial)
    assert "steer.jsonl: rows carry SteerLM attributes, which only data.chat_template=nemotron writes into the " \
        "prompt: with data.chat_template=plain the model never sees them" in caplog.text, caplog.text
    steer = SFTDataset([row], TOK, 96, template="nemotron")
    assert "helpfulness:4" in TOK.decode(steer[0]["tokens"].tolist())
    assert "helpfulness" not in TOK.decode(plain[0]["tokens"].tolist())
    text = SFTDataset([{"text": "abc"}], TOK, 8, fmt="text")
    assert text[0]["loss_mask"].tolist()[:4] == [1, 1, 1, 1] and text.padding_stats()["padding_fraction"] == 0.5


def test_build_from_config_object() -> None:
    class Data:
        format, loss_on, chat_template, overlong, seq_length, pack = "chat", "all", "llama3", "truncate", 256, True

    data = build_sft_dataset([_chat("a", "b"), _chat("c", "d")], TOK, Data())
    assert type(data).__name__ == "PackedSFTDataset" and len(data) == 1


def test_truncated_rows_are_counted_per_source(caplog: pytest.LogCaptureFixture) -> None:
    """data.overlong's help says counts are logged per source; truncation used to be silent."""
    rows = [_chat("Hi", "x" * 50), _chat("Hi", "ok"), _chat("Hi", "y" * 60)]
    with caplog.at_level(logging.INFO):
        SFTDataset(rows, TOK, 32, source="chat.jsonl")
    assert "chat.jsonl: truncated 2 of 3 rows longer than seq_length+1=33 tokens to their first 33 " \
           "(data.overlong=truncate)" in caplog.text, caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        PackedSFTDataset(rows[1:2], TOK, 32, source="short.jsonl")
    assert "short.jsonl: all 1 rows fit seq_length+1=33 tokens" in caplog.text, caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        SFTDataset(rows, TOK, 32, overlong="drop", source="chat.jsonl")
    assert "chat.jsonl: dropped 2 of 3 rows longer than seq_length+1=33 tokens (data.overlong=drop)" in caplog.text


def test_sft_step_logs_the_counts_of_each_source(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from engine.algorithms.sft import CONFIG, create
    from engine.config import load_config

    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(_chat("Hi", "x" * (10 * i))) + "\n" for i in range(1, 11)))
    config = load_config(CONFIG, None, [f"data.source={path}", "data.seq_length=32", "data.validation_fraction=0.5"])
    with caplog.at_level(logging.INFO):
        create(config).build_datasets(config, TOK)
    assert caplog.text.count(f"{path}: truncated ") == 1 and f"{path} (validation): truncated " in caplog.text, \
        caplog.text


def test_sft_on_a_pairs_file_does_not_suggest_pairs(tmp_path: Path) -> None:
    from engine.algorithms.sft import CONFIG, create
    from engine.config import load_config
    from engine.data.errors import DataError

    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "a?", "chosen": "b", "rejected": "c"}) + "\n")
    config = load_config(CONFIG, None, [f"data.source={path}"])
    with pytest.raises(DataError, match=r"data.format=pairs, which this run does not train on") as err:
        create(config).build_datasets(config, TOK)
    assert "set data.format=pairs" not in str(err.value)
