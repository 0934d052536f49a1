"""Reward functions by registered name or module:function; their config, alone and in an algorithm's."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from engine.config import load_config, save_config
from engine.errors import ConfigError
from engine.rewards import (
    RewardFunctionConfig,
    RewardRunner,
    parse_reward_configs,
    registered_names,
    resolve_reward,
    reward_function,
)

SAMPLE = "tests.engine.rewards.sample_rewards"


def test_builtins_are_registered() -> None:
    assert {"synthetic_check", "math_answer", "regex_format", "length_penalty"} <= set(registered_names())
    assert resolve_reward("math_answer").batched is False


def test_module_function_and_batched_marks() -> None:
    brevity = resolve_reward(f"{SAMPLE}:brevity")
    assert brevity.fn("", "short", {}) == 1.0 and not brevity.batched
    assert resolve_reward(f"{SAMPLE}:lengths").batched
    assert resolve_reward("sample_batched_parity").batched  # registered when the module was imported


@pytest.mark.parametrize("name, message", [
    ("no_such_reward", "unknown reward function 'no_such_reward'; registered: .*math_answer"),
    ("tests.engine.rewards.nope:f", "cannot import module 'tests.engine.rewards.nope'"),
    (f"{SAMPLE}:missing", "has no 'missing'"),
])
def test_unknown_functions_are_config_errors(name: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_reward(name)


def test_a_module_in_the_current_directory_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The `keel` console script does not put the current directory on sys.path; the user's reward module
    beside the command is found all the same (the reward workers, `python -c`, see it there too)."""
    (tmp_path / "my_keel_reward.py").write_text("def score(prompt, response, metadata):\n    return 0.5\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert resolve_reward("my_keel_reward:score").fn("", "", {}) == 0.5
    assert sys.path[-1] == str(tmp_path)


def test_a_module_whose_own_import_fails_is_not_called_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reward module that imports a package not installed was reported as 'cannot import module' itself, and the
    user went looking for a path problem."""
    (tmp_path / "needs_a_package.py").write_text("import keel_no_such_package\n")
    (tmp_path / "needs_a_name.py").write_text("from json import no_such_name\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"^reward function 'needs_a_package:f': module 'needs_a_package' imports "
                       r"'keel_no_such_package', which is not installed here"):
        resolve_reward("needs_a_package:f")
    with pytest.raises(ConfigError, match=r"importing module 'needs_a_name' raised ImportError: cannot import name "
                       r"'no_such_name'"):
        resolve_reward("needs_a_name:f")
    with pytest.raises(ConfigError, match="cannot import module 'tests.engine.nope.deeper'"):  # a missing package
        resolve_reward("tests.engine.nope.deeper:f")


def test_register_twice_under_one_name_is_refused() -> None:
    def first(prompt: str, response: str, metadata: dict) -> float:
        return 0.0

    with pytest.raises(ValueError, match="already registered"):
        reward_function("math_answer")(first)


@pytest.mark.parametrize("kwargs, message", [
    ({"name": ""}, "non-empty"),
    ({"name": "pkg.mod:"}, "package.module:function"),
    ({"name": "math_answer", "weight": float("nan")}, "weight=nan must be a finite number"),
    ({"name": "math_answer", "timeout_seconds": 0}, "timeout_seconds=0 must be a number > 0"),
    ({"name": "math_answer", "on_error": "ignore"}, "on_error='ignore' is not one of 'zero', 'skip', 'raise'"),
    ({"name": "math_answer", "kwargs": [1]}, "kwargs=\\[1\\] must be a mapping"),
])
def test_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RewardFunctionConfig(**kwargs)


def test_kwargs_are_checked_before_any_work() -> None:
    with pytest.raises(ConfigError, match="regex_format.*pattern"):
        RewardRunner([RewardFunctionConfig("regex_format")], workers=0)
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        RewardRunner([RewardFunctionConfig("regex_format", kwargs={"pattern": "("})], workers=0)
    with pytest.raises(ConfigError, match="unexpected keyword argument 'tokens'"):
        RewardRunner([RewardFunctionConfig("length_penalty", kwargs={"tokens": 3})], workers=0)
    with pytest.raises(ConfigError, match="unit='bytes'"):
        RewardRunner([RewardFunctionConfig("length_penalty", kwargs={"unit": "bytes"})], workers=0)
    # a function without the metadata argument: said as a signature to give it, not as the kwargs' fault
    with pytest.raises(ConfigError, match=r"two_args\(prompt, response\) cannot be called as "
                                          r"two_args\(prompt, response, metadata, \*\*kwargs\)"):
        RewardRunner([RewardFunctionConfig(f"{SAMPLE}:two_args")], workers=0)


def test_unpicklable_functions_are_refused_for_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    import tests.engine.rewards.sample_rewards as sample

    monkeypatch.setattr(sample, "anonymous", sample.lambda_holder(), raising=False)
    with pytest.raises(ConfigError, match="cannot be sent to a worker process"):
        RewardRunner([RewardFunctionConfig(f"{SAMPLE}:anonymous")], workers=1)


def test_parse_names_the_entry() -> None:
    configs = parse_reward_configs([{"name": "math_answer"}, {"name": "regex_format", "weight": 2,
                                                             "kwargs": {"pattern": "x"}}], "grpo.rewards")
    assert [c.component for c in configs] == ["math_answer", "regex_format"] and configs[1].weight == 2.0
    with pytest.raises(ConfigError, match=r"grpo.rewards\[1\]: unknown config key 'wieght'"):
        parse_reward_configs([{"name": "math_answer"}, {"name": "x", "wieght": 1}], "grpo.rewards")
    with pytest.raises(ConfigError, match=r"grpo.rewards\[0\]: missing 'name'"):
        parse_reward_configs([{"weight": 1}], "grpo.rewards")
    with pytest.raises(ConfigError, match=r"space after the colon: \{name: math_answer\}"):  # YAML read {name:math_answer}
        parse_reward_configs([{"name:math_answer": None}], "grpo.rewards")
    with pytest.raises(ConfigError, match=r"grpo.rewards\[0\].*on_error='nope'"):
        parse_reward_configs([{"name": "math_answer", "on_error": "nope"}], "grpo.rewards")
    with pytest.raises(ConfigError, match="'regex_format' is listed twice; give each a distinct 'label'"):
        parse_reward_configs([{"name": "regex_format"}, {"name": "regex_format"}], "grpo.rewards")
    # an unknown name is refused with the config (it was found after the models were built); a list with a
    # module:function entry is left to the run, whose import of that module may register more names
    with pytest.raises(ConfigError, match=r"grpo.rewards\[1\]: unknown reward function 'nosuch'; registered: .*math_answer"):
        parse_reward_configs([{"name": "math_answer"}, {"name": "nosuch"}], "grpo.rewards")
    assert len(parse_reward_configs([{"name": "nosuch"}, {"name": f"{SAMPLE}:brevity"}], "grpo.rewards")) == 2


@dataclass
class ToyRLSection:
    reward_functions: list[RewardFunctionConfig] = field(
        default_factory=lambda: [RewardFunctionConfig("synthetic_check")], metadata={"doc": "Reward functions."})
    reward_workers: int = 2

    def __post_init__(self) -> None:
        self.reward_functions = parse_reward_configs(self.reward_functions, "toy.reward_functions")


@dataclass
class ToyConfig:
    toy: ToyRLSection = field(default_factory=ToyRLSection)


def test_as_a_list_field_of_an_algorithm_config(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("toy:\n  reward_functions:\n    - {name: math_answer}\n"
                    "    - {name: regex_format, weight: 0.2, kwargs: {pattern: 'boxed'}, on_error: skip}\n")
    config = load_config(ToyConfig, str(path))
    assert [(c.name, c.weight, c.on_error) for c in config.toy.reward_functions] == [
        ("math_answer", 1.0, "zero"), ("regex_format", 0.2, "skip")]
    assert load_config(ToyConfig).toy.reward_functions[0].name == "synthetic_check"
    overridden = load_config(ToyConfig, str(path), ["toy.reward_functions=[{name: length_penalty, weight: 0.5}]"])
    assert [(c.name, c.weight) for c in overridden.toy.reward_functions] == [("length_penalty", 0.5)]
    save_config(config, str(tmp_path / "saved.yaml"))
    assert load_config(ToyConfig, str(tmp_path / "saved.yaml")) == config
    with pytest.raises(ConfigError, match=r"toy.reward_functions\[0\]: .*timeout_seconds=-1"):
        load_config(ToyConfig, None, ["toy.reward_functions=[{name: math_answer, timeout_seconds: -1}]"])


def test_the_checks_before_any_work_call_each_function_as_the_run_will(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """``keel config show`` and ``keel data validate --config`` passed a reward function that does not import, or
    has TRL's signature ``fn(completions, solution, **kwargs)``; keel train refused the latter only after building
    the policy and the reference. Now all three refuse both, and the trainer before any model is built."""
    from engine.cli import main
    from tests.helpers import REPO

    (tmp_path / "trl_rewards.py").write_text("def accuracy(completions, solution, **kwargs):\n    return [0.0]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "What is 1+1?", "answer": "2"}\n')
    tiny = ["--config", str(REPO / "examples" / "grpo_tiny.yaml"), f"rollout.prompts={prompts}"]
    for name, message in (("trl_rewards:accuracy", "accuracy(completions, solution, **kwargs) cannot be called as "
                                                  "accuracy(prompt, response, metadata, **kwargs)"),
                          ("nosuch_module:fn", "cannot import module 'nosuch_module'")):
        functions = f"reward_functions=[{{name: '{name}'}}]"
        capsys.readouterr()
        assert main(["config", "show", *tiny[1:], "--algorithm", "grpo", functions]) == 2
        assert f"reward_functions[0]: reward function {name!r}: " in capsys.readouterr().err
        (tmp_path / "run.yaml").write_text((REPO / "examples" / "grpo_tiny.yaml").read_text()
                                           + f"\nreward_functions:\n  - name: '{name}'\n")
        assert main(["data", "validate", str(prompts), "--config", str(tmp_path / "run.yaml"),
                     "--algorithm", "grpo"]) == 1
        assert message in capsys.readouterr().out
        assert main(["train", "grpo", *tiny, functions, f"run.output_dir={tmp_path / 'run'}"]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "run" / "config.yaml").exists()  # nothing built, nothing written
