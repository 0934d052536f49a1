"""Built-in reward functions; each costs microseconds per row (pure Python, no model).

* ``synthetic_check`` — 1.0 when the response's final answer solves the built-in synthetic
  task in the prompt (:func:`engine.data.synthetic.check_response`), else 0.0.
* ``math_answer`` — 1.0 when the response's answer equals the row's reference, else 0.0.
  The reference is ``metadata["answer"]``, or the field ``answer_key`` (kwarg) names: a field
  (``solution``, TRL's math sets) or a dotted path into nested ones (``reward_model.ground_truth``,
  verl's rows). The response's answer is the content of its last ``\\boxed{...}``, else its last number.
  Both sides are normalised (:func:`normalize_answer`): ``1,000``, ``1000.0``, ``+1000`` and
  ``1e3`` are the same number; ``3/4``, ``\\frac{3}{4}`` and ``0.75`` too; other answers
  compare as text without spaces, ``$`` signs, a trailing period or case.
* ``regex_format`` — 1.0 when the response matches ``pattern`` (kwarg), else 0.0.
  ``mode`` is ``search`` (default: anywhere), ``match`` (at the start) or ``fullmatch``
  (the whole response); flags go inline, e.g. ``(?s)`` to let ``.`` match newlines.
* ``length_penalty`` — ``-coef * max(0, length - target) / scale``: 0 up to ``target``,
  then falling linearly, ``-coef`` per ``scale`` units over. ``unit`` is ``chars``
  (default), ``words`` (whitespace-separated) or ``tokens`` (read from
  ``metadata["response_tokens"]``, which the trainer knows). Defaults: target 512,
  scale 512, coef 1.0.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any, Optional

from engine.data.synthetic import check_response, task_kind
from engine.rewards.registry import reward_function

_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d{1,3})?"
                     r"(?:\s*/\s*\d+)?")
_HUGE_EXPONENT = re.compile(r"[eE][-+]?\d{4,}")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_FRAC = re.compile(r"^(-?)\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}$")
_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_BOXED = ("\\boxed{", "\\fbox{")
# where data sets keep the reference answer (Keel's, TRL's math sets, verl's): suggested as answer_key
ANSWER_KEYS = ("answer", "solution", "ground_truth", "reward_model.ground_truth")
REGEX_MODES = ("search", "match", "fullmatch")
LENGTH_UNITS = ("chars", "words", "tokens")


def _has_synthetic_task(prompt: str, metadata: dict[str, Any]) -> Optional[tuple[str, str]]:
    if task_kind(prompt) != "unknown":
        return None
    return "prompt", "one of the built-in synthetic tasks (builtin:prompts), the only ones synthetic_check can check"


def answer_at(metadata: dict[str, Any], key: str) -> Any:
    """The value a row's ``metadata`` holds at ``key``: the field of that name, else the dotted path into nested
    fields (``reward_model.ground_truth``); None when there is none."""
    if key in metadata:
        return metadata[key]
    node: Any = metadata
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _has_answer(prompt: str, metadata: dict[str, Any], answer_key: str = "answer") -> Optional[tuple[str, str]]:
    """None when the row has a reference at ``answer_key``; else that key, and what is needed there (with the
    ``answer_key`` to give when the row keeps its reference at another well-known key)."""
    if answer_at(metadata, answer_key) is not None:
        return None
    needs = "the reference answer math_answer compares with"
    other = next((key for key in ANSWER_KEYS if key != answer_key and answer_at(metadata, key) is not None), None)
    if other is not None:
        needs += f"; the row has {other!r}: give math_answer kwargs: {{answer_key: {other}}}"
    return answer_key, needs


def _check_math(kwargs: dict[str, Any]) -> None:
    key = kwargs.get("answer_key", "answer")
    if not isinstance(key, str) or not key.strip():
        raise ValueError(f"answer_key={key!r} must be a field of the prompt rows, or a dotted path into one "
                         "(reward_model.ground_truth)")


@reward_function("synthetic_check", judges=_has_synthetic_task)
def synthetic_check(prompt: str, response: str, metadata: dict[str, Any]) -> float:
    """1.0 when ``response`` solves the built-in synthetic task in ``prompt``, else 0.0."""
    return 1.0 if check_response(prompt, response) else 0.0


def last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces balanced; None if none."""
    start = max(text.rfind(marker) + len(marker) if marker in text else -1 for marker in _BOXED)
    if start < 0:
        return None
    depth = 1
    for index in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[start:index]
    return None  # unbalanced: no answer


def last_number(text: str) -> Optional[str]:
    """The last number in ``text`` (``1,000``, ``-2.5``, ``3/4``, ``1e3`` count as one), or None."""
    found = _NUMBER.findall(text)
    return found[-1] if found else None


def _as_number(text: str) -> Optional[Fraction]:
    text = text.replace(" ", "")
    if _THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    if _HUGE_EXPONENT.search(text):
        return None  # 1e99999999 would build a 100-million-digit integer
    frac = _FRAC.match(text)
    if frac:
        text = f"{frac[1]}{frac[2]}/{frac[3]}"
    try:
        if "/" in text:
            top, bottom = text.split("/")
            return Fraction(top) / Fraction(bottom)
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def normalize_answer(answer: Any) -> Fraction | str:
    """A comparable form of an answer: a number (as an exact fraction) when it reads as one, else text
    without spaces, ``$``, LaTeX text wrappers, a trailing period, and in lower case."""
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        return Fraction(str(answer))  # str: 0.1 is the decimal 1/10, not its binary approximation
    text = _TEXT.sub(r"\1", str(answer))
    for noise in ("$", "\\!", "\\,", "\\left", "\\right"):
        text = text.replace(noise, "")
    text = text.replace("{,}", ",").strip().rstrip(".").strip()
    number = _as_number(text.removesuffix("%").removesuffix("\\"))  # 50% and 50\% read as 50
    return number if number is not None else "".join(text.split()).lower()


def extract_answer(response: str) -> Optional[str]:
    """The answer of ``response``: its last ``\\boxed{...}`` content, else its last number, else None."""
    boxed = last_boxed(response)
    return boxed if boxed is not None else last_number(response)


@reward_function("math_answer", check=_check_math, judges=_has_answer)
def math_answer(prompt: str, response: str, metadata: dict[str, Any], answer_key: str = "answer") -> float:
    """1.0 when the response's answer (:func:`extract_answer`) equals the reference at ``answer_key``
    (:func:`answer_at`: ``answer``, ``solution``, ``reward_model.ground_truth``...) after :func:`normalize_answer`,
    else 0.0. A reference with a ``\\boxed{...}`` (a worked solution, as TRL's math sets keep in ``solution``) is
    its last boxed content. A row without that reference is an error (reported, handled per on_error)."""
    reference = answer_at(metadata, answer_key)
    if reference is None:
        path = "".join(f"[{part!r}]" for part in answer_key.split("."))
        raise KeyError(f"math_answer needs metadata{path} (the prompt row's {answer_key!r} field, which kwargs "
                       "answer_key names)")
    boxed = last_boxed(reference) if isinstance(reference, str) else None
    found = extract_answer(response)
    return 1.0 if found is not None and normalize_answer(found) == normalize_answer(boxed or reference) else 0.0


def _check_regex(kwargs: dict[str, Any]) -> None:
    if not isinstance(kwargs.get("pattern"), str):
        raise ValueError("'pattern' must be a string (a Python regular expression)")
    try:
        re.compile(kwargs["pattern"])
    except re.error as exc:
        raise ValueError(f"pattern {kwargs['pattern']!r} is not a valid regular expression: {exc}") from None
    if kwargs.get("mode", "search") not in REGEX_MODES:
        raise ValueError(f"mode={kwargs['mode']!r} is not one of {', '.join(REGEX_MODES)}")


@reward_function("regex_format", check=_check_regex)
def regex_format(prompt: str, response: str, metadata: dict[str, Any], pattern: str, mode: str = "search") -> float:
    """1.0 when ``response`` matches ``pattern`` (``re.search``/``match``/``fullmatch`` by ``mode``), else 0.0."""
    compiled = re.compile(pattern)  # re caches compiled patterns
    return 1.0 if getattr(compiled, mode)(response) is not None else 0.0


def _check_length(kwargs: dict[str, Any]) -> None:
    if kwargs.get("unit", "chars") not in LENGTH_UNITS:
        raise ValueError(f"unit={kwargs['unit']!r} is not one of {', '.join(LENGTH_UNITS)}")
    if not kwargs.get("scale", 1) > 0:
        raise ValueError(f"scale={kwargs['scale']!r} must be > 0")
    if not kwargs.get("target", 0) >= 0:
        raise ValueError(f"target={kwargs['target']!r} must be >= 0")


@reward_function("length_penalty", check=_check_length)
def length_penalty(prompt: str, response: str, metadata: dict[str, Any], target: float = 512, scale: float = 512,
                   coef: float = 1.0, unit: str = "chars") -> float:
    """``-coef * max(0, length - target) / scale`` with the response's length in ``unit``
    (chars, words, or tokens from ``metadata["response_tokens"]``)."""
    if unit == "tokens":
        length = float(metadata["response_tokens"])
    else:
        length = float(len(response) if unit == "chars" else len(response.split()))
    return -coef * max(0.0, length - target) / scale
