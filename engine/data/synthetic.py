"""Built-in synthetic data — clearly synthetic, generated deterministically by seed.

Every task (small arithmetic, short word puzzles) has a computable right answer, so the
labels below are *true by construction* and trained models can be judged on ground
truth without any download:

* a response is **right or wrong** (its final answer; :func:`check_response` verifies
  it from the prompt alone; a wrong answer is the answer to a sibling task, as if the
  question were misread: :func:`_wrong_answer`) → ``correctness`` 4 / 0;
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
Every row generated here carries ``"synthetic": True``, except chat SFT rows, which keep
their historical ``{"messages": [...]}`` shape.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

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


def make_task(rng: random.Random) -> Task:
    kind = rng.randrange(6)
    word = rng.choice(_WORDS)
    if kind == 0:
        a, b = rng.randrange(100), rng.randrange(100)
        return Task(f"What is {a} + {b}?", str(a + b), f"Adding {a} and {b} gives {{answer}}.", "arithmetic")
    if kind == 1:
        a, b = sorted((rng.randrange(100), rng.randrange(100)), reverse=True)
        return Task(f"What is {a} minus {b}?", str(a - b), f"Taking {b} away from {a} leaves {{answer}}.",
                    "arithmetic")
    if kind == 2:
        a, b = rng.randrange(2, 13), rng.randrange(2, 13)
        return Task(f"What is {a} times {b}?", str(a * b), f"{a} groups of {b} make {{answer}}.", "arithmetic")
    if kind == 3:
        return Task(f"Spell '{word}' backwards.", word[::-1],
                    f"Reading '{word}' from the last letter to the first gives {{answer}}.", "words")
    if kind == 4:
        return Task(f"How many letters are in the word '{word}'?", str(len(word)),
                    f"Counting the letters of '{word}' one by one gives {{answer}}.", "words")
    return Task(f"Write '{word}' in capital letters.", word.upper(),
                f"Each letter of '{word}' written as a capital gives {{answer}}.", "words")


def _wrong_answer(task: Task, rng: random.Random) -> str:
    """A misreading: the right answer to a sibling task on the same numbers or word.

    ``What is 57 + 38?`` answered with 19 (subtracted) or 2166 (multiplied); ``Spell 'river'
    backwards.`` answered with RIVER (capitalised) or 5 (counted). Telling these from the
    right answer needs the prompt (the same answer is right for the sibling task), and a
    tiny model learns it from scratch in minutes. Near misses (57 + 38 = 96) it does not:
    a from-scratch 4-layer model trained 1200 steps on them stayed at chance.
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


def _garble(text: str, rng: random.Random) -> str:
    words = text.replace(".", "").split()
    rng.shuffle(words)
    out = []
    for word in words:
        out.append(word)
        if rng.random() < 0.3:
            out.append(word)
    return " ".join(out).lower()


def render_response(task: Task, correct: bool, coherent: bool, style: str, rng: random.Random) -> str:
    """A response whose last word/number is its final answer (right or wrong)."""
    answer = task.answer if correct else _wrong_answer(task, rng)
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


def _prompt_text(rng: random.Random, task: Task) -> str:
    """Mostly single-turn; one in ten is multi-turn with HelpSteer's ``<extra_id_1>`` markers."""
    if rng.random() >= 0.1:
        return task.question
    earlier = make_task(rng)
    reply = render_response(earlier, True, True, "bare", rng)
    return f"{earlier.question}\n<extra_id_1>Assistant\n{reply}\n<extra_id_1>User\n{task.question}"


def helpsteer_rows(num: int, seed: int) -> list[dict[str, Any]]:
    """HelpSteer2-shaped rows: two responses per prompt (adjacent), five true ratings each."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    while len(rows) < num:
        task = make_task(rng)
        prompt = _prompt_text(rng, task)
        for _ in range(min(2, num - len(rows))):
            correct, coherent, style = _sample_properties(rng)
            response = render_response(task, correct, coherent, style, rng)
            rows.append({"prompt": prompt, "response": response, **ratings(correct, coherent, style),
                         "synthetic": True})
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


def _pair(rng: random.Random) -> dict[str, Any]:
    task = make_task(rng)
    prompt = _prompt_text(rng, task)
    while True:
        first, second = _sample_properties(rng), _sample_properties(rng)
        response_1 = render_response(task, *first, rng)
        response_2 = render_response(task, *second, rng)
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


def preference_pairs(num: int, seed: int) -> list[dict[str, Any]]:
    """HelpSteer2-Preference-shaped pairs with simulated annotators (see module docstring).

    Extra fields: ``true_strength`` (clipped helpfulness difference, response_2 minus
    response_1), ``difference`` (``"style"`` or ``"substance"``) and ``subset``
    (``"arithmetic"`` or ``"words"``).
    """
    rng = random.Random(seed)
    return [_pair(rng) for _ in range(num)]


def generic_pairs(num: int, seed: int) -> list[dict[str, Any]]:
    """``{"prompt", "chosen", "rejected", "margin", "subset", "annotator_strengths"}`` pairs.

    Built from :func:`preference_pairs` (ties dropped, generated until ``num`` remain);
    ``margin`` is the overall strength magnitude, annotators are oriented so that
    positive means "chosen is better".
    """
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    while len(rows) < num:
        pair = _pair(rng)
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


def prompt_rows(num: int, seed: int, with_attributes: bool = False) -> list[dict[str, Any]]:
    """Prompt-only rows for rollouts; with ``with_attributes`` each has SteerLM targets."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num):
        row: dict[str, Any] = {"prompt": _prompt_text(rng, make_task(rng)), "synthetic": True}
        if with_attributes:
            style = rng.choice(STYLES)
            row["attributes"] = ratings(True, True, style)
        rows.append(row)
    return rows


def text_rows(num: int, seed: int) -> list[dict[str, Any]]:
    """Plain-text rows: a question followed by an explained right answer."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num):
        task = make_task(rng)
        rows.append({"text": f"{task.question} {render_response(task, True, True, 'explained', rng)}",
                     "synthetic": True})
    return rows


BUILTIN: dict[str, tuple[str, Callable[[int, int], list[dict[str, Any]]]]] = {
    "builtin:sft": ("chat", sft_conversations),
    "builtin:text": ("text", text_rows),
    "builtin:helpsteer": ("attributes", helpsteer_rows),
    "builtin:helpsteer2_preference": ("helpsteer2_preference", preference_pairs),
    "builtin:pairs": ("pairs", generic_pairs),
    "builtin:prompts": ("prompts", prompt_rows),
    "builtin:steerlm_prompts": ("prompts", lambda num, seed: prompt_rows(num, seed, with_attributes=True)),
}


def builtin_format(name: str) -> str:
    """The row format (see :mod:`engine.data.schemas`) of built-in data set ``name``."""
    return _lookup(name)[0]


def _lookup(name: str) -> tuple[str, Callable[[int, int], list[dict[str, Any]]]]:
    if name not in BUILTIN:
        raise ValueError(f"unknown built-in data set {name!r}; available: {', '.join(BUILTIN)}")
    return BUILTIN[name]


def builtin_rows(name: str, num: int, seed: int) -> list[dict[str, Any]]:
    """``num`` rows of built-in data set ``name`` (e.g. ``builtin:sft``), deterministic in ``seed``."""
    return _lookup(name)[1](num, seed)


def tokenizer_corpus(seed: int = 0, num: int = 600) -> list[str]:
    """Text the built-in sentencepiece tokenizer is trained on (every kind of row above)."""
    lines = [m["content"] for row in sft_conversations(num, seed) for m in row["messages"]]
    lines += [row["prompt"] + "\n" + row["response"] for row in helpsteer_rows(num, seed + 1)]
    lines += [row["text"] for row in text_rows(num, seed + 2)]
    headers = ["System\n", "User\n", "Assistant\n", "system\n\n", "user\n\n", "assistant\n\n", "User: ",
               "Assistant: ", "System: ", "helpfulness:4,correctness:4,coherence:4,complexity:2,verbosity:2\n"]
    return lines + headers * 50
