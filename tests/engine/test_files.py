"""Files written whole or not at all (:mod:`engine.files`), the one writer behind configs, checkpoint pointers,
samples, reports and metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.files import atomic_open, write_json_lines_atomic, write_text_atomic


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "samples.jsonl"
    assert write_json_lines_atomic(path, iter([{"a": 1}, {"b": "é"}]), ensure_ascii=False) == 2
    assert path.read_text(encoding="utf-8") == '{"a": 1}\n{"b": "é"}\n'

    def rows():
        yield {"a": 2}
        raise RuntimeError("killed while writing")

    with pytest.raises(RuntimeError, match="killed while writing"):
        write_json_lines_atomic(path, rows())
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"a": 1}, {"b": "é"}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.jsonl"]


def test_text_and_bytes_replace_whole(tmp_path: Path) -> None:
    write_text_atomic(tmp_path / "latest", "step_0000001")
    write_text_atomic(tmp_path / "latest", "step_0000002")
    assert (tmp_path / "latest").read_text() == "step_0000002"
    with atomic_open(tmp_path / "model.bin", "wb") as handle:
        handle.write(b"\x00\x01")
    assert (tmp_path / "model.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "model.bin"]
