"""Over-long reward rows: keep the response whole, cut the prompt from the left.

A reward model reads its score at the end-of-response token, so a row cut inside its
response would be scored mid-response. :func:`fit_prompt` therefore never touches the
response: it shortens the *prompt* until prompt + response fit ``seq_length``, and says
so when even the shortest prompt cannot make room (the caller drops the row or pair and
counts it).

The cut keeps the template's structure. It works on messages, re-rendering each try with
the same :func:`engine.data.chat.render_prompt` that renders whole rows, so BOS, role
headers, end-of-turn markers and the final assistant header always stay in place:

1. the oldest units are removed first: the system turn, then whole exchanges (a user turn
   with its assistant reply); the last user turn is never removed;
2. inside the first unit that must go only in part, the content is cut from its left
   (for an exchange: the user text first, then the assistant text), character by
   character (binary search), keeping as much of it as fits.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

from engine.data.chat import render_prompt
from engine.data.tokenizers import Tokenizer

logger = logging.getLogger(__name__)

Messages = list[dict[str, Any]]
OVERLONG_POLICIES = ("cut_prompt", "drop")


@dataclass
class OverlongCounts:
    """What the over-long policy did to the rows (or pairs) of one source."""

    source: str = "<data>"
    total: int = 0
    prompt_cut: int = 0  # kept whole response, prompt cut from the left
    dropped: int = 0  # the response alone does not fit (or data.overlong=drop)
    examples: list[int] = field(default_factory=list)  # 1-based positions of the first dropped items

    def note_dropped(self) -> None:
        self.dropped += 1
        if len(self.examples) < 3:
            self.examples.append(self.total)

    def log(self, what: str, seq_length: int, policy: str) -> None:
        """One line per source: how many items had their prompt cut, how many were dropped."""
        if not self.total:
            return
        if not (self.prompt_cut or self.dropped):
            logger.info("%s: all %d %s fit seq_length=%d", self.source, self.total, what, seq_length)
            return
        reason = "longer than seq_length" if policy == "drop" else "whose response alone does not fit"
        logger.warning("%s: %d of %d %s had their prompt cut from the left to fit seq_length=%d; dropped %d %s "
                       "(data.overlong=%s; first dropped: %s)", self.source, self.prompt_cut, self.total, what,
                       seq_length, self.dropped, reason, policy, self.examples or "none")


def _units(messages: Messages) -> list[list[int]]:
    """Indices of the removable units, oldest first: [system], then [user, assistant] exchanges."""
    units: list[list[int]] = []
    start = 0
    if messages and messages[0]["role"] == "system":
        units.append([0])
        start = 1
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    i = start
    while i < last_user:
        units.append([i, i + 1] if i + 1 < last_user else [i])
        i += 2
    return units


def _with_content(messages: Messages, index: int, content: str) -> Messages:
    out = [dict(m) for m in messages]
    out[index]["content"] = content
    return out


def _cut_left(messages: Messages, index: int, fits: Callable[[Messages], bool]) -> Optional[Messages]:
    """``messages`` with the shortest left cut of message ``index``'s content that fits, or None."""
    text = messages[index]["content"]
    if not fits(_with_content(messages, index, "")):
        return None
    low, high = 0, len(text)  # high: cut that fits (everything); low: cut that may not
    if fits(messages):
        return messages
    while high - low > 1:
        middle = (low + high) // 2
        if fits(_with_content(messages, index, text[middle:])):
            high = middle
        else:
            low = middle
    return _with_content(messages, index, text[high:])


def _cut_within(messages: Messages, unit: list[int], fits: Callable[[Messages], bool]) -> Optional[Messages]:
    """Cut inside ``unit`` from its left: first message's content, then (emptied) the next one's."""
    current = messages
    for index in unit:
        cut = _cut_left(current, index, fits)
        if cut is not None:
            return cut
        current = _with_content(current, index, "")
    return None


def cut_messages(messages: Messages, fits: Callable[[Messages], bool]) -> Optional[Messages]:
    """The longest left-cut of ``messages`` (see the module docstring) for which ``fits``; None if none does."""
    if fits(messages):
        return messages
    units = _units(messages)
    if not units:  # only the last user turn is left
        last = max(i for i, m in enumerate(messages) if m["role"] == "user")
        return _cut_left(messages, last, fits)
    unit = units[0]
    removed = [m for i, m in enumerate(messages) if i not in unit]
    if not fits(removed):
        return cut_messages(removed, fits)
    cut = _cut_within(messages, unit, fits)
    return cut if cut is not None else removed


def fit_prompt(messages: Messages, reply_length: int, tokenizer: Tokenizer, template: str,
               seq_length: int) -> Optional[tuple[list[int], bool]]:
    """(prompt ids, whether they were cut) so that prompt + a reply of ``reply_length`` ids fit.

    None when the reply does not fit even after the shortest prompt (its headers only).
    """
    room = seq_length - reply_length
    if room <= 0:
        return None
    whole = render_prompt(messages, tokenizer, template)
    if len(whole) <= room:
        return whole, False
    cut = cut_messages(messages, lambda candidate: len(render_prompt(candidate, tokenizer, template)) <= room)
    if cut is None:
        return None
    return render_prompt(cut, tokenizer, template), True
