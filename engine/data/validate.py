"""Check a whole data file before training: schema, tokens, lengths (``keel data validate``).

:func:`validate_file` streams the file once, so it works on files larger than memory,
and returns a summary: row counts, bad rows (with file, line and field, the first
:data:`engine.data.loaders.MAX_PROBLEMS` of them), total tokens, a length histogram,
how many rows exceed ``seq_length``, and what training's over-long policy
(``data.overlong``) does with them: the same code that builds the training samples says
which rows are cut and which are dropped. Rows dropped because nothing is left to learn
(an SFT prompt that leaves no loss token, a reward model's response that does not fit
even after the shortest prompt) are problems; rows cut, or dropped because the policy
asked for it (``drop``), are reported, as training logs them.
"""

from __future__ import annotations

from typing import Any, Optional

from engine.data.chat import prompt_messages, render_prompt, render_reply
from engine.data.documents import DropCounts, fit_document, render_row
from engine.data.errors import DataError
from engine.data.loaders import MAX_PROBLEMS, ReadStats, iter_rows
from engine.data.preference import PromptFitter
from engine.data.schemas import ATTRIBUTES, Row, near_attribute
from engine.data.tokenizers import Tokenizer, load_tokenizer

HISTOGRAM_BINS = 8
SFT_FORMATS = ("chat", "text")
REPLIES = {"attributes": ("response",), "helpsteer2_preference": ("response_1", "response_2"),
           "pairs": ("chosen", "rejected"), "prompts": ()}
OVERLONG_DEFAULT = {"chat": "truncate", "text": "truncate"}  # the rest: cut_prompt; prompt sets have no policy


class _Lengths:
    """Running length statistics: count, total, max and an equal-width histogram."""

    def __init__(self, seq_length: int):
        self.width = max(1, -(-seq_length // HISTOGRAM_BINS))
        self.bins = [0] * (HISTOGRAM_BINS + 1)
        self.count = self.total = self.max = 0

    def add(self, length: int) -> None:
        self.count += 1
        self.total += length
        self.max = max(self.max, length)
        self.bins[min(length // self.width, HISTOGRAM_BINS)] += 1

    def histogram(self) -> dict[str, int]:
        keys = [f"{i * self.width}-{(i + 1) * self.width - 1}" for i in range(HISTOGRAM_BINS)]
        keys.append(f">{HISTOGRAM_BINS * self.width - 1}")
        return dict(zip(keys, self.bins, strict=True))


class _Policy:
    """Training's over-long policy applied to each row, as the samples are built: counts of the rows kept cut,
    dropped by the policy (``drop``), and dropped with no room left to learn from."""

    def __init__(self, fmt: str, overlong: Optional[str], tokenizer: Tokenizer, template: str, seq_length: int):
        self.fmt, self.name = fmt, overlong or OVERLONG_DEFAULT.get(fmt, "cut_prompt")
        self.tokenizer, self.template, self.seq_length = tokenizer, template, seq_length
        allowed = ("truncate", "drop") if fmt in SFT_FORMATS else ("cut_prompt", "drop")
        if fmt == "prompts":
            self.name = "none"
        elif self.name not in allowed:
            raise ValueError(f"--overlong {self.name}: {fmt} rows take {' or '.join(allowed)} (data.overlong of "
                             "the algorithms that train on them)")
        self.drops = DropCounts()
        self.fitter = PromptFitter(tokenizer, template, seq_length, self.name, "<validate>") if fmt not in (
            *SFT_FORMATS, "prompts") else None

    def apply(self, row: Row) -> tuple[int, int]:
        """(total tokens, tokens before the first loss token) of one validated row, rendered once, and the
        policy's counts of it."""
        if self.fmt in SFT_FORMATS:
            ids, mask = render_row(row, self.tokenizer, self.fmt, self.template)
            fit_document(ids, mask, self.seq_length + 1, self.name, self.drops)
            return len(ids), mask.index(1) if 1 in mask else len(ids)
        attributes = row.get("attributes") if self.template == "nemotron" and self.fmt == "prompts" else None
        prompt = len(render_prompt(prompt_messages(row["prompt"]), self.tokenizer, self.template, attributes))
        replies = [render_reply(row[name], self.tokenizer, self.template) for name in REPLIES[self.fmt]]
        if self.fitter is not None:
            self.fitter.prompt(row["prompt"], replies)
        return prompt + max((len(reply) for reply in replies), default=0), prompt

    def counts(self) -> dict[str, Any]:
        if self.fitter is not None:
            dropped, by_policy = self.fitter.counts.dropped, self.name == "drop"
            return {"overlong_policy": self.name, "cut": self.fitter.counts.prompt_cut,
                    "dropped_by_policy": dropped if by_policy else 0, "dropped_no_room": 0 if by_policy else dropped}
        return {"overlong_policy": self.name, "cut": self.drops.truncated, "dropped_by_policy": self.drops.overlong,
                "dropped_no_room": self.drops.no_loss_tokens}


def validate_file(path: str, fmt: str, tokenizer: Tokenizer | str, seq_length: int, template: str = "plain",
                  on_error: str = "skip", num: int = 512, seed: int = 0,
                  overlong: Optional[str] = None) -> dict[str, Any]:
    """Validate and tokenise every row of ``path``; returns the summary (see module docstring).

    ``on_error="skip"`` collects bad rows into ``problems``; ``"raise"`` raises
    :class:`DataError` at the first. ``overlong`` is training's ``data.overlong`` (default: the
    format's, ``truncate`` for SFT rows and ``cut_prompt`` for reward and preference rows). ``ok``
    is True when no row is bad and training would drop none for want of room (a prompt over
    ``seq_length`` fails it for prompt sets, which have no policy).
    """
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    policy = _Policy(fmt, overlong, tok, template, seq_length)
    limit = seq_length + 1 if fmt in SFT_FORMATS else seq_length  # SFT samples hold seq_length + 1 ids
    stats = ReadStats()
    lengths = _Lengths(seq_length)
    overlong_rows = prompt_too_long = 0
    fatal: Optional[str] = None
    no_room: list[str] = []  # where the first rows training would drop with nothing to learn are
    unread: dict[str, str] = {}  # rating fields spelt otherwise than an attribute: never read (key -> attribute)
    try:
        for row in iter_rows(path, fmt, on_error, stats=stats, num=num, seed=seed):
            before = policy.counts()["dropped_no_room"]
            total, prompt = policy.apply(row)
            if policy.counts()["dropped_no_room"] > before and len(no_room) < MAX_PROBLEMS:
                no_room.append(f"{stats.where}: {total} tokens, {prompt} of them before the response: "
                               f"no room to learn within seq_length={seq_length}, so training drops it")
            lengths.add(total)
            if fmt in REPLIES and fmt != "pairs" and stats.valid <= 1000:
                unread.update({key: meant for key in row if (meant := near_attribute(key))})
            overlong_rows += total > limit
            prompt_too_long += fmt != "prompts" and prompt + 1 > limit
    except DataError as error:
        if on_error == "raise" or stats.valid:
            raise
        fatal = error.brief
    problems = stats.problems + ([fatal] if fatal else []) + no_room + [
        f"{path}: field {key!r} is never read (a rating of {meant}? rating fields are spelled {', '.join(ATTRIBUTES)})"
        for key, meant in sorted(unread.items())]
    counts = policy.counts()
    return {
        "source": path, "format": fmt, "template": template, "seq_length": seq_length,
        "rows": stats.records, "valid": stats.valid, "skipped": stats.skipped, "problems": problems,
        "looks_like": stats.looks_like,
        "tokens": lengths.total, "max_length": lengths.max,
        "mean_length": lengths.total / lengths.count if lengths.count else 0.0,
        "overlong": overlong_rows, "prompt_too_long": prompt_too_long, **counts, "histogram": lengths.histogram(),
        "ok": not problems and not counts["dropped_no_room"] and not (fmt == "prompts" and overlong_rows)
        and stats.valid > counts["dropped_by_policy"],  # training refuses a source whose rows it all drops
    }
