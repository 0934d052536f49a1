"""The built-in reward functions on fixed inputs."""

from __future__ import annotations

from fractions import Fraction

import pytest

from engine.rewards.builtins import (
    extract_answer,
    last_boxed,
    last_number,
    length_penalty,
    math_answer,
    normalize_answer,
    regex_format,
    synthetic_check,
)


def test_synthetic_check() -> None:
    assert synthetic_check("What is 12 + 30?", "12 + 30 = 42.", {}) == 1.0
    assert synthetic_check("What is 12 + 30?", "12 + 30 = 43.", {}) == 0.0
    assert synthetic_check("Spell 'tiger' backwards.", "'tiger' backwards is 'regit'.", {}) == 1.0
    assert synthetic_check("Tell me a joke.", "42", {}) == 0.0


@pytest.mark.parametrize("text, expected", [
    ("1,000", Fraction(1000)), ("1000.0", Fraction(1000)), ("+1000", Fraction(1000)), ("1e3", Fraction(1000)),
    ("$1,000", Fraction(1000)), ("3/4", Fraction(3, 4)), ("\\frac{3}{4}", Fraction(3, 4)),
    ("-\\dfrac{1}{2}", Fraction(-1, 2)), ("0.75", Fraction(3, 4)), (0.1, Fraction(1, 10)), (42, Fraction(42)),
    ("50\\%", Fraction(50)), ("5.", Fraction(5)), ("\\text{ Yes }", "yes"), ("x = 2y", "x=2y"),
    ("1,2", "1,2"), ("1e99999999", "1e99999999"),
])
def test_normalize_answer(text: object, expected: object) -> None:
    assert normalize_answer(text) == expected


def test_boxed_wins_over_last_number() -> None:
    assert last_boxed("so \\boxed{\\frac{1}{2}} is it, not 7") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{1} then \\boxed{{2}+1}") == "{2}+1"
    assert last_boxed("\\boxed{unclosed") is None and last_boxed("none") is None
    assert extract_answer("first 3, \\boxed{12}, then 99") == "12"
    assert extract_answer("first 3, then 1,000 apples.") == "1,000"
    assert extract_answer("no digits here") is None
    assert last_number("from 5-3 we get -2.5 and 3/4") == "3/4"
    assert last_number("version v2") is None


@pytest.mark.parametrize("response, answer, reward", [
    ("The total is 1,000.", 1000, 1.0),
    ("The total is 1000.0", "1,000", 1.0),
    ("It is +5", "5", 1.0),
    ("Half: \\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("About 0.1", 0.1, 1.0),
    ("I think \\boxed{7} though 8 is close", "8", 0.0),
    ("It is 5 or maybe 6", "5", 0.0),
    ("no number", "5", 0.0),
    ("\\boxed{Paris}", "paris", 1.0),
])
def test_math_answer(response: str, answer: object, reward: float) -> None:
    assert math_answer("q", response, {"answer": answer}) == reward


def test_math_answer_needs_an_answer() -> None:
    with pytest.raises(KeyError, match="metadata\\['answer'\\]"):
        math_answer("q", "5", {})


def test_math_answer_reads_the_reference_at_its_answer_key() -> None:
    """verl rows carry the reference as reward_model.ground_truth and TRL's math sets as solution; math_answer
    read metadata['answer'] only, so every such row raised."""
    verl = {"data_source": "gsm8k", "reward_model": {"style": "rule", "ground_truth": "72"}}
    assert math_answer("q", "so \\boxed{72}", verl, answer_key="reward_model.ground_truth") == 1.0
    assert math_answer("q", "71", verl, answer_key="reward_model.ground_truth") == 0.0
    assert math_answer("q", "\\boxed{\\frac{1}{2}}", {"solution": "0.5"}, answer_key="solution") == 1.0
    assert math_answer("q", "3", {"reward_model.ground_truth": 3}, answer_key="reward_model.ground_truth") == 1.0
    # a worked solution, as TRL's NuminaMath sets keep it, is judged by its boxed answer (it scored 0 every time)
    worked = {"solution": "Adding 2 and 3 gives $2 + 3 = 5$, so the answer is $\\boxed{5}$."}
    assert math_answer("q", "That makes \\boxed{5}.", worked, answer_key="solution") == 1.0
    assert math_answer("q", "That makes \\boxed{3}.", worked, answer_key="solution") == 0.0
    with pytest.raises(KeyError, match=r"metadata\['reward_model'\]\['ground_truth'\]"):
        math_answer("q", "5", {"reward_model": {"style": "rule"}}, answer_key="reward_model.ground_truth")


def test_regex_format_modes() -> None:
    response = "<think>a\nb</think> <answer>4</answer>"
    assert regex_format("", response, {}, pattern=r"<answer>\d+</answer>") == 1.0
    assert regex_format("", response, {}, pattern=r"<answer>", mode="match") == 0.0
    assert regex_format("", response, {}, pattern=r"<think>.*</think> <answer>.*</answer>", mode="fullmatch") == 0.0
    assert regex_format("", response, {}, pattern=r"(?s)<think>.*</think> <answer>.*</answer>", mode="fullmatch") == 1.0


def test_length_penalty() -> None:
    assert length_penalty("", "x" * 100, {}, target=100, scale=50) == 0.0
    assert length_penalty("", "x" * 150, {}, target=100, scale=50) == -1.0
    assert length_penalty("", "x" * 150, {}, target=100, scale=50, coef=0.5) == -0.5
    assert length_penalty("", "one two three four", {}, target=2, scale=1, unit="words") == -2.0
    assert length_penalty("", "", {"response_tokens": 30}, target=10, scale=10, unit="tokens") == -2.0
    assert length_penalty("", "x" * 1024, {}) == -1.0  # defaults: target 512, scale 512
