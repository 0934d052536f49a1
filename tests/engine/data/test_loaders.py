"""Source resolution: hub names go through datasets.load_dataset (faked here: no network)."""

from __future__ import annotations

from typing import Any

import pytest

from engine.data.errors import DataError
from engine.data.loaders import load_rows, parse_hub_source, write_jsonl
from engine.data.sources import load_rows as load_train_rows


def test_parse_hub_source() -> None:
    assert parse_hub_source("hf:nvidia/HelpSteer2") == ("nvidia/HelpSteer2", None, "train")
    assert parse_hub_source("hf:nvidia/HelpSteer2:validation") == ("nvidia/HelpSteer2", None, "validation")
    assert parse_hub_source("hf:nvidia/HelpSteer2/preference:train") == ("nvidia/HelpSteer2", "preference", "train")
    with pytest.raises(DataError, match="hf:<org>/<name>"):
        parse_hub_source("hf:HelpSteer2")


def test_hub_rows_stream_through_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls: list[tuple[str, dict[str, Any]]] = []

    def fake_load_dataset(name: str, **kwargs: Any) -> list[dict[str, Any]]:
        calls.append((name, kwargs))
        return [{"text": "one"}, {"text": ""}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(DataError, match=r"hf:org/set:test, row 2: field 'text'"):
        load_rows("hf:org/set:test", "text")
    assert calls == [("org/set", {"streaming": True, "data_dir": None, "split": "test"})]


def test_training_sources_honour_format_and_on_error(tmp_path: Any) -> None:
    path = str(tmp_path / "train.jsonl")
    write_jsonl([{"text": f"row {i}"} for i in range(20)] + [{"text": 5}], path)

    class Data:
        source, validation_source, format, num_samples, validation_fraction, on_error = (
            path, None, "text", 0, 0.1, "skip")

    train, valid = load_train_rows(Data(), seed=1)
    assert (len(train), len(valid)) == (18, 2)
    Data.on_error = "raise"
    with pytest.raises(DataError, match="line 21"):
        load_train_rows(Data(), seed=1)


def test_a_missing_file_is_named_without_blaming_data_source(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every reader of a file (rollout.prompts, keel data convert, ...) said "check data.source"."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as caught:
        load_rows("prompts/mine.jsonl", "prompts")
    assert "prompts/mine.jsonl" in str(caught.value) and f"a relative path starts from {tmp_path}" in str(caught.value)
    assert "data.source" not in str(caught.value)


def test_a_file_that_is_not_utf8_names_its_line_and_a_bom_is_read(tmp_path: Any) -> None:
    """A Latin-1 byte in one row was a UnicodeDecodeError traceback for the whole file (data.on_error=skip did
    not help), and a Windows export's byte-order mark made row 1 bad."""
    from engine.data.loaders import ReadStats

    good = b'{"text": "fine"}\n'
    lines = tmp_path / "rows.jsonl"
    lines.write_bytes(b"\xef\xbb\xbf" + good + b'{"text": "caf\xe9"}\n' + good)
    with pytest.raises(DataError) as error:
        load_rows(str(lines), "text")
    assert str(error.value).startswith(f"{lines}, line 2: field '<text>': expected UTF-8 text, got byte 0xe9 at "
                                       "column 14 (saved in another encoding, e.g. Latin-1 or cp1252: re-save the "
                                       "file as UTF-8)"), error.value
    stats = ReadStats()
    assert [r["text"] for r in load_rows(str(lines), "text", on_error="skip", stats=stats)] == ["fine", "fine"]
    assert stats.skipped == 1
    array = tmp_path / "rows.json"
    array.write_bytes(b'[{"text": "fine"},\n {"text": "caf\xe9"}]')
    with pytest.raises(DataError, match=r"rows.json, line 2: field '<text>': expected UTF-8 text, got byte 0xe9 "):
        load_rows(str(array), "text", on_error="skip")  # read at once: no row can be read
    array.write_bytes(b'\xef\xbb\xbf[{"text": "fine"}]')
    assert load_rows(str(array), "text") == [{"text": "fine"}]


def test_an_array_in_a_jsonl_file_says_to_name_it_json(tmp_path: Any) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('[{"text": "a"}, {"text": "b"}]\n')
    with pytest.raises(DataError, match=r"line 1: field '<row>': expected a JSON object \(a JSON array of rows is "
                                        r"read from a file named .json"):
        load_rows(str(path), "text")
    (tmp_path / "rows.json").write_text(path.read_text())
    assert len(load_rows(str(tmp_path / "rows.json"), "text")) == 2
