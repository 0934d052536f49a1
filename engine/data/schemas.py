"""Row schemas: check one row and return it in normal form, or raise :class:`DataError`.

Formats (``fmt``):

* ``chat`` — ``{"messages": [{"role", "content"}, ...]}`` (optional ``attributes``):
  an optional leading system turn, then user/assistant alternating, starting with
  user and ending with assistant; or one exchange as ``prompt`` (str or messages ending
  with user) and ``response`` or ``completion`` (str), which becomes ``messages``; or
  ShareGPT's and NeMo-Aligner's ``conversations`` (:func:`conversation_row`).
* ``text`` — ``{"text": str}``.
* ``attributes`` — HelpSteer/HelpSteer2 rows: ``prompt``, ``response`` and the five
  ratings 0..4 (:data:`ATTRIBUTES`); a missing or null rating becomes :data:`MISSING`.
* ``helpsteer2_preference`` — ``prompt``, ``response_1``, ``response_2``,
  ``preference_strength`` in -3..3 (negative: response_1 better), optional
  ``individual_preference`` (ints, or dicts with ``score``) normalised to a list of ints.
* ``pairs`` — ``prompt`` (str or messages ending with user), ``chosen``, ``rejected``
  (str, or messages whose last turn is the assistant reply), optional ``margin``,
  ``subset`` and ``annotator_strengths`` (ints, positive = chosen better).
* ``prompts`` — ``prompt`` (str or messages ending with user), optional target
  ``attributes`` (dict or ``"helpfulness:4,..."`` string), normalised to a dict, and
  optional ``answer`` (a string or finite number: the reference answer reward functions
  check against).

Unknown extra fields are kept; data sets carry many (justifications, ids, ...).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from typing import Any, Optional

from engine.data.errors import Absent, DataError, Where

ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")


@functools.lru_cache(maxsize=1024)
def near_attribute(key: str) -> Optional[str]:
    """The attribute a field name ``key`` that is none means, by case or one slip of spelling
    ("Helpfulness", "helpfullness"): such a field is never read, and its ratings are lost. Cached: every
    row asks again for the same few keys."""
    import difflib

    if key in ATTRIBUTES:
        return None
    found = difflib.get_close_matches(key.lower(), ATTRIBUTES, n=1, cutoff=0.85)
    return found[0] if found else None
MISSING = -100
ROLES = ("system", "user", "assistant")

Row = dict[str, Any]


def _fail(where: Optional[Where], field: str, expected: str, got: Any = None) -> DataError:
    return DataError(where, field, expected, got)


def _string(row: Row, field: str, where: Optional[Where], allow_empty: bool = False) -> str:
    value = row.get(field)
    if not isinstance(value, str):
        raise _fail(where, field, "a string", Absent(row) if field not in row else value)
    if not allow_empty and not value.strip():
        raise _fail(where, field, "a non-empty string", value)
    return value


def _integer(value: Any) -> Optional[int]:
    """``value`` as an int if it is integral (floats like 3.0 from Parquet count), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _ranged(value: Any, field: str, low: int, high: int, where: Optional[Where]) -> int:
    number = _integer(value)
    if number is None or not low <= number <= high:
        raise _fail(where, field, f"an integer in {low}..{high}", value)
    return number


def check_messages(messages: Any, where: Optional[Where], field: str = "messages",
                   last: str = "assistant") -> list[dict[str, str]]:
    """Roles and alternation of a conversation; ``last`` is the role it must end with."""
    if not isinstance(messages, list) or not messages:
        raise _fail(where, field, "a non-empty list of {role, content} messages", messages)
    out = []
    expected_role = "user"
    for index, message in enumerate(messages):
        name = f"{field}[{index}]"
        if not isinstance(message, dict):
            raise _fail(where, name, "a {role, content} object", message)
        role = message.get("role")
        if role not in ROLES:
            raise _fail(where, f"{name}.role", "one of system/user/assistant", role)
        content = message.get("content")
        if not isinstance(content, str):
            raise _fail(where, f"{name}.content", "a string", content)
        if role == "system":
            if index != 0:
                raise _fail(where, f"{name}.role", "'system' only as the first turn", role)
        elif role != expected_role:
            raise _fail(where, f"{name}.role", f"'{expected_role}' (turns must alternate user/assistant, "
                        "starting with user)", role)
        else:
            expected_role = "assistant" if role == "user" else "user"
        out.append({"role": role, "content": content})
    if out[-1]["role"] != last:
        article = "an" if last == "assistant" else "a"
        raise _fail(where, f"{field}[{len(out) - 1}].role", f"the conversation to end with {article} '{last}' turn",
                    out[-1]["role"])
    return out


def parse_attributes(value: Any, where: Optional[Where], field: str = "attributes",
                     known_only: bool = False) -> dict[str, int]:
    """``{"helpfulness": 4, ...}`` or ``"helpfulness:4,correctness:4"`` → dict of ints 0..4 (``known_only``: names
    other than :data:`ATTRIBUTES` are left out instead of refused)."""
    if isinstance(value, str):
        pairs: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in value.split(","))):
            name, sep, number = part.partition(":")
            if not sep or not number.strip().lstrip("-").isdigit():
                raise _fail(where, field, "'name:value' items separated by commas", value)
            pairs[name.strip()] = int(number)
        value = pairs
    if not isinstance(value, dict):
        raise _fail(where, field, "a dict or a 'helpfulness:4,...' string", value)
    out = {}
    for name, number in value.items():
        if name not in ATTRIBUTES and known_only:
            continue
        if name not in ATTRIBUTES:
            raise _fail(where, f"{field}.{name}", f"an attribute among {', '.join(ATTRIBUTES)}", name)
        out[name] = _ranged(number, f"{field}.{name}", 0, 4, where)
    return out


def _prompt(row: Row, where: Optional[Where]) -> str | list[dict[str, str]]:
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        return check_messages(prompt, where, "prompt", last="user")
    return _string(row, "prompt", where)


def _response(row: Row, field: str, where: Optional[Where]) -> str:
    """A reply: text, or TRL's conversational form (the reply's turn alone, ``[{"role": "assistant",
    "content": ...}]``, beside a separate prompt). Whole conversations are read by :func:`_pair_context`."""
    value = row.get(field)
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) \
            and value[0].get("role") == "assistant" and isinstance(value[0].get("content"), str):
        return value[0]["content"]
    if isinstance(value, list):
        return check_messages(value, where, field, last="assistant")[-1]["content"]
    return _string(row, field, where)


def _conversation(row: Row, field: str, where: Optional[Where]) -> Optional[list[dict[str, str]]]:
    """``row[field]`` when it is a whole conversation (turns before the reply), checked; else None."""
    value = row.get(field)
    if not isinstance(value, list) or len(value) < 2:
        return None
    return check_messages(value, where, field, last="assistant")


def _pair_prompt(row: Row, where: Optional[Where]) -> str | list[dict[str, str]]:
    """The prompt of a pair: ``prompt``, or the turns before the replies when chosen and rejected are whole
    conversations (TRL's implicit-prompt form). The reply alone used to be kept and the turns before it
    dropped, so a multi-turn pair trained without its context; conversations whose earlier turns differ
    from each other or from ``prompt`` are refused, not guessed at."""
    contexts = {field: turns[:-1] for field in ("chosen", "rejected")
                if (turns := _conversation(row, field, where)) is not None}
    if "chosen" in contexts and "rejected" in contexts and contexts["chosen"] != contexts["rejected"]:
        raise _fail(where, "rejected", "a conversation whose turns before the reply are chosen's",
                    "turns that differ from chosen's")
    if "prompt" not in row and contexts:
        return next(iter(contexts.values()))
    if "prompt" not in row:
        raise _fail(where, "prompt", "a string or a list of turns ending with the user's (or chosen and rejected "
                    "as whole conversations, whose turns before the reply are the prompt)", row.get("prompt"))
    prompt = _prompt(row, where)
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    for field, context in contexts.items():
        if context != turns:
            raise _fail(where, field, "a reply, or a whole conversation whose turns before the reply are the "
                        "prompt's (give the whole context as prompt, or leave prompt out)",
                        f"a conversation of {len(context)} earlier turns that differ from 'prompt'")
    return prompt


def check_chat(row: Row, where: Optional[Where]) -> Row:
    """A ``messages`` row, or a single exchange given as ``prompt`` (text, or turns ending with the user's) and
    ``response`` or ``completion`` (text, or TRL's conversational form: the reply's own assistant turn): what
    ``keel data label`` writes for SteerLM, and TRL's prompt-completion."""
    reply = next((name for name in ("response", "completion") if name in row), None)
    if "messages" not in row and "prompt" in row and reply is not None:
        prompt = _prompt(row, where)
        turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        row = dict(row, messages=[*turns, {"role": "assistant", "content": _response(row, reply, where)}])
    if "messages" not in row and "conversations" in row:
        row = conversation_row(row, where)
    if "messages" not in row:  # name what the row has (a misspelt key)
        raise _fail(where, "messages", "a non-empty list of {role, content} messages", Absent(row))
    out = dict(row, messages=check_messages(row.get("messages"), where))
    if row.get("attributes") is not None:
        out["attributes"] = parse_attributes(row["attributes"], where)
    return out


# the speakers of ShareGPT's and NeMo-Aligner's turns ("from"), lower-cased, and their roles
SPEAKERS = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
            "model": "assistant", "system": "system"}


def conversation_row(row: Row, where: Optional[Where]) -> Row:
    """A ShareGPT (``conversations: [{from: human|gpt, value}]``) or NeMo-Aligner SFT row (``system``,
    ``mask: User``, ``conversations: [{from: User|Assistant, value, label}]``) as ``messages``. NeMo-Aligner's
    ``mask`` names the speaker kept out of the loss: ``User``, as Keel's ``data.loss_on=assistant``. SteerLM's
    ``label`` (the attributes of an assistant turn) becomes the row's ``attributes``, the HelpSteer ones Keel
    knows (SteerLM v1's quality, toxicity, humor and creativity are left out); Keel conditions a row on one set
    of them, so the labelled turns must agree."""
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise _fail(where, "conversations", "a non-empty list of {from, value} turns", turns)
    messages = []
    if isinstance(row.get("system"), str) and row["system"].strip():
        messages.append({"role": "system", "content": row["system"]})
    labels: dict[str, Any] = {}  # canonical form -> the label (a 'name:value,...' string or a dict)
    for index, turn in enumerate(turns):
        speaker = str(turn.get("from", "")).lower() if isinstance(turn, dict) else ""
        if speaker not in SPEAKERS:
            raise _fail(where, f"conversations[{index}].from", f"one of {', '.join(sorted(SPEAKERS))} (any case)",
                        turn.get("from") if isinstance(turn, dict) else turn)
        if not isinstance(turn.get("value"), str):
            raise _fail(where, f"conversations[{index}].value", "the turn's text", turn.get("value"))
        messages.append({"role": SPEAKERS[speaker], "content": turn["value"]})
        if turn.get("label") not in (None, "", {}):
            labels[json.dumps(turn["label"], sort_keys=True)] = turn["label"]
    mask = row.get("mask")
    if mask is not None and str(mask).lower() not in ("user", "human"):
        raise _fail(where, "mask", "'User' (NeMo-Aligner's speaker kept out of the loss; Keel trains on the "
                    "assistant's turns, data.loss_on)", mask)
    out = {k: v for k, v in row.items() if k != "conversations"}
    out["messages"] = messages
    if len(labels) > 1:
        raise _fail(where, "conversations[].label", "one set of attributes for the row (Keel conditions a row on "
                    "one; split a conversation whose turns are labelled differently)", f"{len(labels)} different")
    if labels and row.get("attributes") is None:  # SteerLM v1's other labels (quality, toxicity...): not Keel's
        known = parse_attributes(next(iter(labels.values())), where, "conversations[].label", known_only=True)
        if known:
            out["attributes"] = known
    return out


def check_text(row: Row, where: Optional[Where]) -> Row:
    return dict(row, text=_string(row, "text", where))


def check_attributes(row: Row, where: Optional[Where]) -> Row:
    out = dict(row, prompt=_string(row, "prompt", where), response=_string(row, "response", where, allow_empty=True))
    present = 0
    for name in ATTRIBUTES:
        value = row.get(name)
        if value is None or value == MISSING:
            out[name] = MISSING
        else:
            out[name] = _ranged(value, name, 0, 4, where)
            present += 1
    if not present:
        raise _fail(where, "helpfulness", f"at least one rating among {', '.join(ATTRIBUTES)}", "none")
    return out


def _annotators(value: Any, field: str, where: Optional[Where]) -> list[int]:
    if not isinstance(value, list):
        raise _fail(where, field, "a list of integer strengths -3..3", value)
    out = []
    for index, item in enumerate(value):
        score = item.get("score") if isinstance(item, dict) else item
        out.append(_ranged(score, f"{field}[{index}]", -3, 3, where))
    return out


def check_helpsteer2_preference(row: Row, where: Optional[Where]) -> Row:
    out = dict(row, prompt=_string(row, "prompt", where))
    out["response_1"] = _string(row, "response_1", where)
    out["response_2"] = _string(row, "response_2", where)
    if out["response_1"] == out["response_2"]:
        raise _fail(where, "response_2", "a response different from response_1", "identical")
    out["preference_strength"] = _ranged(row.get("preference_strength"), "preference_strength", -3, 3, where)
    if row.get("individual_preference") is not None:
        out["individual_preference"] = _annotators(row["individual_preference"], "individual_preference", where)
    return out


def check_pairs(row: Row, where: Optional[Where]) -> Row:
    out = dict(row, prompt=_pair_prompt(row, where))
    if "chosen" not in row and "chosen_response" in row:  # NeMo-Aligner's DPO rows: their prompt is templated
        raise _fail(where, "chosen", "a string (NeMo-Aligner's rows: rename chosen_response and rejected_response to "
                    "chosen and rejected, and give the prompt without its chat template, as text or as turns: Keel "
                    "applies data.chat_template itself)", Absent(row))
    out["chosen"] = _response(row, "chosen", where)
    out["rejected"] = _response(row, "rejected", where)
    if out["chosen"] == out["rejected"]:
        raise _fail(where, "rejected", "a response different from chosen", "identical to chosen")
    margin = row.get("margin")
    if margin is not None:
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or margin != margin:
            raise _fail(where, "margin", "a number", margin)
        out["margin"] = float(margin)
    if row.get("subset") is not None and not isinstance(row["subset"], str):
        raise _fail(where, "subset", "a string", row["subset"])
    if row.get("annotator_strengths") is not None:
        out["annotator_strengths"] = _annotators(row["annotator_strengths"], "annotator_strengths", where)
    return out


def check_prompts(row: Row, where: Optional[Where]) -> Row:
    out = dict(row, prompt=_prompt(row, where))
    answer = row.get("answer")
    number = isinstance(answer, (int, float)) and not isinstance(answer, bool)
    if answer is not None and not (isinstance(answer, str) or (number and abs(answer) < float("inf"))):
        raise _fail(where, "answer", "a string or a finite number (the reference answer)", answer)
    if row.get("attributes") is not None:
        out["attributes"] = parse_attributes(row["attributes"], where)
    return out


CHECKS: dict[str, Callable[[Row, Optional[Where]], Row]] = {
    "chat": check_chat,
    "text": check_text,
    "attributes": check_attributes,
    "helpsteer2_preference": check_helpsteer2_preference,
    "pairs": check_pairs,
    "prompts": check_prompts,
}
FORMATS = tuple(CHECKS)


def check_row(fmt: str, row: Any, where: Optional[Where] = None, formats: Optional[Sequence[str]] = None) -> Row:
    """Validate ``row`` as format ``fmt``; returns the normalised row or raises DataError.

    A row with another format's fields gets a hint naming that format; ``formats`` (those the run
    trains on, None = any) keeps the hint from suggesting one the run would refuse.
    """
    if fmt not in CHECKS:
        raise ValueError(f"unknown data format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not isinstance(row, dict):
        array = " (a JSON array of rows is read from a file named .json; JSON lines hold one object a line)" \
            if isinstance(row, list) else ""
        raise _fail(where, "<row>", f"a JSON object{array}", row)
    try:
        return CHECKS[fmt](row, where)
    except DataError as exc:
        guesses = [other for other, keys in SIGNATURES.items() if other != fmt and keys <= row.keys()]
        if not guesses:
            raise
        usable = [other for other in guesses if formats is None or other in formats]
        hint = (f"the row has the fields of data.format={usable[0]}, and this run reads {fmt}: set "
                f"data.format={usable[0]}" if usable else
                f"the row has the fields of data.format={guesses[0]}, which this run does not train on; it reads "
                f"{_either(formats or ())}")
        error = exc.with_hint(hint)
        error.looks_like = guesses[0]
        raise error from None


def _either(names: Sequence[str]) -> str:
    """``'a'``, ``'a' or 'b'``, ``'a', 'b' or 'c'``."""
    quoted = [repr(name) for name in names]
    return " or ".join([", ".join(quoted[:-1]), quoted[-1]] if len(quoted) > 1 else quoted)


# fields that tell a row's format apart (the prompts format's lone 'prompt' tells nothing)
SIGNATURES = {"pairs": {"chosen", "rejected"}, "chat": {"messages"}, "text": {"text"},
              "attributes": {"response", "helpfulness"}, "helpsteer2_preference": {"response_1", "response_2"}}


def attribute_string(ratings: dict[str, int]) -> str:
    """SteerLM attribute string in the canonical order, skipping missing ratings.

    ``{"helpfulness": 4, ..., "verbosity": 2}`` → ``helpfulness:4,correctness:4,coherence:4,complexity:2,verbosity:2``.
    """
    return ",".join(f"{name}:{ratings[name]}" for name in ATTRIBUTES
                    if ratings.get(name, MISSING) != MISSING and ratings.get(name) is not None)
