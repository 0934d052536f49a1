"""The built-in synthetic data: deterministic, and its labels are true by construction."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest

from engine.data.schemas import check_row
from engine.data.synthetic import (
    builtin_rows,
    check_response,
    generic_pairs,
    helpfulness,
    helpsteer_rows,
    make_task,
    preference_pairs,
    prompt_rows,
    sft_conversations,
    split_of,
    wrong_answer,
)


def test_deterministic_by_seed() -> None:
    assert helpsteer_rows(50, 1) == helpsteer_rows(50, 1) != helpsteer_rows(50, 2)
    assert preference_pairs(20, 1) == preference_pairs(20, 1)
    assert sft_conversations(5, 0) == builtin_rows("builtin:sft", 5, 0)
    assert sft_conversations(1, 0)[0]["messages"][0]["content"].startswith(("What is", "Spell"))


def test_check_response() -> None:
    assert check_response("What is 12 + 30?", "Adding 12 and 30 gives 42. So the answer is 42.")
    assert not check_response("What is 12 + 30?", "43.")
    assert check_response("Spell 'tiger' backwards.", "regit.")
    assert check_response("Write 'maple' in capital letters.", "MAPLE.") and not check_response(
        "Write 'maple' in capital letters.", "maple.")
    assert check_response("How many letters are in the word 'ocean'?", "5")
    assert check_response("What is 2 + 2?\n<extra_id_1>Assistant\n4.\n<extra_id_1>User\nWhat is 9 minus 4?", "5.")
    assert not check_response("Tell me a story.", "Once upon a time.")


def test_helpsteer_ratings_are_true() -> None:
    rows = helpsteer_rows(600, 4)
    assert all(a["prompt"] == b["prompt"] for a, b in zip(rows[0::2], rows[1::2], strict=True))
    for row in rows:
        check_row("attributes", row)
        correct = check_response(row["prompt"], row["response"])
        assert correct == (row["correctness"] == 4)
        coherent = row["coherence"] == 4
        style = {0: "bare", 2: "explained", 4: "rambling"}[row["verbosity"]]
        assert row["helpfulness"] == helpfulness(correct, coherent, style)
        if coherent and style == "bare":
            assert len(row["response"].split()) == 1
        if coherent and style == "rambling":
            assert "The task was:" in row["response"]
    assert {row["helpfulness"] for row in rows} == {0, 1, 2, 3, 4}


def test_annotators_diverge_only_on_style() -> None:
    pairs = preference_pairs(400, 9)
    diverging = {"style": 0, "substance": 0}
    for pair in pairs:
        check_row("helpsteer2_preference", pair)
        votes = pair["individual_preference"]
        assert 3 <= len(votes) <= 5
        mean = sum(votes) / len(votes)
        assert pair["preference_strength"] == (int(mean + 0.5) if mean >= 0 else -int(-mean + 0.5))
        if pair["difference"] == "substance" and pair["true_strength"]:
            assert all(v * pair["true_strength"] > 0 for v in votes)  # unanimous direction
        diverging[pair["difference"]] += any(v > 0 for v in votes) and any(v < 0 for v in votes)
    assert diverging["style"] > 20


def test_generic_pairs_and_prompts_are_valid() -> None:
    for pair in generic_pairs(100, 3):
        row = check_row("pairs", pair)
        assert row["margin"] >= 1 and sum(row["annotator_strengths"]) > 0
    for row in prompt_rows(20, 3, with_attributes=True):
        assert set(check_row("prompts", row)["attributes"]) == {"helpfulness", "correctness", "coherence",
                                                              "complexity", "verbosity"}


def _subjects(prompt: str) -> set[str]:
    """The words and unordered number pairs a prompt asks about (every turn)."""
    words = {f"w:{w}" for w in re.findall(r"'([a-z]+)'", prompt)}
    pairs = {f"n:{min(int(a), int(b))}:{max(int(a), int(b))}"
             for a, b in re.findall(r"What is (\d+) (?:\+|minus|times) (\d+)\?", prompt)}
    return words | pairs


def test_splits_share_no_word_and_no_number_pair() -> None:
    subjects = {split: set().union(*(_subjects(row["prompt"]) for row in builtin_rows(name, 3000, 5)))
                for split, name in [("train", "builtin:helpsteer"), ("validation", "builtin:helpsteer:validation"),
                                    ("eval", "builtin:helpsteer:eval")]}
    assert all(split_of(key) == split for split, keys in subjects.items() for key in keys)
    assert not subjects["train"] & subjects["eval"] and not subjects["train"] & subjects["validation"]
    assert len({k for k in subjects["train"] if k.startswith("w:")}) > 500  # not ten words
    assert len({k for k in subjects["eval"] if k.startswith("w:")}) > 500
    train_prompts = {row["prompt"] for row in helpsteer_rows(4000, 1)}
    assert not train_prompts & {row["prompt"] for row in helpsteer_rows(2000, 777, "eval")}
    assert builtin_rows("builtin:pairs:eval", 3, 1) == generic_pairs(3, 1, "eval")
    with pytest.raises(ValueError, match="has no splits"):
        builtin_rows("builtin:sft:eval", 3, 1)
    with pytest.raises(ValueError, match="unknown split"):
        builtin_rows("builtin:helpsteer:test", 3, 1)


def test_wrong_answers_are_misreadings_or_of_the_right_form() -> None:
    rows = helpsteer_rows(3000, 6)
    kinds = Counter(row["wrong_answer"] for row in rows)
    assert kinds[None] == sum(row["correctness"] == 4 for row in rows)
    assert min(kinds["misreading"], kinds["same_form"]) > 0.4 * (kinds["misreading"] + kinds["same_form"])
    rng = random.Random(0)
    for _ in range(500):
        task = make_task(rng, "eval")
        same_form, misreading = wrong_answer(task, "same_form", rng), wrong_answer(task, "misreading", rng)
        assert same_form != task.answer and misreading != task.answer
        if task.answer.isdigit():
            assert same_form.lstrip("-").isdigit() and abs(int(same_form) - int(task.answer)) in (
                (1,) if "letters" in task.question else (1, 10))
        else:  # two adjacent letters swapped, same letters, same case
            assert sorted(same_form) == sorted(task.answer) and same_form.isupper() == task.answer.isupper()
            assert sum(a != b for a, b in zip(same_form, task.answer, strict=True)) == 2
