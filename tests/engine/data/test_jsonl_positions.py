"""JSON lines that are not JSON are reported at their own line and the column where parsing failed."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.data.errors import DataError
from engine.data.loaders import Unparsable, iter_records, parsed_records


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_a_bad_line_reports_its_real_column(tmp_path: Path, newline: str) -> None:
    path = tmp_path / "bad.jsonl"
    lines = ['{"prompt": "a"}', "", '{"prompt": "b" "x": 1}', '{"prompt": "c"', '{"prompt": "d"}']
    path.write_bytes(newline.join(lines).encode() + newline.encode())
    records = list(iter_records(str(path)))
    assert [where.number for where, _ in records] == [1, 3, 4, 5]  # the blank line 2 is skipped, not renumbered
    assert records[1][1] == Unparsable("Expecting ',' delimiter at column 16")
    assert records[2][1] == Unparsable("Expecting ',' delimiter at column 15")  # not "column 1" of the newline
    assert records[3][1] == {"prompt": "d"}


def test_parsed_records_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"\n')
    with pytest.raises(DataError) as error:
        list(parsed_records(str(path)))
    assert str(error.value).startswith(f"{path}, line 2: field '<json>': expected a valid JSON object, "
                                       "got \"Expecting ',' delimiter at column 15\"")
