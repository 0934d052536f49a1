"""``keel data label``: a regression RM's attributes onto SFT rows, the same on 1 and 2
data-parallel ranks, and resumed after the last complete chunk without changing the result."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from engine.checkpoint.dist import resolve
from engine.cli import main
from tests.helpers import keel_train, launch

RM = ["rm.type=regression", "run.train_steps=2", "data.num_samples=64", "data.seq_length=96",
      "data.micro_batch_size=2", "data.global_batch_size=4", "logging.progress=false", "logging.tensorboard=false",
      "checkpoint.resume=none"]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_label_matches_across_ranks_and_resumes(tmp_path: Path) -> None:
    keel_train(1, RM + [f"run.output_dir={tmp_path / 'rm'}"], algo="rm")
    checkpoint = str(tmp_path / "rm" / "checkpoints")
    source = tmp_path / "sft.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"The answer is {2 * i}." * (1 + i % 3)}]}
            for i in range(11)]
    rows.append({"prompt": "Spell cat backwards.", "response": "tac"})
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    cmd = ["-m", "engine", "data", "label", str(source)]
    launch(1, [*cmd, str(one), "--rm", checkpoint, "--chunk", "5", "--quiet"])
    launch(2, [*cmd, str(two), "--rm", checkpoint, "--chunk", "5", "--quiet"])
    labelled = _rows(one)
    assert len(labelled) == len(rows)
    for row, out in zip(rows, labelled, strict=True):
        assert {k: out[k] for k in row} == row
        names = [item.split(":")[0] for item in out["attributes"].split(",")]
        assert names == ["helpfulness", "correctness", "coherence", "complexity", "verbosity"]
        assert all(0 <= int(item.split(":")[1]) <= 4 for item in out["attributes"].split(","))
    for a, b in zip(labelled, _rows(two), strict=True):
        assert a["attributes"] == b["attributes"]
        for name, value in a["predicted"].items():
            assert abs(value - b["predicted"][name]) < 1e-3

    resumed = tmp_path / "resumed.jsonl"  # killed after its first chunk, in the middle of writing its second
    Path(f"{resumed}.partial").write_text("".join(json.dumps(r) + "\n" for r in labelled[:5]) + '{"messages": [')
    Path(f"{resumed}.partial.meta").write_text(json.dumps({"rm": str(resolve(checkpoint))}))
    proc = launch(1, [*cmd, str(resumed), "--rm", checkpoint, "--chunk", "5"])
    assert _rows(resumed) == labelled
    assert not Path(f"{resumed}.partial").exists() and not Path(f"{resumed}.partial.meta").exists()
    assert "labelled 12 rows" in proc.stdout


def test_label_names_the_bad_line(tmp_path: Path) -> None:
    source = tmp_path / "bad.jsonl"
    source.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    proc = launch(1, ["-m", "engine", "data", "label", str(source), str(tmp_path / "o.jsonl"), "--rm", "x"],
                  check=False)
    assert proc.returncode == 1, proc.stderr  # a data error (it was filed as a configuration error)
    assert "keel: data error: " in proc.stderr and "bad.jsonl, line 1: field 'messages[0].role'" in proc.stderr
    # before the (missing) checkpoint is read


def test_label_reads_the_rows_keel_train_sft_reads(tmp_path: Path) -> None:
    """TRL's prompt-completion rows, which keel train sft reads, were refused ("expected 'messages' (chat) or
    'prompt' and 'response' fields", as a configuration error)."""
    from engine.data.errors import DataError
    from engine.eval.label import read_rows

    source = tmp_path / "rows.jsonl"
    rows = [{"prompt": "Capital of France?", "completion": "Paris."}, {"prompt": "2 + 2?", "response": "4."},
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello."}]}]
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    read = read_rows(str(source))
    assert [(r.prompt[-1]["content"], r.response) for r in read] == [("Capital of France?", "Paris."),
                                                                      ("2 + 2?", "4."), ("Hi", "Hello.")]
    assert read[0].record == rows[0] and len(read[2].prompt) == 2  # the row is written back as it was read
    source.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(DataError, match=r"line 1: field '<row>': expected 'messages' \(chat\), or 'prompt' with "
                                        r"'response' or 'completion', got no such field \(the row has 'question'"):
        read_rows(str(source))


class _Scorer:
    """Stands in for a regression reward model: every response rated 3.2 on each attribute; a response longer
    than ``seq_length`` characters does not fit (NaN, as the real scorer gives)."""

    def __init__(self, seq_length: int = 64) -> None:
        names = ["helpfulness", "correctness", "coherence", "complexity", "verbosity"]
        self.step = SimpleNamespace(rm=SimpleNamespace(type="regression", attributes=names))
        self.parallel = SimpleNamespace(is_main=True, barrier=lambda: None)
        self.seq_length = seq_length
        self.scored: list[str] = []

    def fit(self, prompt: Any, response: str) -> Any:
        return None if len(response) > self.seq_length else ([0] * len(response), False)

    def score(self, pairs: list[Any]) -> torch.Tensor:
        self.scored += [response for _, response in pairs]
        return torch.tensor([[3.2] * 5 if self.fit(*pair) else [float("nan")] * 5 for pair in pairs])


def test_label_makes_the_output_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    import engine.eval.label
    import engine.eval.scoring

    made: list[bool] = []

    def load_scorer(checkpoint: str) -> _Scorer:
        made.append(output.parent.is_dir())  # before the model loads
        return _Scorer()

    monkeypatch.setattr(engine.eval.scoring, "load_scorer", load_scorer)
    monkeypatch.setattr(engine.eval.label, "_reward_model", lambda checkpoint: checkpoint)
    source, output = tmp_path / "sft.jsonl", tmp_path / "out2" / "x" / "l.jsonl"
    source.write_text(json.dumps({"prompt": "Say hi.", "response": "hi"}) + "\n")
    assert main(["data", "label", str(source), str(output), "--rm", "RM", "--quiet"]) == 0
    assert made == [True]
    assert _rows(output)[0]["attributes"] == "helpfulness:3,correctness:3,coherence:3,complexity:3,verbosity:3"
    assert not Path(f"{output}.partial").exists()

    assert main(["data", "label", str(source), str(output), "--rm", "RM", "--chunk", "0"]) == 2
    assert capsys.readouterr().err == "keel: configuration error: --chunk 0: must be at least 1\n"


def test_a_partial_of_another_input_or_reward_model_is_refused(tmp_path: Path) -> None:
    """The resume point was the partial file's line count: another input file's or reward model's labels were
    continued and mixed in."""
    from engine.config import ConfigError
    from engine.eval.label import labelled, resume_point
    from engine.files import PartialOutput

    names = ["helpfulness", "correctness", "coherence", "complexity", "verbosity"]
    rows = [({"prompt": f"q{i}", "response": f"a{i}", "attributes": "old"}, f"q{i}", f"a{i}") for i in range(3)]
    partial = tmp_path / "out.jsonl.partial"
    done = [json.dumps(labelled(row, [1.0] * 5, names)) for row, _, _ in rows[:2]]
    partial.write_text("\n".join(done) + "\n")
    Path(f"{partial}.meta").write_text(json.dumps({"rm": "/runs/rm/step_0000002"}))
    output = PartialOutput(tmp_path / "out.jsonl")
    assert [json.dumps(record) for record in resume_point(output, rows, "/runs/rm/step_0000002")] == done
    with pytest.raises(ConfigError, match="labelled by reward model /runs/rm/step_0000002, and this run's is /other"):
        resume_point(output, rows, "/other")
    other = [({"prompt": "z", "response": "y"}, "z", "y"), *rows[1:]]
    with pytest.raises(ConfigError, match=r"out.jsonl.partial, line 1: not row 1 of this input labelled"):
        resume_point(output, other, "/runs/rm/step_0000002")


def _story_rows(path: Path) -> list[dict[str, Any]]:
    """Six rows; lines 2 and 5 have a response longer than the stand-in's seq_length."""
    rows: list[dict[str, Any]] = []
    for i in range(6):
        story = "Once upon a time " * (20 if i in (1, 4) else 1)
        rows.append({"messages": [{"role": "user", "content": f"Tell me story {i}"},
                                  {"role": "assistant", "content": story}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_a_response_longer_than_seq_length_is_skipped_and_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """The scorer's NaN for a response that does not fit crashed labelling (``cannot convert float NaN to
    integer``) with nothing written, and a restart hit the same row."""
    import engine.eval.label
    import engine.eval.scoring

    scorer = _Scorer()
    monkeypatch.setattr(engine.eval.scoring, "load_scorer", lambda checkpoint: scorer)
    monkeypatch.setattr(engine.eval.label, "_reward_model", lambda checkpoint: checkpoint)
    source, output = tmp_path / "sft.jsonl", tmp_path / "labelled.jsonl"
    rows = _story_rows(source)
    assert main(["data", "label", str(source), str(output), "--rm", "RM", "--chunk", "2", "--quiet"]) == 0
    written = _rows(output)
    assert [out["messages"] for out in written] == [rows[i]["messages"] for i in (0, 2, 3, 5)]
    assert all(out["attributes"].startswith("helpfulness:3") for out in written)
    printed = capsys.readouterr().out
    assert "labelled 4 rows" in printed
    assert f"2 rows not labelled: the response alone is longer than the reward model's seq_length=64 " \
           f"(first: {source}, line 2)" in printed
    assert all(len(response) <= 64 for response in scorer.scored)  # the long rows are never scored

    resumed = tmp_path / "resumed.jsonl"  # killed after its first chunk (rows 1 and 3; row 2 skipped)
    Path(f"{resumed}.partial").write_text("".join(json.dumps(r) + "\n" for r in written[:2]))
    Path(f"{resumed}.partial.meta").write_text(json.dumps({"rm": "RM"}))
    scorer.scored.clear()
    assert main(["data", "label", str(source), str(resumed), "--rm", "RM", "--chunk", "2", "--quiet"]) == 0
    assert _rows(resumed) == written and len(scorer.scored) == 2  # only rows 4 and 6 scored again


def test_a_non_finite_prediction_of_a_row_that_fits_names_the_row(tmp_path: Path) -> None:
    from engine.config import ConfigError
    from engine.eval.label import label_file, read_rows

    class Broken(_Scorer):
        def score(self, pairs: list[Any]) -> torch.Tensor:
            return torch.full((len(pairs), 5), float("nan"))

    source = tmp_path / "sft.jsonl"
    _story_rows(source)
    with pytest.raises(ConfigError, match=r"sft.jsonl, line 1: the reward model predicted \[nan"):
        label_file(Broken(), read_rows(str(source)), str(tmp_path / "o.jsonl"), progress=False)


def test_a_bad_json_line_is_not_told_to_set_data_on_error(tmp_path: Path) -> None:
    """keel data label reads no data.on_error, yet the hint of an unparsable line suggested it."""
    from engine.data.errors import DataError
    from engine.eval.label import read_rows

    source = tmp_path / "sft.jsonl"
    source.write_text(json.dumps({"prompt": "q", "response": "a"}) + "\nnot json\n")
    with pytest.raises(DataError, match=r"sft\.jsonl, line 2: field '<json>'") as caught:
        read_rows(str(source))
    assert "data.on_error" not in str(caught.value) and str(caught.value).endswith("labels every row)")


def test_an_empty_or_missing_input_or_nothing_labelled_is_not_success(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """An empty input gave "labelled 0 rows" and exit 0; a missing one was told to "fix the row"; a file whose
    every response is too long for the reward model exited 0 with an empty output."""
    import engine.eval.label
    import engine.eval.scoring
    from engine.data.errors import DataError
    from engine.eval.label import read_rows

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=r"empty.jsonl: field '<rows>': expected at least one row, found none"):
        read_rows(str(empty))
    with pytest.raises(DataError, match=r"\(check keel data label's input argument\)$"):
        read_rows(str(tmp_path / "nope.jsonl"))
    monkeypatch.setattr(engine.eval.scoring, "load_scorer", lambda checkpoint: _Scorer())
    monkeypatch.setattr(engine.eval.label, "_reward_model", lambda checkpoint: checkpoint)
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "q", "response": "x" * 100}) + "\n")
    assert main(["data", "label", str(long), str(tmp_path / "o.jsonl"), "--rm", "RM", "--quiet"]) == 1
    assert "labelled 0 rows" in capsys.readouterr().out
