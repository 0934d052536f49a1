"""Prompt sets for online RL (GRPO, REINFORCE, PPO): what the policy is asked during rollouts.

A row is ``{"prompt": str | messages, "answer": optional str | number, ...}``; every other
field is kept as the row's metadata and handed to reward functions (see
:mod:`engine.rewards`). Rows are read through :mod:`engine.data.loaders` (files, ``hf:``
sets, ``builtin:`` sets) and checked with the ``prompts`` schema of
:mod:`engine.data.schemas` before any work, so a bad row is a :class:`DataError` naming
its file, line and field.

``builtin:prompts[:split]`` asks the questions ``builtin:sft`` teaches (sums, products,
reversals; :func:`engine.data.synthetic.rollout_prompt_rows`); its ``eval`` and
``validation`` splits never share a word or a number pair with ``train``. Each row
carries its right ``answer`` and its ``task_kind`` (in the metadata).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from engine.data.chat import prompt_messages, render_chat_text
from engine.data.errors import DataError, Where, empty_dataset
from engine.data.loaders import ReadStats, checked_records, iter_records, parsed
from engine.data.schemas import check_row

logger = logging.getLogger(__name__)

Prompt = Union[str, list[dict[str, str]]]
Answer = Union[str, int, float]


@dataclass(frozen=True)
class PromptRow:
    """One validated prompt: ``prompt`` (text or messages ending with a user turn), the optional
    reference ``answer``, every other field of the row in ``metadata``, and ``where`` it came from."""

    prompt: Prompt
    answer: Optional[Answer] = None
    metadata: dict[str, Any] = field(default_factory=dict)
    where: Optional[Where] = None

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The prompt as chat messages (what :func:`engine.data.chat.render_prompt` takes)."""
        return prompt_messages(self.prompt)

    @property
    def text(self) -> str:
        """The prompt as one string for reward functions: itself, or messages as ``Role: content`` lines."""
        if isinstance(self.prompt, str):
            return self.prompt
        return render_chat_text(self.prompt, template="plain").rstrip("\n")

    def reward_metadata(self) -> dict[str, Any]:
        """What reward functions receive as ``metadata``: the row's extra fields plus ``answer``."""
        return dict(self.metadata) if self.answer is None else dict(self.metadata, answer=self.answer)


def prompt_row(row: dict[str, Any], where: Optional[Where] = None) -> PromptRow:
    """A :class:`PromptRow` from a raw row, checked with the ``prompts`` schema (:class:`DataError` if bad)."""
    try:
        checked = check_row("prompts", row, where, formats=("prompts",))
    except DataError as error:  # another format's row: no data.format to set, rollout.prompts reads prompts only
        if not error.looks_like:
            raise
        turns = ", such as this row's messages up to the last user turn" if error.looks_like == "chat" else ""
        raise error.with_hint(f"the row has the fields of data.format={error.looks_like}, and a prompt file's rows "
                              f"have a 'prompt': text, or chat turns that end with the user's{turns}; an 'answer' "
                              "may go beside it") from None
    metadata = {key: value for key, value in checked.items() if key not in ("prompt", "answer")}
    return PromptRow(checked["prompt"], checked.get("answer"), metadata, where)


def iter_prompts(source: str, num_samples: int = 512, seed: int = 0, on_error: str = "raise",
                 stats: Optional[ReadStats] = None) -> Iterator[PromptRow]:
    """Validated prompts of ``source``, streaming; ``on_error`` as in :func:`engine.data.loaders.iter_rows`
    (``raise`` stops at the first bad row, ``skip`` drops and counts it); no valid row is an error."""
    stats = stats if stats is not None else ReadStats()
    stats.source = source
    yield from checked_records(iter_records(source, num_samples, seed),
                               lambda raw, where: prompt_row(parsed(raw, where), where), on_error, stats)
    if stats.skipped:
        logger.warning("%s: skipped %d of %d rows that are not valid prompts; first: %s",
                       source, stats.skipped, stats.records, stats.problems[0])
    if not stats.valid:
        raise empty_dataset(source, stats.skipped)


def load_prompts(source: str, num_samples: int = 512, seed: int = 0, on_error: str = "raise") -> list[PromptRow]:
    """Every prompt of ``source``, all validated before this returns.

    ``source``: a ``.jsonl``/``.json``/``.parquet`` file, ``hf:<org>/<name>[:<split>]`` or
    ``builtin:prompts[:train|validation|eval]`` (``num_samples`` rows drawn with ``seed``;
    both only matter for ``builtin:`` sources).
    """
    return list(iter_prompts(source, num_samples, seed, on_error))
