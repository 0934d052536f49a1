"""Built-in synthetic data — clearly synthetic, generated deterministically by seed.

Every task (small arithmetic, short word puzzles) has a computable right answer, so the
labels below are *true by construction* and trained models can be judged on ground
truth without any download:

* a response is **right or wrong** (its final answer; :func:`check_response` verifies
  it from the prompt alone) → ``correctness`` 4 / 0. Half the wrong answers are
  *misreadings* (the answer to a sibling task: 57 + 38 answered with 19), half have the
  right answer's *form* (a sum off by 1 or 10, a count off by one, a reversal with two
  letters swapped), so correctness cannot be judged from the answer's form alone
  (:func:`wrong_answer`; rows say which in ``wrong_answer``);
* **tidy or garbled** (shuffled, broken lead-in; the final answer is kept) →
  ``coherence`` 4 / 1;
* **bare, explained or rambling** → ``complexity`` 1 / 2 / 2 and ``verbosity`` 0 / 2 / 4;
* ``helpfulness`` follows one stated rule (:func:`helpfulness`): 0 if wrong, else 1 if
  garbled, else 4 explained / 3 bare / 2 rambling.

Preference pairs (HelpSteer2-Preference shape) take their strength from the helpfulness
difference. Simulated annotators (3-5 per pair) agree in direction when the responses
differ in substance (correctness, coherence); when the responses differ only in style,
each annotator follows personal taste (terse or detailed) a third of the time, so
style-only pairs are where they diverge.
Splits: words are made up (:func:`task_word`) and every word and unordered number pair
belongs to one of ``train`` (80%), ``validation`` and ``eval`` (10% each) by a fixed hash
(:func:`split_of`), so ``builtin:helpsteer:eval`` asks only questions that
``builtin:helpsteer`` (the train split) never asks. ``builtin:sft`` keeps its original ten
words and has no splits.

Every row generated here carries ``"synthetic": True``, except chat SFT rows, which keep
their historical ``{"messages": [...]}`` shape.
"""

from __future__ import annotations

import random
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from engine.data.errors import DataError

_WORDS = ["apple", "river", "stone", "cloud", "tiger", "maple", "ocean", "pencil", "garden", "rocket"]
STYLES = ("bare", "explained", "rambling")
_FILLER = ["Let me think about this step by step.", "This is a good question.", "I will be careful here.",
           "It helps to restate the task first.", "There is a simple method for this."]
DEFAULT_TARGETS = {"helpfulness": 4, "correctness": 4, "coherence": 4, "complexity": 2, "verbosity": 2}


def _task(rng: random.Random) -> tuple[str, str]:
    """The original three tasks (kept so ``sft_conversations`` is unchanged for a seed)."""
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randrange(100), rng.randrange(100)
        return f"What is {a} + {b}?", f"{a} + {b} = {a + b}."
    if kind == 1:
        a, b = rng.randrange(2, 13), rng.randrange(2, 13)
        return f"What is {a} times {b}?", f"{a} times {b} is {a * b}."
    word = rng.choice(_WORDS)
    return f"Spell '{word}' backwards.", f"'{word}' backwards is '{word[::-1]}'."


def sft_conversations(num: int, seed: int) -> list[dict[str, Any]]:
    """``num`` chat rows ``{"messages": [user, assistant]}`` (sometimes with a system turn)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num):
        question, answer = _task(rng)
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        if rng.random() < 0.25:
            messages.insert(0, {"role": "system", "content": "You are a careful assistant."})
        rows.append({"messages": messages})
    return rows


# --- tasks with checkable answers -------------------------------------------------------

SPLITS = ("train", "validation", "eval")
WRONG_KINDS = ("misreading", "same_form")
_ONSETS = "bcdfghjklmnprstvwz"
_CODAS = "lmnrst"


@dataclass(frozen=True)
class Task:
    question: str
    answer: str
    working: str  # explanation template with {answer}
    kind: str  # "arithmetic" | "words"


_PATTERNS: list[tuple[str, re.Pattern[str], Callable[[re.Match[str]], str]]] = [
    ("addition", re.compile(r"What is (\d+) \+ (\d+)\?"), lambda m: str(int(m[1]) + int(m[2]))),
    ("subtraction", re.compile(r"What is (\d+) minus (\d+)\?"), lambda m: str(int(m[1]) - int(m[2]))),
    ("multiplication", re.compile(r"What is (\d+) times (\d+)\?"), lambda m: str(int(m[1]) * int(m[2]))),
    ("reversal", re.compile(r"Spell '([a-z]+)' backwards\."), lambda m: m[1][::-1]),
    ("letter_count", re.compile(r"How many letters are in the word '([a-z]+)'\?"), lambda m: str(len(m[1]))),
    ("capitals", re.compile(r"Write '([a-z]+)' in capital letters\."), lambda m: m[1].upper()),
]


def split_of(key: str) -> str:
    """The split a word (``"w:<word>"``) or an unordered number pair (``"n:<low>:<high>"``) belongs to.

    A fixed hash: 10% ``eval``, 10% ``validation``, 80% ``train``, so the splits never share
    a word or a number pair, whatever the seed or the number of rows.
    """
    bucket = zlib.crc32(key.encode()) % 10
    return "eval" if bucket == 0 else "validation" if bucket == 1 else "train"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown synthetic split {split!r}; choose one of {', '.join(SPLITS)}")


def _pseudo_word(rng: random.Random) -> str:
    """A pronounceable made-up word of 3-9 letters (consonant-vowel syllables, some closed)."""
    while True:
        word = "".join(rng.choice(_ONSETS) + rng.choice("aeiou") + (rng.choice(_CODAS) if rng.random() < 0.3 else "")
                       for _ in range(rng.randint(1, 3)))
        if len(word) >= 3:
            return word


def task_word(rng: random.Random, split: str = "train") -> str:
    """A made-up word of ``split`` (see :func:`split_of`)."""
    while True:
        word = _pseudo_word(rng)
        if split_of(f"w:{word}") == split:
            return word


def _number_pair(rng: random.Random, low: int, high: int, split: str) -> tuple[int, int]:
    """(a, b) drawn from [low, high) whose unordered pair belongs to ``split``."""
    while True:
        a, b = rng.randrange(low, high), rng.randrange(low, high)
        if split_of(f"n:{min(a, b)}:{max(a, b)}") == split:
            return a, b


def make_task(rng: random.Random, split: str = "train") -> Task:
    """One task whose word or number pair belongs to ``split`` (see :func:`split_of`)."""
    _check_split(split)
    kind = rng.randrange(6)
    if kind == 0:
        a, b = _number_pair(rng, 0, 100, split)
        return Task(f"What is {a} + {b}?", str(a + b), f"Adding {a} and {b} gives {{answer}}.", "arithmetic")
    if kind == 1:
        a, b = sorted(_number_pair(rng, 0, 100, split), reverse=True)
        return Task(f"What is {a} minus {b}?", str(a - b), f"Taking {b} away from {a} leaves {{answer}}.",
                    "arithmetic")
    if kind == 2:
        a, b = _number_pair(rng, 2, 13, split)
        return Task(f"What is {a} times {b}?", str(a * b), f"{a} groups of {b} make {{answer}}.", "arithmetic")
    word = task_word(rng, split)
    if kind == 3:
        return Task(f"Spell '{word}' backwards.", word[::-1],
                    f"Reading '{word}' from the last letter to the first gives {{answer}}.", "words")
    if kind == 4:
        return Task(f"How many letters are in the word '{word}'?", str(len(word)),
                    f"Counting the letters of '{word}' one by one gives {{answer}}.", "words")
    return Task(f"Write '{word}' in capital letters.", word.upper(),
                f"Each letter of '{word}' written as a capital gives {{answer}}.", "words")


def _misreading(task: Task, rng: random.Random) -> str:
    """The right answer to a sibling task on the same numbers or word.

    ``What is 57 + 38?`` answered with 19 (subtracted) or 2166 (multiplied); ``Spell 'river'
    backwards.`` answered with RIVER (capitalised) or 5 (counted). Telling these from the
    right answer needs the prompt (the same answer is right for the sibling task).
    """
    if task.kind == "arithmetic":
        a, b = (int(n) for n in re.findall(r"\d+", task.question))
        options = {str(a + b), str(a - b), str(a * b)}
    else:
        word = task.question.split("'")[1]
        options = {word[::-1], word.upper(), str(len(word))}
    options.discard(task.answer)
    if not options:  # 0 + 0: every reading gives 0
        options = {str(int(task.answer) + 1)}
    return rng.choice(sorted(options))


def _swap_two_letters(text: str, rng: random.Random) -> Optional[str]:
    """``text`` with two different adjacent letters swapped, or None when all letters are equal."""
    places = [i for i in range(len(text) - 1) if text[i] != text[i + 1]]
    if not places:
        return None
    i = rng.choice(places)
    return text[:i] + text[i + 1] + text[i] + text[i + 2:]


def _same_form(task: Task, rng: random.Random) -> str:
    """A wrong answer of the right answer's form: a number off by 1 or 10 (a letter count off
    by one), or the right word with two adjacent letters swapped. Only reading and solving
    the prompt tells it from the right answer."""
    if task.answer.isdigit() or task.answer.startswith("-"):
        value = int(task.answer)
        steps = [1] if "letters are in" in task.question else [1, 10]
        delta = rng.choice(steps) * rng.choice((1, -1))
        return str(value + delta if value + delta >= 0 else value - delta)
    swapped = _swap_two_letters(task.answer, rng)
    return swapped if swapped is not None else _misreading(task, rng)


def wrong_answer(task: Task, kind: str, rng: random.Random) -> str:
    """A wrong answer of ``kind``: ``misreading`` (a sibling task's answer) or ``same_form``."""
    if kind == "misreading":
        return _misreading(task, rng)
    if kind == "same_form":
        return _same_form(task, rng)
    raise ValueError(f"unknown kind of wrong answer {kind!r}; choose one of {', '.join(WRONG_KINDS)}")


def _garble(text: str, rng: random.Random) -> str:
    words = text.replace(".", "").split()
    rng.shuffle(words)
    out = []
    for word in words:
        out.append(word)
        if rng.random() < 0.3:
            out.append(word)
    return " ".join(out).lower()


def render_response(task: Task, correct: bool, coherent: bool, style: str, rng: random.Random,
                    wrong_kind: str = "misreading") -> str:
    """A response whose last word/number is its final answer (right, or wrong of ``wrong_kind``)."""
    answer = task.answer if correct else wrong_answer(task, wrong_kind, rng)
    return compose_response(task, answer, coherent, style, rng)


def compose_response(task: Task, answer: str, coherent: bool, style: str, rng: random.Random) -> str:
    """A response in ``style`` (tidy or garbled) that ends with ``answer``."""
    if style == "bare":
        lead = ""
    elif style == "explained":
        lead = task.working.format(answer=answer) + " So the answer is"
    else:
        fillers = rng.sample(_FILLER, 3)
        lead = " ".join(fillers[:2] + [f"The task was: {task.question}", fillers[2],
                                       task.working.format(answer=answer), "So, after all that, the answer is"])
    if not coherent:
        lead = _garble(lead or task.question, rng) + " answer"
    return f"{lead} {answer}.".strip()


def helpfulness(correct: bool, coherent: bool, style: str) -> int:
    """The stated rule: 0 if wrong; else 1 if garbled; else explained 4, bare 3, rambling 2."""
    if not correct:
        return 0
    if not coherent:
        return 1
    return {"explained": 4, "bare": 3, "rambling": 2}[style]


def ratings(correct: bool, coherent: bool, style: str) -> dict[str, int]:
    """All five HelpSteer2 attributes of a response with these properties."""
    return {
        "helpfulness": helpfulness(correct, coherent, style),
        "correctness": 4 if correct else 0,
        "coherence": 4 if coherent else 1,
        "complexity": {"bare": 1, "explained": 2, "rambling": 2}[style],
        "verbosity": {"bare": 0, "explained": 2, "rambling": 4}[style],
    }


def _final_answer(response: str) -> Optional[str]:
    tokens = re.findall(r"-?\d+|[A-Za-z]+", response)
    return tokens[-1] if tokens else None


def check_response(prompt: str, response: str) -> bool:
    """True when ``response``'s final answer solves the (last) task in ``prompt``.

    Works on any prompt produced here, including multi-turn prompts with ``<extra_id_1>``
    markers; a prompt with no recognisable task returns False.
    """
    found = _last_task(prompt)
    return found is not None and _final_answer(response) == found[1]


def _last_task(prompt: str) -> Optional[tuple[str, str]]:
    """(kind, right answer) of the last task in ``prompt``, or None."""
    found: Optional[tuple[int, str, str]] = None
    for kind, pattern, solve in _PATTERNS:
        for match in pattern.finditer(prompt):
            if found is None or match.start() > found[0]:
                found = (match.start(), kind, solve(match))
    return None if found is None else found[1:]


def task_kind(prompt: str) -> str:
    """The kind of the (last) task in ``prompt``: 'addition', 'subtraction', 'multiplication',
    'reversal', 'letter_count', 'capitals', or 'unknown'."""
    found = _last_task(prompt)
    return "unknown" if found is None else found[0]


# --- data sets --------------------------------------------------------------------------

def _sample_properties(rng: random.Random) -> tuple[bool, bool, str]:
    return rng.random() < 0.6, rng.random() < 0.8, rng.choice(STYLES)


def _wrong_kind(rng: random.Random, correct: bool) -> Optional[str]:
    """None for a right answer, else ``misreading`` or ``same_form`` (half each)."""
    return None if correct else rng.choice(WRONG_KINDS)


def prompt_text(rng: random.Random, task: Task, split: str = "train") -> str:
    """Mostly single-turn; one in ten is multi-turn with HelpSteer's ``<extra_id_1>`` markers
    (the earlier turn's task comes from the same split)."""
    if rng.random() >= 0.1:
        return task.question
    earlier = make_task(rng, split)
    reply = render_response(earlier, True, True, "bare", rng)
    return f"{earlier.question}\n<extra_id_1>Assistant\n{reply}\n<extra_id_1>User\n{task.question}"


def helpsteer_rows(num: int, seed: int, split: str = "train") -> list[dict[str, Any]]:
    """HelpSteer2-shaped rows: two responses per prompt (adjacent), five true ratings each.

    ``wrong_answer`` says what a wrong response got wrong: ``misreading`` or ``same_form``
    (:func:`wrong_answer`); None when the response is right.
    """
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    while len(rows) < num:
        task = make_task(rng, split)
        prompt = prompt_text(rng, task, split)
        for _ in range(min(2, num - len(rows))):
            correct, coherent, style = _sample_properties(rng)
            kind = _wrong_kind(rng, correct)
            response = render_response(task, correct, coherent, style, rng, kind or "misreading")
            rows.append({"prompt": prompt, "response": response, **ratings(correct, coherent, style),
                         "wrong_answer": kind, "synthetic": True})
    return rows


def _round_half_away(value: float) -> int:
    return int(value + 0.5) if value >= 0 else -int(-value + 0.5)


def _annotators(rng: random.Random, true_strength: int, style_only: bool, second_terser: bool) -> list[int]:
    """3-5 votes; on style-only pairs each annotator follows personal taste 35% of the time."""
    votes = []
    for _ in range(rng.randint(3, 5)):
        if style_only and rng.random() < 0.35:
            likes_terse = rng.random() < 0.5
            direction = 1 if likes_terse == second_terser else -1
            votes.append(direction * rng.randint(1, 2))
        elif true_strength == 0:
            votes.append(rng.choice([-1, 0, 0, 1]))
        else:
            magnitude = min(3, max(1, abs(true_strength) + rng.choice([-1, 0, 0, 1])))
            votes.append(magnitude if true_strength > 0 else -magnitude)
    return votes


def _pair(rng: random.Random, split: str) -> dict[str, Any]:
    task = make_task(rng, split)
    prompt = prompt_text(rng, task, split)
    while True:
        first, second = _sample_properties(rng), _sample_properties(rng)
        response_1 = render_response(task, *first, rng, _wrong_kind(rng, first[0]) or "misreading")
        response_2 = render_response(task, *second, rng, _wrong_kind(rng, second[0]) or "misreading")
        if response_1 != response_2:
            break
    h1, h2 = helpfulness(*first), helpfulness(*second)
    style_only = first[:2] == second[:2] == (True, True)
    true_strength = max(-3, min(3, h2 - h1))
    terse = {"bare": 0, "explained": 1, "rambling": 2}
    votes = _annotators(rng, true_strength, style_only, terse[second[2]] < terse[first[2]])
    return {
        "prompt": prompt, "response_1": response_1, "response_2": response_2,
        "preference_strength": _round_half_away(sum(votes) / len(votes)),
        "individual_preference": votes, "true_strength": true_strength,
        "difference": "style" if style_only else "substance", "subset": task.kind, "synthetic": True,
    }


def preference_pairs(num: int, seed: int, split: str = "train") -> list[dict[str, Any]]:
    """HelpSteer2-Preference-shaped pairs with simulated annotators (see module docstring).

    Extra fields: ``true_strength`` (clipped helpfulness difference, response_2 minus
    response_1), ``difference`` (``"style"`` or ``"substance"``) and ``subset``
    (``"arithmetic"`` or ``"words"``).
    """
    rng = random.Random(seed)
    return [_pair(rng, split) for _ in range(num)]


def generic_pairs(num: int, seed: int, split: str = "train") -> list[dict[str, Any]]:
    """``{"prompt", "chosen", "rejected", "margin", "subset", "annotator_strengths"}`` pairs.

    Built from :func:`preference_pairs` (ties dropped, generated until ``num`` remain);
    ``margin`` is the overall strength magnitude, annotators are oriented so that
    positive means "chosen is better".
    """
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    while len(rows) < num:
        pair = _pair(rng, split)
        strength = pair["preference_strength"]
        if strength == 0:
            continue
        sign = 1 if strength > 0 else -1
        chosen, rejected = (pair["response_2"], pair["response_1"]) if sign > 0 else (pair["response_1"],
                                                                                      pair["response_2"])
        rows.append({"prompt": pair["prompt"], "chosen": chosen, "rejected": rejected, "margin": float(abs(strength)),
                     "subset": pair["subset"], "annotator_strengths": [sign * v for v in pair["individual_preference"]],
                     "synthetic": True})
    return rows


def prompt_rows(num: int, seed: int, split: str = "train", with_attributes: bool = False) -> list[dict[str, Any]]:
    """Prompt-only rows for rollouts; with ``with_attributes`` each has SteerLM targets."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num):
        row: dict[str, Any] = {"prompt": prompt_text(rng, make_task(rng, split), split), "synthetic": True}
        if with_attributes:
            style = rng.choice(STYLES)
            row["attributes"] = ratings(True, True, style)
        rows.append(row)
    return rows


SFT_TASK_KINDS = ("addition", "multiplication", "reversal")


def sft_task(rng: random.Random, split: str = "train") -> Task:
    """A task of one of ``builtin:sft``'s three kinds (:data:`SFT_TASK_KINDS`), worded as there and
    with the same number ranges, its number pair or (made-up) word from ``split``."""
    while True:
        task = make_task(rng, split)
        if task_kind(task.question) in SFT_TASK_KINDS:
            return task


def rollout_prompt_rows(num: int, seed: int, split: str = "train") -> list[dict[str, Any]]:
    """Prompts for online RL (``builtin:prompts``): the questions ``builtin:sft`` teaches, one user turn.

    Each row carries its right ``answer`` and its ``task_kind`` (:func:`task_kind`), so a reward
    function can score a rollout without re-solving the task; splits as in :func:`make_task`.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(num):
        task = sft_task(rng, split)
        rows.append({"prompt": task.question, "answer": task.answer, "task_kind": task_kind(task.question),
                     "synthetic": True})
    return rows


def text_rows(num: int, seed: int, split: str = "train") -> list[dict[str, Any]]:
    """Plain-text rows: a question followed by an explained right answer."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num):
        task = make_task(rng, split)
        rows.append({"text": f"{task.question} {render_response(task, True, True, 'explained', rng)}",
                     "synthetic": True})
    return rows


Generator = Callable[..., list[dict[str, Any]]]
BUILTIN: dict[str, tuple[str, Generator]] = {
    "builtin:sft": ("chat", sft_conversations),
    "builtin:text": ("text", text_rows),
    "builtin:helpsteer": ("attributes", helpsteer_rows),
    "builtin:helpsteer2_preference": ("helpsteer2_preference", preference_pairs),
    "builtin:pairs": ("pairs", generic_pairs),
    "builtin:prompts": ("prompts", rollout_prompt_rows),
    "builtin:steerlm_prompts": ("prompts", lambda num, seed, split="train": prompt_rows(num, seed, split, True)),
}
UNSPLIT = ("builtin:sft",)  # the original chat rows: one fixed word list, no splits


def builtin_format(name: str) -> str:
    """The row format (see :mod:`engine.data.schemas`) of built-in data set ``name``."""
    return _lookup(name)[1]


def _lookup(name: str) -> tuple[str, str, Generator]:
    """(split, format, generator) of ``builtin:<set>`` or ``builtin:<set>:<split>``; a bad name is a one-line
    :class:`DataError` naming the built-in sets (or the splits) there are."""
    base, _, split = name.partition(":")[2].partition(":")
    base = f"builtin:{base}"
    if base not in BUILTIN:
        raise DataError(None, "<source>", f"a built-in data set, one of {', '.join(BUILTIN)}", got=name, source=name,
                        hint=f"add :{'|:'.join(SPLITS)} to pick a split, except for {', '.join(UNSPLIT)}")
    if split and base in UNSPLIT:
        raise DataError(None, "<source>", f"{base} without a split ({base} has no splits)", got=name, source=name,
                        hint=f"the sets with {'/'.join(SPLITS)} splits are "
                        f"{', '.join(b for b in BUILTIN if b not in UNSPLIT)}")
    if split and split not in SPLITS:
        raise DataError(None, "<source>", f"a split of {base} among {', '.join(SPLITS)} (unknown split {split!r})",
                        got=name, source=name, hint=f"{base} alone is the train split")
    return split, *BUILTIN[base]


def builtin_rows(name: str, num: int, seed: int) -> list[dict[str, Any]]:
    """``num`` rows of built-in data set ``name``, deterministic in ``seed``.

    ``builtin:<set>`` is the ``train`` split; ``builtin:<set>:validation`` and
    ``builtin:<set>:eval`` draw on words and number pairs the train split never uses
    (:func:`split_of`).
    """
    split, _, generate = _lookup(name)
    return generate(num, seed, split) if split else generate(num, seed)


def tokenizer_corpus(seed: int = 0, num: int = 600) -> list[str]:
    """Text the built-in sentencepiece tokenizer is trained on (every kind of row above)."""
    lines = [m["content"] for row in sft_conversations(num, seed) for m in row["messages"]]
    lines += [row["prompt"] + "\n" + row["response"] for row in helpsteer_rows(num, seed + 1)]
    lines += [row["text"] for row in text_rows(num, seed + 2)]
    headers = ["System\n", "User\n", "Assistant\n", "system\n\n", "user\n\n", "assistant\n\n", "User: ",
               "Assistant: ", "System: ", "helpfulness:4,correctness:4,coherence:4,complexity:2,verbosity:2\n"]
    return lines + headers * 50
