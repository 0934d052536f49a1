"""Prompt sets for rollouts: validated rows, and the built-in prompts with their answers and splits."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from engine.data.errors import DataError
from engine.data.loaders import ReadStats
from engine.data.prompts import PromptRow, iter_prompts, load_prompts, prompt_row
from engine.data.synthetic import SFT_TASK_KINDS, sft_conversations, split_of, task_kind
from engine.rewards.builtins import math_answer, synthetic_check


def test_rows_keep_answer_and_metadata(write_jsonl: Callable[..., str]) -> None:
    path = write_jsonl([
        {"prompt": "What is 2 + 3?", "answer": 5, "id": "a"},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 3 times 4?"}],
         "answer": "12"},
        {"prompt": "Tell me a joke."},
    ])
    rows = load_prompts(path)
    assert rows[0] == PromptRow("What is 2 + 3?", 5, {"id": "a"}, rows[0].where)
    assert str(rows[0].where).endswith("data.jsonl, line 1")
    assert rows[0].reward_metadata() == {"id": "a", "answer": 5} and rows[2].reward_metadata() == {}
    assert rows[1].text == "System: Be brief.\nUser: What is 3 times 4?" and rows[1].messages[0]["role"] == "system"
    assert synthetic_check(rows[1].text, "12", {}) == 1.0
    assert rows[2].answer is None and rows[2].messages == [{"role": "user", "content": "Tell me a joke."}]


@pytest.mark.parametrize("bad, field, expected", [
    ({"answer": 3}, "prompt", "a string, got no such field (the row has 'answer')"),
    ({"prompt": 7}, "prompt", "a string, got 7"),
    ({"prompt": "  "}, "prompt", "a non-empty string"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "prompt[1].role",
     "the conversation to end with a 'user' turn"),
    ({"prompt": "q", "answer": [3]}, "answer", "a string or a finite number"),
    ({"prompt": "q", "answer": True}, "answer", "a string or a finite number"),
    ({"prompt": "q", "answer": float("nan")}, "answer", "a string or a finite number"),
])
def test_bad_rows_name_file_line_and_field(write_jsonl: Callable[..., str], bad: dict, field: str,
                                           expected: str) -> None:
    path = write_jsonl([{"prompt": "fine", "answer": "1"}, bad])
    with pytest.raises(DataError) as caught:
        load_prompts(path)
    message = str(caught.value)
    assert f"data.jsonl, line 2: field '{field}': expected {expected}" in message
    assert caught.value.row == 2 and caught.value.field == field


def test_a_row_of_another_format_is_told_what_a_prompt_row_is(write_jsonl: Callable[..., str]) -> None:
    """A chat row in a prompt file was told to 'set data.format=chat', which rollout.prompts does not read."""
    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    for row, turns in ((chat, "such as this row's messages up to the last user turn"), ({"text": "q"}, "")):
        with pytest.raises(DataError) as caught:
            load_prompts(write_jsonl([row]))
        assert "data.format=chat" not in str(caught.value).replace("fields of data.format=chat,", "")
        assert "a prompt file's rows have a 'prompt': text, or chat turns that end with the user's" in str(caught.value)
        assert (turns in str(caught.value)) and caught.value.looks_like == ("chat" if turns else "text")


def test_bad_rows_can_be_skipped_and_counted(write_jsonl: Callable[..., str]) -> None:
    path = write_jsonl([{"prompt": "a"}, "{not json", {"prompt": 3}, {"prompt": "b", "answer": 2.5}])
    stats = ReadStats()
    rows = list(iter_prompts(path, on_error="skip", stats=stats))
    assert [row.prompt for row in rows] == ["a", "b"] and (stats.valid, stats.skipped) == (2, 2)
    assert "line 2: field '<json>'" in stats.problems[0]
    with pytest.raises(DataError, match="line 2: field '<json>'"):
        load_prompts(path)
    with pytest.raises(DataError, match="at least one valid row"):
        load_prompts(write_jsonl([{"prompt": 1}], "bad.jsonl"), on_error="skip")


def test_builtin_prompts_ask_what_sft_teaches_and_carry_the_answer() -> None:
    rows = load_prompts("builtin:prompts", 300, seed=4)
    assert load_prompts("builtin:prompts", 300, seed=4) == rows
    kinds = {row.metadata["task_kind"] for row in rows}
    assert kinds == set(SFT_TASK_KINDS)
    sft_questions = {m["content"] for c in sft_conversations(300, 0) for m in c["messages"] if m["role"] == "user"}
    sft_forms = {re.sub(r"\d+|'[a-z]+'", "#", q) for q in sft_questions}
    assert {re.sub(r"\d+|'[a-z]+'", "#", row.text) for row in rows} == sft_forms
    for row in rows:
        assert task_kind(row.text) == row.metadata["task_kind"]
        assert synthetic_check(row.text, f"So the answer is {row.answer}.", row.reward_metadata()) == 1.0
        assert synthetic_check(row.text, f"So the answer is {row.answer}x.", row.reward_metadata()) == 0.0
        if row.metadata["task_kind"] != "reversal":
            assert math_answer(row.text, f"\\boxed{{{row.answer}}}", row.reward_metadata()) == 1.0


def _keys(prompt: str) -> set[str]:
    numbers = [int(n) for n in re.findall(r"\d+", prompt)]
    words = re.findall(r"'([a-z]+)'", prompt)
    keys = {f"w:{word}" for word in words}
    if len(numbers) == 2:
        keys.add(f"n:{min(numbers)}:{max(numbers)}")
    return keys


def test_builtin_splits_never_share_a_word_or_number_pair() -> None:
    seen = {split: set().union(*(_keys(row.text) for row in load_prompts(f"builtin:prompts:{split}", 400, seed=1)))
            for split in ("train", "validation", "eval")}
    assert [row.text for row in load_prompts("builtin:prompts", 50, 1)] == [
        row.text for row in load_prompts("builtin:prompts:train", 50, 1)]
    for split, keys in seen.items():
        assert keys and all(split_of(key) == split for key in keys)
    assert not seen["train"] & seen["eval"] and not seen["train"] & seen["validation"]
    assert not seen["validation"] & seen["eval"]


def test_prompt_row_from_a_dict() -> None:
    assert prompt_row({"prompt": "q", "answer": "1", "task_kind": "x"}).metadata == {"task_kind": "x"}
    with pytest.raises(DataError, match="field 'answer'"):
        prompt_row({"prompt": "q", "answer": {}})


def test_held_out_prompts_follow_the_users_prompt_set(write_jsonl: Callable[..., str],
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Own prompts are never evaluated against the built-in eval split (the synthetic tasks, scored by the
    user's reward); the built-in prompts keep their unseen eval split; an explicit set or none wins."""
    from engine.algorithms.grpo import GRPOTrainConfig
    from engine.algorithms.online import PromptSampling
    from engine.config import load_config

    mine = write_jsonl([{"prompt": "What is 2+3?", "answer": "5"}, {"prompt": "What is 4+4?", "answer": "8"}])

    def held_out(*overrides: str) -> list:
        config = load_config(GRPOTrainConfig, None, ["reward_functions=[{name: math_answer}]", *overrides])
        return PromptSampling().build_datasets(config, None)[1]

    assert held_out(f"rollout.prompts={mine}") == []
    assert "prompts_per_iteration=16 exceeds the 2 prompts" in caplog.text  # repeats within an iteration are told
    assert held_out("rollout.eval_num_prompts=8") == load_prompts("builtin:prompts:eval", 8, 1234)
    assert [row.answer for row in held_out(f"rollout.prompts={mine}", f"rollout.eval_prompts={mine}")] == ["5", "8"]
    assert [row.answer for row in held_out(f"rollout.eval_prompts={mine}", "rollout.eval_num_prompts=1")] == ["5"]
    assert held_out("rollout.eval_prompts=none") == held_out("rollout.eval_prompts=null") == []


def test_data_on_error_skip_drops_bad_prompt_rows(write_jsonl: Callable[..., str]) -> None:
    """A bad prompt row's error said "or set data.on_error=skip", and online runs did not read that setting:
    the same error came back."""
    from engine.algorithms.grpo import GRPOTrainConfig
    from engine.algorithms.online import PromptSampling
    from engine.config import load_config

    mine = write_jsonl([{"prompt": "What is 2+3?", "answer": "5"}, {"prompt": 7}, {"prompt": "What is 4+4?", "answer": "8"}])

    def datasets(*overrides: str) -> tuple:
        config = load_config(GRPOTrainConfig, None, ["reward_functions=[{name: math_answer}]", f"rollout.prompts={mine}",
                                                     f"rollout.eval_prompts={mine}", *overrides])
        return PromptSampling().build_datasets(config, None)

    with pytest.raises(DataError, match=r", line 2: field 'prompt'.*data.on_error=skip"):
        datasets()
    train, held_out = datasets("data.on_error=skip")
    assert [row.answer for row in train] == [row.answer for row in held_out] == ["5", "8"]


def test_the_default_reward_is_the_synthetic_check_only_for_the_builtin_prompts(write_jsonl: Callable[..., str]) -> None:
    """synthetic_check knows only the built-in tasks' phrasing: on a user's prompts it scores 0 whatever the
    answer, and beside a reward model it silently added its 0/1 to the model's score."""
    from engine.algorithms.grpo import GRPOTrainConfig
    from engine.algorithms.iterative_dpo import IterativeDPOTrainConfig
    from engine.config import ConfigError, load_config

    mine = write_jsonl([{"prompt": "What is 3+4?", "answer": "7"}])
    names = lambda cls, *o: [f.name for f in load_config(cls, None, list(o)).reward_functions]  # noqa: E731
    assert names(GRPOTrainConfig) == ["synthetic_check"]
    assert names(GRPOTrainConfig, "reward_model=runs/rm") == names(IterativeDPOTrainConfig, "reward_model=runs/rm") == []
    assert names(GRPOTrainConfig, f"rollout.prompts={mine}", "reward_functions=[{name: math_answer}]") == ["math_answer"]
    assert names(GRPOTrainConfig, "reward_model=runs/rm", "reward_functions=[{name: synthetic_check}]") == \
        ["synthetic_check"]
    with pytest.raises(ConfigError, match=r"no reward for rollout.prompts=.*math_answer"):
        load_config(GRPOTrainConfig, None, [f"rollout.prompts={mine}"])


@pytest.mark.parametrize("setting, instead", [("data.source", "rollout.prompts"), ("data.num_samples", "rollout.num_prompts"),
                                             ("data.validation_source", "rollout.eval_prompts")])
def test_data_settings_that_sampling_runs_do_not_read_are_refused(setting: str, instead: str) -> None:
    """`keel train grpo data.source=prompts.jsonl` (TRL's train_dataset) trained on the built-in prompts and
    exited 0; --help listed data.source as the training data."""
    from engine.algorithms.grpo import GRPOTrainConfig
    from engine.algorithms.iterative_dpo import IterativeDPOTrainConfig
    from engine.config import ConfigError, describe, load_config

    for cls in (GRPOTrainConfig, IterativeDPOTrainConfig):
        with pytest.raises(ConfigError, match=rf"{setting}=7 is not read by {cls.ALGORITHM}, .*set {instead}=7 instead"):
            load_config(cls, None, [f"{setting}=7"])
        assert f"{setting} (" in describe(cls) and f"Not read by this algorithm: set {instead}." in describe(cls)
    load_config(GRPOTrainConfig, None, ["data.source=builtin:sft", "data.format=chat"])  # the defaults, as saved


def test_prompts_that_cannot_be_answered_or_judged_are_refused_before_the_models_are_built(
        write_jsonl: Callable[..., str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A prompt too long to answer used to surface at the iteration that first drew it (maybe hours in) as
    'prompt 2' of that batch; then it and a prompt set no reward can judge surfaced only after the models
    were built (minutes at scale). Both are now refused by the step's data check, which the trainer runs
    before it builds anything. ``plain`` with the byte tokenizer: 19 ids around the prompt's characters."""
    from types import SimpleNamespace

    from engine import trainer as trainer_module
    from engine.algorithms.grpo import GRPOTrainConfig, create
    from engine.config import load_config

    def built(*args: object, **kwargs: object) -> None:
        raise AssertionError("the models were built before the data was checked")

    monkeypatch.setattr(trainer_module.ModelRunner, "trained", built)
    path = write_jsonl([{"prompt": "short", "answer": "1"}, {"prompt": "y" * 12, "answer": "2"},
                        {"prompt": "z" * 20, "answer": "3"}])

    def trainer(*overrides: str) -> None:
        config = load_config(GRPOTrainConfig, None, [f"rollout.prompts={path}", "data.tokenizer=byte",
                                                     "data.chat_template=plain", "rollout.eval_prompts=none",
                                                     f"run.output_dir={Path(path).parent / 'run'}", *overrides])
        trainer_module.Trainer(config, create(config), SimpleNamespace(layout=None, is_main=True))

    with pytest.raises(AssertionError, match="models were built"):  # 19 + 20 ids leave room at 40
        trainer("data.seq_length=40", "reward_functions=[{name: math_answer}]")
    with pytest.raises(DataError, match=rf"{re.escape(path)}, line 2: field 'prompt': .*data.seq_length=31.*got 31 tokens \("):
        trainer("data.seq_length=31", "reward_functions=[{name: math_answer}]")
    with pytest.raises(DataError, match=rf"{re.escape(path)}, line 1: field 'prompt': expected one of the built-in "):
        trainer("data.seq_length=40", "reward_functions=[{name: synthetic_check}]")
    # rows it cannot judge among others (an iteration that drew only those stopped the run mid-way): bad rows
    unanswered = write_jsonl([{"prompt": "short", "answer": "1"}, {"prompt": "no answer"}], "unanswered.jsonl")
    with pytest.raises(DataError, match=rf"{re.escape(unanswered)}, line 2: field 'answer': .*cannot judge 1 of the 2"):
        trainer("data.seq_length=40", "reward_functions=[{name: math_answer}]", f"rollout.prompts={unanswered}")
    skip = load_config(GRPOTrainConfig, None, [f"rollout.prompts={unanswered}", "rollout.eval_prompts=none",
                                               "reward_functions=[{name: math_answer}]", "data.on_error=skip"])
    assert [row.text for row in create(skip).build_datasets(skip, None)[0]] == ["short"]

    # a module:function reward that does not import, or fails while it imports (it was found only after the
    # models were built and the weights resharded)
    from engine.config import ConfigError

    with pytest.raises(ConfigError, match="reward function 'nosuch_reward_module:fn': cannot import module"):
        trainer("data.seq_length=40", "reward_functions=[{name: nosuch_reward_module:fn}]")
    with pytest.raises(ConfigError, match="module 'tests.distributed.online_rewards' has no 'nofn'"):
        trainer("data.seq_length=40", "reward_functions=[{name: tests.distributed.online_rewards:nofn}]")
    broken = Path(path).parent / "broken_reward_module.py"
    broken.write_text("raise RuntimeError('a typo at import')\n")
    monkeypatch.syspath_prepend(str(broken.parent))
    with pytest.raises(ConfigError, match="importing it raised RuntimeError: a typo at import"):
        trainer("data.seq_length=40", "reward_functions=[{name: broken_reward_module:fn}]")
    with pytest.raises(AssertionError, match="models were built"):  # one that imports passes on to the build
        trainer("data.seq_length=40", "reward_functions=[{name: tests.distributed.online_rewards:digit_share}]")


def test_a_reward_function_that_can_judge_no_prompt_is_refused_before_any_work(
        write_jsonl: Callable[..., str], caplog: pytest.LogCaptureFixture) -> None:
    """synthetic_check on a user's prompts scored every sample 0: iterative DPO tied every prompt, trained
    nothing and exited 0, with only 'nothing to train on' warnings. Each file is judged on its own."""
    from engine.rewards.config import RewardFunctionConfig, check_judged

    check = [RewardFunctionConfig("synthetic_check")]
    builtin = load_prompts("builtin:prompts", 8, 3)
    check_judged(check, builtin)
    mine = write_jsonl([{"prompt": "Name a colour."}, {"prompt": "What is the capital of France?"}], "mine.jsonl")
    with pytest.raises(DataError, match=rf"{re.escape(mine)}, line 1: field 'prompt': expected one of the built-in "
                       r"synthetic tasks .*got 'Name a colour.' .*can judge none of the 2 prompts of"):
        check_judged(check, [*builtin, *load_prompts(mine)])
    # a file it can judge in part: its other rows would get no reward, and an iteration of only those stopped the run
    mixed = write_jsonl([{"prompt": builtin[0].text}, {"prompt": "Name a colour.", "answer": "red"}], "mixed.jsonl")
    with pytest.raises(DataError, match=rf"{re.escape(mixed)}, line 2: field 'prompt': .*'synthetic_check' cannot "
                       r"judge 1 of the 2 prompts of .*or set data.on_error=skip to leave them out"):
        check_judged(check, load_prompts(mixed))
    with caplog.at_level("WARNING", logger="engine.rewards.config"):
        kept = check_judged(check, load_prompts(mixed), on_error="skip")
    assert [row.text for row in kept] == [builtin[0].text]
    assert "'synthetic_check' cannot judge 1 of the 2 prompts" in caplog.text and "mixed.jsonl, line 2" in caplog.text
    with pytest.raises(DataError, match="can judge none of the 2 prompts"):  # skip leaves a file no row
        check_judged(check, load_prompts(mine), on_error="skip")
    with pytest.raises(DataError, match=r"mine.jsonl, line 1: field 'answer': expected the reference answer"):
        check_judged([RewardFunctionConfig("math_answer")], load_prompts(mine))
    answered = load_prompts(write_jsonl([{"prompt": "Name a colour.", "answer": "red"}], "answered.jsonl"))
    check_judged([RewardFunctionConfig("math_answer"), RewardFunctionConfig("length_penalty")], answered)


def test_math_answer_judges_rows_by_its_answer_key_and_names_the_key_they_have(
        write_jsonl: Callable[..., str]) -> None:
    """A verl or TRL math prompt file (reference in reward_model.ground_truth or solution) was refused as having
    no 'answer', and math_answer had no way to read it elsewhere."""
    from engine.algorithms.grpo import GRPOTrainConfig
    from engine.config import ConfigError, load_config
    from engine.rewards.config import RewardFunctionConfig, check_judged

    verl = load_prompts(write_jsonl([{"prompt": [{"role": "user", "content": "What is 8*9?"}], "data_source": "gsm8k",
                                      "reward_model": {"style": "rule", "ground_truth": "72"}}], "verl.jsonl"))
    trl = load_prompts(write_jsonl([{"prompt": "What is 2+3?", "solution": "5"}], "trl.jsonl"))
    with pytest.raises(DataError, match=r"verl.jsonl, line 1: field 'answer': expected the reference answer "
                       r"math_answer compares with; the row has 'reward_model.ground_truth': give math_answer "
                       r"kwargs: \{answer_key: reward_model.ground_truth\}"):
        check_judged([RewardFunctionConfig("math_answer")], verl)
    with pytest.raises(DataError, match=r"trl.jsonl, line 1: field 'answer': .*kwargs: \{answer_key: solution\}"):
        check_judged([RewardFunctionConfig("math_answer")], trl)
    solution = RewardFunctionConfig("math_answer", kwargs={"answer_key": "solution"})
    assert check_judged([solution], trl) == trl
    with pytest.raises(DataError, match=r"verl.jsonl, line 1: field 'solution': .*kwargs: \{answer_key: "
                       r"reward_model.ground_truth\}"):  # the key given is the one named
        check_judged([solution], verl)
    with pytest.raises(DataError, match=r"field 'solution': expected the reference answer math_answer compares "
                       r"with \("):  # nothing to suggest
        check_judged([solution], load_prompts(write_jsonl([{"prompt": "q"}], "bare.jsonl")))
    config = load_config(GRPOTrainConfig, None, [
        "reward_functions=[{name: math_answer, kwargs: {answer_key: reward_model.ground_truth}}]"])
    assert check_judged(config.reward_functions, verl) == verl
    from engine.rewards import RewardRunner

    with RewardRunner(config.reward_functions, workers=0) as runner:  # the kwargs reach the function too
        assert runner.score([verl[0].text], ["\\boxed{72}"], [verl[0].reward_metadata()]).totals == [1.0]
    with pytest.raises(ConfigError, match="answer_key"):
        check_judged([RewardFunctionConfig("math_answer", kwargs={"answer_key": ""})], verl)
