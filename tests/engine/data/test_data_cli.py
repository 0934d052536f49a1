"""The ``keel data`` sub-commands, mounted on a bare argparse parser."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from engine.data.cli import register


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="keel data")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_synth_validate_convert(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ratings = str(tmp_path / "helpsteer.jsonl")
    assert _run(["synth", "helpsteer", ratings, "--num", "40", "--seed", "1"]) == 0
    assert _run(["validate", ratings, "--format", "attributes", "--seq-length", "512"]) == 0
    assert "40 valid of 40 rows" in capsys.readouterr().out
    dpo = str(tmp_path / "dpo.jsonl")
    assert _run(["convert-helpsteer2-dpo", ratings, dpo]) == 0
    assert _run(["validate", dpo, "--format", "pairs", "--json", "--seq-length", "512"]) == 0
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1])["ok"]
    steer = str(tmp_path / "steer.jsonl")
    assert _run(["convert-steerlm", ratings, steer]) == 0
    assert _run(["validate", steer, "--template", "nemotron", "--seq-length", "1024"]) == 0
    prefs = str(tmp_path / "prefs.jsonl")
    assert _run(["synth", "builtin:helpsteer2_preference", prefs, "--num", "30"]) == 0
    assert _run(["convert-helpsteer2-preference-bt", prefs, str(tmp_path / "bt.jsonl")]) == 0


def test_synth_writes_a_split(tmp_path: Path) -> None:
    from engine.data.synthetic import helpsteer_rows

    path = tmp_path / "eval.jsonl"
    assert _run(["synth", "helpsteer", str(path), "--num", "20", "--seed", "3", "--split", "eval"]) == 0
    assert [json.loads(line) for line in path.read_text().splitlines()] == helpsteer_rows(20, 3, "eval")


def test_synth_refuses_no_rows_and_validate_names_a_directory(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """--num -3 wrote an empty file with exit 0; a directory given as data said 'no such file'."""
    assert _run(["synth", "sft", str(tmp_path / "x.jsonl"), "--num", "-3"]) == 1
    assert "keel: --num -3: give the number of rows to write (>= 1)" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()
    assert _run(["validate", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"field '<source>': expected a .jsonl, .json or .parquet file, got '{tmp_path}'" in out
    assert "no such file" not in out


def test_validate_reports_bad_rows_and_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    assert _run(["validate", str(path)]) == 1
    out = capsys.readouterr().out
    assert "bad.jsonl, line 1: field 'messages[0].role'" in out and "PROBLEMS FOUND" in out
    assert _run(["validate", str(path), "--on-error", "raise"]) == 1
    assert _run(["convert-steerlm", str(tmp_path / "missing.jsonl"), str(tmp_path / "o.jsonl")]) == 1


def test_a_bad_row_names_the_commands_own_option_to_skip_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The hint said "or set data.on_error=skip", a training setting these commands do not take."""
    path = tmp_path / "ratings.jsonl"
    path.write_text('{"prompt": "p", "response": "r", "helpfulness": 3}\n{"prompt": "p"}\n')
    out = str(tmp_path / "steer.jsonl")
    assert _run(["convert-steerlm", str(path), out]) == 1
    error = capsys.readouterr().out
    assert "ratings.jsonl, line 2: field 'response'" in error and "pass --on-error skip" in error
    assert "data.on_error" not in error
    assert _run(["convert-steerlm", str(path), out, "--on-error", "skip"]) == 0  # the option the hint names works
    assert len(Path(out).read_text().splitlines()) == 1


def test_validate_takes_its_settings_from_a_run_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Validation used 128 tokens and the byte tokenizer whatever the run: a DPO file for seq_length 256 showed
    over-long rows that training would keep. ``--config`` takes the data settings the run trains with: the
    algorithm's defaults (named by the file's sections), the file's values, the tokenizer of its
    checkpoint.load. An option given on the command line still wins."""
    pairs = tmp_path / "pairs.jsonl"
    row = {"prompt": "Say something long. " * 5, "chosen": "yes " * 40, "rejected": "no " * 40}
    pairs.write_text(json.dumps(row) + "\n")
    load = tmp_path / "sft" / "step_0000002"
    load.mkdir(parents=True)
    (load / "keel.json").write_text(json.dumps({"config": {"data": {"tokenizer": "builtin-sp"}}}))
    (load / "metadata.json").write_text("{}")
    run = tmp_path / "dpo.yaml"
    run.write_text(f"checkpoint:\n  load: {load}\ndata:\n  format: pairs\n  chat_template: plain\ndpo:\n  beta: 0.2\n")

    def summary(*options: str) -> dict:
        _run(["validate", str(pairs), "--json", *options])
        return json.loads(capsys.readouterr().out)

    taken = summary("--config", str(run))
    assert (taken["format"], taken["seq_length"], taken["template"], taken["overlong"]) == ("pairs", 256, "plain", 0)
    assert taken["tokens"] < summary("--format", "pairs", "--seq-length", "256", "--template", "plain")["tokens"]
    assert summary("--config", str(run), "--seq-length", "64")["overlong"] == 1  # the command line wins
    assert summary("--format", "pairs")["seq_length"] == 128  # keel train sft's default, without a run
    plain = tmp_path / "plain.yaml"
    plain.write_text("data:\n  chat_template: plain\n")
    assert summary("--config", str(plain))["seq_length"] == 128  # no algorithm's own section: keel train sft's
    plain.write_text("data:\n  format: pairs\n")
    assert summary("--config", str(plain), "--algorithm", "dpo")["seq_length"] == 256
    assert _run(["validate", str(pairs), "--config", str(plain)]) == 1  # keel train sft cannot train on pairs
    assert "keel train sft trains on data.format 'chat' or 'text', got 'pairs'" in capsys.readouterr().out
    # chat rows checked as a DPO run's: it was advised to set data.format=chat, which DPO then refused
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
                    + "\n")
    assert _run(["validate", str(chat), "--config", str(run)]) == 1
    out = capsys.readouterr().out
    assert "1 bad row has the fields of chat rows: this run does not train on them; it reads data.format 'pairs' " \
           "or 'attributes' or 'helpsteer2_preference'" in out and "set data.format=chat" not in out, out
    for text, message in (("- a list\n", "the top level must be a mapping"),
                          ("rollout:\n  temperature: 1.0\n", "suits grpo, ppo, reinforce: say which with --algorithm"),
                          ("dpo:\n  beta: 0.1\nrm:\n  type: bt\n", "no keel train algorithm has all of its sections")):
        (tmp_path / "bad.yaml").write_text(text)
        assert _run(["validate", str(pairs), "--config", str(tmp_path / "bad.yaml")]) == 1
        assert message in capsys.readouterr().out


def test_validate_checks_a_sampling_runs_prompts_against_its_reward_functions(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With an online or iterative run's config a file is its prompt set (it was checked as chat rows, all
    bad), and the run's reward functions must be able to judge it: synthetic_check on prompts that are not
    built-in tasks would score every sample alike."""
    mine = tmp_path / "mine.jsonl"
    mine.write_text(json.dumps({"prompt": "Name a colour.", "answer": "red"}) + "\n")
    run = tmp_path / "grpo.yaml"
    for functions, code in (("[{name: synthetic_check}]", 1), ("[{name: math_answer}]", 0)):
        run.write_text(f"rollout:\n  prompts: {mine}\ngrpo:\n  eps_high: 0.28\nreward_functions: {functions}\n")
        assert _run(["validate", str(mine), "--config", str(run)]) == code
        out = capsys.readouterr().out
        if code:
            assert "error: " in out and "mine.jsonl, line 1: field 'prompt': expected one of the built-in synthetic " \
                "tasks" in out, out
        else:
            assert "1 valid of 1 rows" in out and "format=prompts" in out and out.rstrip().endswith("OK"), out
    # the run's settings overridden as keel train takes them ("unrecognized arguments" before)
    from engine.cli import main

    assert main(["data", "validate", str(mine), "--config", str(run), "reward_functions=[{name: synthetic_check}]"]) == 1
    assert "expected one of the built-in synthetic tasks" in capsys.readouterr().out
    assert main(["data", "validate", str(mine), "reward_functions=[{name: math_answer}]"]) == 1
    assert "overrides reward_functions=[{name: math_answer}] apply to a run: give its --config" in \
        capsys.readouterr().out


def test_validate_judges_over_long_rows_by_the_runs_policy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A row over seq_length that keel train sft keeps, truncated, made validate exit 1 ("PROBLEMS FOUND");
    it now says what training does with it, under the run's data.overlong."""
    data = tmp_path / "chat.jsonl"
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x" * 200}]}
    short = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    data.write_text(json.dumps(row) + "\n" + json.dumps(short) + "\n")
    assert _run(["validate", str(data)]) == 0
    out = capsys.readouterr().out
    assert "training (data.overlong=truncate): keeps 1 over-long rows truncated to seq_length+1; drops 0" in out
    assert out.rstrip().endswith("OK")
    run = tmp_path / "sft.yaml"
    run.write_text("data:\n  overlong: drop\n  seq_length: 64\n")
    assert _run(["validate", str(data), "--config", str(run), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["overlong_policy"], summary["dropped_by_policy"], summary["seq_length"]) == ("drop", 1, 64)
    assert _run(["validate", str(data), "--overlong", "cut_prompt"]) == 1
    assert "error: --overlong cut_prompt: chat rows take truncate or drop" in capsys.readouterr().out


def test_a_file_of_another_format_gets_the_commands_own_hint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """These commands have no data.format: a pairs file given to a converter was told "set data.format=pairs"."""
    pairs, ratings = tmp_path / "pairs.jsonl", tmp_path / "ratings.jsonl"
    pairs.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    ratings.write_text(json.dumps({"prompt": "a", "response": "b", "helpfulness": 3}) + "\n")
    expected = {
        ("convert-steerlm", str(pairs), str(tmp_path / "o.jsonl")):
            "(the row has the fields of pairs rows, and convert-steerlm reads HelpSteer attribute rows",
        ("convert-helpsteer2-dpo", str(pairs), str(tmp_path / "o.jsonl")):
            "; pairs rows need no conversion: train on them as they are)",
        ("convert-helpsteer2-preference-bt", str(pairs), str(tmp_path / "o.jsonl")):
            "convert-helpsteer2-preference-bt reads HelpSteer2-Preference rows",
        ("diverging", str(ratings)): "(the row has the fields of attributes rows, and diverging reads pairs or",
        ("validate", str(ratings), "--format", "pairs", "--on-error", "raise"):
            "(the row has the fields of attributes rows: pass --format attributes)",
    }
    for argv, hint in expected.items():
        assert _run(list(argv)) == 1
        out = capsys.readouterr().out
        assert hint in out and "data.format" not in out, (argv, out)
    # the default --on-error skip lists the bad rows without their hints: the hint comes once, with their count
    assert _run(["validate", str(ratings), "--format", "pairs"]) == 1
    out = capsys.readouterr().out
    assert "1 bad row has the fields of attributes rows: pass --format attributes\nPROBLEMS FOUND" in out, out


def test_validate_with_an_algorithm_and_no_config_reads_as_that_algorithm(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """`keel data validate prompts.jsonl --algorithm grpo` ignored --algorithm and judged the file as chat rows."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "What is 2+3?", "answer": "5"}) + "\n")
    assert _run(["validate", str(prompts), "--algorithm", "grpo"]) == 0
    assert "1 valid of 1 rows (0 bad), format=prompts" in capsys.readouterr().out
    assert _run(["validate", str(prompts)]) == 1  # no algorithm: chat rows, as keel train sft reads


def test_a_misspelt_rating_field_is_named_and_a_conversion_to_nothing_fails(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """'helpfullness' in every row: validate said all rows were fine, convert-helpsteer2-dpo wrote an empty file
    and exited 0, and nothing named the field."""
    rows = tmp_path / "rated.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"q{i // 2}", "response": f"r{i}", "helpfullness": i % 5,
                                        "correctness": 3}) + "\n" for i in range(8)))
    assert _run(["validate", str(rows), "--format", "attributes"]) == 1
    assert f"problem: {rows}: field 'helpfullness' is never read (a rating of helpfulness?" in capsys.readouterr().out
    assert _run(["convert-helpsteer2-dpo", str(rows), str(tmp_path / "pairs.jsonl")]) == 1
    assert f"error: no row of {rows} made a pairs row" in capsys.readouterr().out
