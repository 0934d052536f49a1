"""``keel generate`` on the native backend: TP1 and TP2 (2 replicas vs one TP2 replica) agree, bad input
is refused before the model loads, and an interrupted run resumes from its partial output."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from engine.cli import build_parser, main
from tests.helpers import keel_train, launch

SFT = ["model.preset=tiny-llama", "run.train_steps=2", "data.num_samples=64", "data.seq_length=96",
       "data.micro_batch_size=2", "data.global_batch_size=4", "logging.progress=false",
       "logging.tensorboard=false", "checkpoint.resume=none"]
PROMPTS = ["Spell cat backwards.", "What is 3 plus 4?", "Count the letters in river.", "Say hi."]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("policy")
    keel_train(1, [*SFT, f"run.output_dir={out}"])
    (out / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return out


def _generate(nproc: int, checkpoint: Path, output: Path, *extra: str, check: bool = True,  # type: ignore[no-untyped-def]
              env: dict[str, str] | None = None):
    return launch(nproc, ["-m", "engine", "generate", str(checkpoint / "checkpoints"), str(checkpoint / "prompts.jsonl"),
                          str(output), "--max-new-tokens", "12", "--quiet", *extra], env=env, check=check)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _args(checkpoint: Path, output: Path, *extra: str, prompts: Path | None = None) -> argparse.Namespace:
    """The parsed options of what :func:`_generate` runs."""
    return build_parser().parse_args(["generate", str(checkpoint / "checkpoints"),
                                      str(prompts or checkpoint / "prompts.jsonl"), str(output),
                                      "--max-new-tokens", "12", "--quiet", *extra])


def _interrupted(checkpoint: Path, output: Path, rows: list[dict], *extra: str, prompts: Path | None = None) -> Path:
    """``output.partial`` (and its fingerprint) as a run of these options killed after ``rows`` leaves it."""
    from engine.files import PartialOutput
    from engine.generate import _check_inputs

    partial = PartialOutput(output)
    job = _check_inputs(_args(checkpoint, output, *extra, prompts=prompts))
    partial.start(rows, job.fingerprint())
    with partial.append() as fh:
        fh.write('{"prompt": "torn')
    return partial.path


def _main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """(exit code, stderr) of ``keel generate`` run in-process (refused before any model loads)."""
    code = main(["generate", *argv])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err  # one line
    return code, err


def test_generate_tp1_tp2_and_resume(checkpoint: Path, tmp_path: Path) -> None:
    one, two, sampled = tmp_path / "new" / "dir" / "one.jsonl", tmp_path / "two.jsonl", tmp_path / "sampled.jsonl"
    _generate(1, checkpoint, one, "--batch-size", "3")  # its directory is made
    _generate(2, checkpoint, two, "--tensor", "2")
    first, second = _rows(one), _rows(two)
    assert [r["prompt"] for r in first] == PROMPTS
    assert [r["completion"] for r in first] == [r["completion"] for r in second]
    assert all(r["finish_reason"] in ("stop", "length") and 0 < r["tokens"] <= 12 for r in first)
    # two replicas of TP1 share the prompts; rows draw from their own seeds, so sampling agrees with one process
    _generate(2, checkpoint, sampled, "--temperature", "1.0", "--top-p", "0.9", "--seed", "5")
    alone = tmp_path / "alone.jsonl"
    _generate(1, checkpoint, alone, "--temperature", "1.0", "--top-p", "0.9", "--seed", "5")
    assert _rows(sampled) == _rows(alone)

    resumed = tmp_path / "resumed.jsonl"
    marker = dict(first[0], completion="FROM THE INTERRUPTED RUN")
    _interrupted(checkpoint, resumed, [marker])  # the same options; --batch-size may change
    proc = _generate(1, checkpoint, resumed, "--batch-size", "2")
    assert "resuming: 1 of 4 prompts already done" in proc.stdout, proc.stdout[-800:]
    rows = _rows(resumed)
    assert rows[0]["completion"] == "FROM THE INTERRUPTED RUN"
    assert [r["completion"] for r in rows[1:]] == [r["completion"] for r in first[1:]]
    assert not Path(f"{resumed}.partial").exists() and not Path(f"{resumed}.partial.meta").exists()


@pytest.mark.parametrize("signal_name, code", [("TERM", 0), ("INT", 130)])
def test_a_stop_signal_keeps_the_completions_and_says_how_to_resume(checkpoint: Path, tmp_path: Path,
                                                                    signal_name: str, code: int) -> None:
    """SIGTERM ended `keel generate` without a line: the user could not tell it from a crash, nor that the same
    command resumes. It now stops after the batch it is on, as training stops after its step."""
    output, whole = tmp_path / "out.jsonl", tmp_path / "whole.jsonl"
    proc = _generate(1, checkpoint, output, "--batch-size", "1", env={"KEEL_FAULT": f"generated:2:{signal_name}"},
                     check=False)
    assert proc.returncode == code, proc.stderr[-2000:]
    assert f"SIG{signal_name} received: will stop after the current batch" in proc.stderr
    assert f"keel: stopped by SIG{signal_name} after 2 of 4 prompts; they are kept in {output}.partial, and the " \
           "same command resumes from them" in proc.stderr, proc.stderr[-2000:]
    assert len(_rows(Path(f"{output}.partial"))) == 2 and not output.exists()
    assert "resuming: 2 of 4 prompts already done" in _generate(1, checkpoint, output, "--batch-size", "1").stdout
    _generate(1, checkpoint, whole)
    assert _rows(output) == _rows(whole)


def test_generate_refuses_bad_input_before_loading(checkpoint: Path, tmp_path: Path) -> None:
    long_prompts = tmp_path / "long.jsonl"
    long_prompts.write_text(json.dumps({"prompt": "hi"}) + "\n" + json.dumps({"prompt": "word " * 200}) + "\n")
    proc = launch(1, ["-m", "engine", "generate", str(checkpoint / "checkpoints"), str(long_prompts),
                      str(tmp_path / "x.jsonl")], check=False)
    assert proc.returncode != 0
    assert "long.jsonl, line 2: field 'prompt'" in proc.stderr and "no room to generate" in proc.stderr, proc.stderr[-800:]

    proc = _generate(1, checkpoint, tmp_path / "y.jsonl", "--top-p", "1.5", check=False)
    assert proc.returncode != 0 and "top_p=1.5 must be in (0, 1]" in proc.stderr, proc.stderr[-800:]

    proc = _generate(1, checkpoint, tmp_path / "y.jsonl", "--beam-width", "4", check=False)
    assert proc.returncode != 0 and "unrecognized arguments: --beam-width" in proc.stderr, proc.stderr[-800:]

    # tiny-llama has 2 KV heads: a generation TP of 4 cannot split them (refused before any process group)
    proc = _generate(1, checkpoint, tmp_path / "y.jsonl", "--tensor", "4", check=False)
    assert proc.returncode != 0, proc.stderr[-800:]
    assert "--tensor 4: generation tensor-parallel size 4 does not divide the world size 1" in proc.stderr, \
        proc.stderr[-800:]
    assert not (tmp_path / "y.jsonl").exists()


@pytest.mark.parametrize("options, message", [
    (["--template", "foo"], "--template 'foo' is not a chat template; choose one of auto, plain, llama3, chatml, "
                            "nemotron"),
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0: must be at least 1"),
])
def test_generate_refuses_bad_options_first(options: list[str], message: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n")
    code, err = _main(capsys, str(tmp_path / "no-checkpoint"), str(prompts), str(tmp_path / "o.jsonl"), *options)
    assert code == 2 and f"keel: configuration error: {message}" in err, err


@pytest.mark.parametrize("row, field", [
    ({"prompt": 5}, "field 'prompt': expected a string"),
    ({"prompt": [{"role": "assistant", "content": "hi"}]}, "field 'prompt[0].role'"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
     "field 'messages[0].content'"),
    ({"text": "hi"}, "field 'prompt': expected a string or messages"),
    ([1, 2], "field '<row>'"),
])
def test_generate_names_the_bad_prompt_row(row: object, field: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n" + json.dumps(row) + "\n")
    # read before the (missing) checkpoint is
    code, err = _main(capsys, str(tmp_path / "no-checkpoint"), str(prompts), str(tmp_path / "o.jsonl"))
    assert code == 1 and f"p.jsonl, line 2: {field}" in err, err
    assert "fix the row in the prompts file; keel generate completes every row" in err and "on_error" not in err, err


def test_read_prompts_takes_sft_rows_up_to_their_last_reply(tmp_path: Path) -> None:
    from engine.generate import read_prompts

    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"messages": turns}) + "\n" + json.dumps({"prompt": "x", "id": 7}) + "\n")
    assert read_prompts(str(prompts)) == [{"messages": turns, "prompt": turns[:1], "reference": "hello"},
                                          {"prompt": "x", "id": 7}]


def test_an_sft_row_keeps_its_reply_as_the_reference(checkpoint: Path, tmp_path: Path) -> None:
    """The last assistant reply of an SFT row was dropped from the output, so completions could not be
    compared with the answer the data set gives."""
    from engine.generate import _check_inputs, complete
    from engine.generation.base import SamplingParams

    turns = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]
    prompts = tmp_path / "sft.jsonl"
    prompts.write_text(json.dumps({"messages": turns, "id": 1}) + "\n"
                       + json.dumps({"messages": turns, "reference": "own"}) + "\n")
    job = _check_inputs(_args(checkpoint, tmp_path / "o.jsonl", prompts=prompts))

    class Backend:  # the rows around the model are what is tested
        def generate(self, prompts: list[list[int]], sampling: SamplingParams, seeds: list[int]):  # type: ignore[no-untyped-def]
            from engine.generation.base import Rollouts

            return Rollouts(prompts, [[65, 66]] * len(prompts), [[0.0, 0.0]] * len(prompts), ["length"] * len(prompts))

    first, second = complete(Backend(), job.tokenizer, job.template, job.rows, job.sampling, None)
    assert first["reference"] == "hi" and first["id"] == 1 and first["prompt"] == turns[:1], first
    assert "messages" not in first and second["reference"] == "own", second


def test_read_prompts_keeps_a_prompt_completion_rows_completion_as_the_reference(tmp_path: Path,
                                                                                  capsys: pytest.CaptureFixture[str]
                                                                                  ) -> None:
    """A TRL {prompt, completion} row's completion was overwritten by the generated text, so the answer the data
    set gives was lost; it is kept as 'reference', as an SFT row's last reply is (text or conversational form)."""
    from engine.generate import read_prompts

    reply = [{"role": "assistant", "content": "4"}]
    rows = [{"prompt": "What is 0+0?", "completion": " 0"}, {"prompt": "2+2?", "completion": reply, "id": 3},
            {"prompt": "x", "completion": "mine", "reference": "own"}, {"prompt": "y", "completion": None}]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert read_prompts(str(prompts)) == [{"reference": " 0", **rows[0]}, {"reference": "4", **rows[1]}, rows[2],
                                          rows[3]]
    prompts.write_text(json.dumps({"prompt": "q", "completion": 5}) + "\n")
    code, err = _main(capsys, str(tmp_path / "no-checkpoint"), str(prompts), str(tmp_path / "o.jsonl"))
    assert code == 1 and "p.jsonl, line 1: field 'completion': expected a string" in err, err


def test_a_prompt_completion_row_keeps_its_completion_as_the_reference(checkpoint: Path, tmp_path: Path) -> None:
    """{"prompt": "What is 0+0?", "completion": " 0"} came out with the generated text as 'completion' and the
    data set's " 0" gone."""
    from engine.generate import _check_inputs, complete
    from engine.generation.base import Rollouts, SamplingParams

    prompts = tmp_path / "trl.jsonl"
    prompts.write_text(json.dumps({"prompt": "What is 0+0?", "completion": " 0", "id": 1}) + "\n")
    job = _check_inputs(_args(checkpoint, tmp_path / "o.jsonl", prompts=prompts))

    class Backend:  # the rows around the model are what is tested
        def generate(self, prompts: list[list[int]], sampling: SamplingParams, seeds: list[int]) -> Rollouts:
            return Rollouts(prompts, [[65, 66]] * len(prompts), [[0.0, 0.0]] * len(prompts), ["length"] * len(prompts))

    (row,) = complete(Backend(), job.tokenizer, job.template, job.rows, job.sampling, None)
    assert row["reference"] == " 0" and row["id"] == 1 and row["prompt"] == "What is 0+0?", row
    assert row["completion"] == job.tokenizer.decode([65, 66]) != " 0", row


def test_generate_refuses_a_partial_output_of_other_options(checkpoint: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "out.jsonl"
    partial = _interrupted(checkpoint, output, [{"prompt": "p", "completion": "c"}])
    argv = [str(checkpoint / "checkpoints"), str(checkpoint / "prompts.jsonl"), str(output), "--max-new-tokens", "12"]
    code, err = _main(capsys, *argv, "--temperature", "1.0", "--seed", "3")
    assert code == 2 and f"{partial} was written with other options (--temperature 0.0 then, 1.0 now; --seed 0 " \
        f"then, 3 now): delete {partial} to start over, or rerun with the same options" in err, err
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"prompt": "Something else."}) + "\n")
    code, err = _main(capsys, str(checkpoint / "checkpoints"), str(other), str(output), "--max-new-tokens", "12")
    assert code == 2 and "(the prompts file's contents)" in err, err
    code, err = _main(capsys, *argv[:-1], "8", "--template", "chatml")
    assert code == 2 and "--template 'auto' then, 'chatml' now; --max-new-tokens 12 then, 8 now" in err, err

    Path(f"{partial}.meta").unlink()  # a partial output of unknown options
    code, err = _main(capsys, *argv)
    assert code == 2 and f"{partial} holds 1 completions of an earlier run whose options are unknown" in err, err
    assert partial.read_text().startswith('{"prompt": "p"')  # left as it was


def test_a_missing_prompts_file_names_the_argument(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """It said "(check data.source)", which keel generate has no option for."""
    missing = tmp_path / "nope.jsonl"
    code, err = _main(capsys, str(tmp_path / "no-checkpoint"), str(missing), str(tmp_path / "o.jsonl"))
    assert code == 1 and f"{missing}: field '<source>': expected an existing .jsonl, .json or .parquet file" in err, err
    assert "data.source" not in err and "keel generate's prompts argument" in err, err


def test_an_empty_prompts_file_or_one_of_another_kind_is_refused(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """An empty file gave "wrote 0 completions" and exit 0; a .txt file was told to "fix the row"."""
    empty, text = tmp_path / "empty.jsonl", tmp_path / "prompts.txt"
    empty.write_text("")
    text.write_text(json.dumps({"prompt": "hi"}) + "\n")
    code, err = _main(capsys, str(tmp_path / "no-checkpoint"), str(empty), str(tmp_path / "o.jsonl"))
    assert code == 1 and "empty.jsonl: field '<rows>': expected at least one row, found none" in err, err
    code, err = _main(capsys, str(tmp_path / "no-checkpoint"), str(text), str(tmp_path / "o.jsonl"))
    assert code == 1 and "expected a .jsonl, .json or .parquet file" in err and "fix the row" not in err, err


@pytest.mark.parametrize("max_length, message", [
    (10, "p.jsonl, line 1: field 'prompt': the prompt has 12 tokens, which leaves no room to generate within "
         "--max-length 10; shorten the prompt or raise --max-length (at most the model's context of 64 tokens)"),
    (64, "the prompt has 64 tokens, which leaves no room to generate within the model's context of 64 "
         "tokens; shorten the prompt"),
])
def test_a_prompt_without_room_names_the_option_to_raise(max_length: int, message: str) -> None:
    """It said "raise the model's max_length" where the fix is --max-length."""
    from engine.config import ConfigError
    from engine.generation.base import SamplingParams, check_prompts

    def check(prompts: list[list[int]]) -> None:  # as keel generate calls it
        check_prompts(prompts, SamplingParams(max_length=max_length), 64, ["p.jsonl, line 1: field 'prompt'"],
                      option="--max-length")

    check([[5] * 3])  # room left: no error
    prompt = [[5] * (12 if max_length < 64 else 64)]
    with pytest.raises(ConfigError) as err:
        check(prompt)
    assert message in str(err.value) and "model's max_length" not in str(err.value), err.value


def test_max_length_defaults_to_the_context_and_a_cut_is_told(checkpoint: Path, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """--max-length defaulted to the checkpoint's data.seq_length (96 here; 128 for a converted SmolLM2 whose
    context is 8192), which cut completions short with finish_reason "length" and no word."""
    from engine.generate import _check_inputs
    from engine.models.presets import PRESETS

    context = PRESETS["tiny-llama"].max_sequence_length
    assert context > 96
    with caplog.at_level("WARNING", logger="engine.generate"):
        assert _check_inputs(_args(checkpoint, tmp_path / "o.jsonl")).sampling.max_length == context
        assert not caplog.records  # 12 new tokens fit
        _check_inputs(_args(checkpoint, tmp_path / "o.jsonl", "--max-new-tokens", "40", "--max-length", "60"))
        _check_inputs(_args(checkpoint, tmp_path / "o.jsonl", "--max-new-tokens", str(context - 10)))
    raised, capped = (record.getMessage() for record in caplog.records)
    assert raised.startswith(f"{len(PROMPTS)} of {len(PROMPTS)} completions may be cut short: prompt + "
                             "--max-new-tokens 40 is more than --max-length 60; raise --max-length to "), raised
    assert raised.endswith(f"(at most the model's context of {context} tokens)"), raised
    assert capped.endswith(f"is more than the model's context of {context} tokens; lower --max-new-tokens or "
                           "shorten the prompts"), capped


def test_a_max_length_beyond_the_models_context_is_refused(checkpoint: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """It was capped at the context without a word, so a user asking for 4096 tokens got at most the
    model's few hundred and no hint why the answers stopped short."""
    from engine.models.presets import PRESETS

    context = PRESETS["tiny-llama"].max_sequence_length
    argv = [str(checkpoint / "checkpoints"), str(checkpoint / "prompts.jsonl"), str(tmp_path / "o.jsonl")]
    code, err = _main(capsys, *argv, "--max-length", str(context + 1))
    assert code == 2 and f"--max-length {context + 1} is beyond the model's context of {context} tokens " \
        f"(tiny-llama); give at most {context}" in err, err
    assert not (tmp_path / "o.jsonl").exists()


def test_every_checkpoint_form_the_help_offers_is_read(checkpoint: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """The help offered "run dir ... or 'best'", but a run directory failed with "cannot read keel.json"."""
    from engine.generate import resolve_checkpoint

    step = resolve_checkpoint(str(checkpoint / "checkpoints" / "latest"))
    assert step.name.startswith("step_") and (step / "keel.json").is_file()
    for form in (checkpoint, checkpoint / "checkpoints", step):
        assert resolve_checkpoint(str(form)).resolve() == step.resolve(), form
    scanned = tmp_path / "copy"  # a checkpoints directory without its pointer: the newest complete step
    (scanned / step.name).mkdir(parents=True)
    for name in ("keel.json", "metadata.json"):
        (scanned / step.name / name).write_text((step / name).read_text())
    assert resolve_checkpoint(str(scanned)) == scanned / step.name

    prompts = str(checkpoint / "prompts.jsonl")
    code, err = _main(capsys, str(checkpoint / "checkpoints" / "best"), prompts, str(tmp_path / "o.jsonl"))
    assert code == 2 and f"{checkpoint / 'checkpoints'} has no 'best' pointer (a run marks its best checkpoint " \
        "only when it evaluates); give a run directory, its checkpoints directory" in err, err
    code, err = _main(capsys, str(tmp_path / "nothing"), prompts, str(tmp_path / "o.jsonl"))
    assert code == 2 and "nothing does not exist; give a run directory" in err and "keel.json" not in err, err


def test_generate_help_gives_every_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option, default in [("--max-new-tokens", "64"), ("--top-p", "1.0"), ("--top-k", "0"), ("--seed", "0"),
                            ("--batch-size", "32"), ("--tensor", "1"), ("--temperature", "0.0")]:
        described = re.search(rf"options:.* {option} [A-Z_]+ (.*?)(?= --[a-z]|$)", text)
        assert described and described.group(1).endswith(f"(default: {default})"), (option, text)
    assert "(default: the model's context" in text and "data.seq_length" not in text, text
    assert "a run directory" in text and "'best'" in text, text


def test_attributes_are_checked_and_a_name_given_twice_is_refused() -> None:
    """--attributes verbosity=2,verbosity=3 was taken silently (the last one won)."""
    from engine.config import ConfigError
    from engine.generate import parse_attributes

    assert parse_attributes("verbosity=4,complexity=1")["verbosity"] == 4
    with pytest.raises(ConfigError, match=r"--attributes: verbosity is given twice \(verbosity=2,verbosity=3\)"):
        parse_attributes("verbosity=2,verbosity=3")
    with pytest.raises(ConfigError, match="'kindness=3' is not NAME=0..4"):
        parse_attributes("kindness=3")


def test_a_steerlm_prompt_row_keeps_its_own_targets(checkpoint: Path, tmp_path: Path) -> None:
    """Each row's 'attributes' were replaced by the defaults (or --attributes), in the prompt and the output."""
    from engine.data.errors import DataError
    from engine.generate import _check_inputs, complete
    from engine.generation.base import Rollouts, SamplingParams

    prompts = tmp_path / "steer.jsonl"
    rows = [{"prompt": "hi", "attributes": {"verbosity": 0}}, {"prompt": "yo", "attributes": "helpfulness:1"},
            {"prompt": "no targets"}]
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    job = _check_inputs(_args(checkpoint, tmp_path / "o.jsonl", "--template", "nemotron", prompts=prompts))
    assert [(r["attributes"]["verbosity"], r["attributes"]["helpfulness"]) for r in job.rows] == [(0, 4), (2, 1), (2, 4)]

    seen: list[list[int]] = []

    class Backend:  # records the prompts it is given
        def generate(self, prompts: list[list[int]], sampling: SamplingParams, seeds: list[int]) -> Rollouts:
            seen.extend(prompts)
            return Rollouts(prompts, [[65]] * len(prompts), [[0.0]] * len(prompts), ["length"] * len(prompts))

    out = complete(Backend(), job.tokenizer, job.template, job.rows, job.sampling, job.attributes)
    assert [row["attributes"]["verbosity"] for row in out] == [0, 2, 2]
    assert "verbosity:0" in job.tokenizer.decode(seen[0]) and "helpfulness:1" in job.tokenizer.decode(seen[1])

    forced = _check_inputs(_args(checkpoint, tmp_path / "o.jsonl", "--template", "nemotron", "--attributes",
                                 "verbosity=4", prompts=prompts))
    assert [r["attributes"]["verbosity"] for r in forced.rows] == [4, 4, 4]  # --attributes sets every row's
    prompts.write_text(json.dumps({"prompt": "x", "attributes": {"kindness": 3}}) + "\n")
    with pytest.raises(DataError, match=r"steer.jsonl, line 1: field 'attributes.kindness': expected an attribute"):
        _check_inputs(_args(checkpoint, tmp_path / "o.jsonl", "--template", "nemotron", prompts=prompts))


def test_a_sampling_filter_without_a_temperature_is_told(caplog: pytest.LogCaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """--top-k 5 at the default --temperature 0 stayed greedy without a word."""
    import argparse
    import logging

    from engine.generate import _check_options

    monkeypatch.delenv("RANK", raising=False)
    common = {"template": None, "batch_size": 1, "max_new_tokens": 8, "tensor": 1}
    with caplog.at_level(logging.WARNING, logger="engine.generate"):
        _check_options(argparse.Namespace(**common, temperature=0.0, top_k=5, top_p=0.9))
        _check_options(argparse.Namespace(**common, temperature=0.7, top_k=5, top_p=0.9))
    assert [r.getMessage() for r in caplog.records] == [
        "--top-k 5 and --top-p 0.9 have no effect with --temperature 0 (greedy, the default): give a --temperature "
        "above 0 to sample"]
