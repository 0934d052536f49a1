"""A mistyped ``builtin:`` source is a one-line error naming the built-in sets (or splits) there are; it was a
ValueError traceback of ~40 lines per rank (``keel train``, ``keel data synth --split``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.cli import main
from engine.data.errors import DataError
from engine.data.synthetic import BUILTIN, SPLITS, builtin_rows
from tests.helpers import launch


@pytest.mark.parametrize("name, names", [
    ("builtin:nope", [*BUILTIN, "got 'builtin:nope'"]),
    ("builtin:promts", ["builtin:prompts", "got 'builtin:promts'"]),
    ("builtin:helpsteer:evl", ["unknown split 'evl'", *SPLITS]),
    ("builtin:sft:eval", ["builtin:sft has no splits", "builtin:helpsteer"]),
])
def test_a_bad_builtin_name_is_a_data_error_naming_the_choices(name: str, names: list[str]) -> None:
    with pytest.raises(DataError) as err:
        builtin_rows(name, 2, 0)
    assert all(text in str(err.value) for text in names), err.value


def test_keel_data_synth_of_an_unsplit_set_says_so_in_one_line(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["data", "synth", "sft", str(tmp_path / "x.jsonl"), "--split", "eval"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "--split eval: sft has no splits" in err, err
    assert "splits are text, helpsteer" in err and ":eval" not in err  # the option, not a source name never written
    assert not (tmp_path / "x.jsonl").exists()


def test_keel_train_on_an_unknown_builtin_source_says_so_in_one_line(tmp_path: Path) -> None:
    proc = launch(1, ["-m", "engine", "train", "sft", "data.source=builtin:nope", "model.preset=tiny-llama",
                      "run.train_steps=1", "logging.progress=false", "logging.tensorboard=false",
                      "checkpoint.resume=none", f"run.output_dir={tmp_path}"], check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "keel: data error: builtin:nope: field '<source>': expected a built-in data set, one of builtin:sft" \
        in proc.stderr, proc.stderr[-2000:]
