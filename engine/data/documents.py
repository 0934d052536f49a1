"""SFT documents: rows rendered to (ids, mask), with the over-long policy applied.

Shared by :class:`engine.data.sft.SFTDataset` (one padded document per sample) and
:class:`engine.data.packing.PackedSFTDataset` (several documents per sample). It lives
apart from :mod:`engine.data.sft` so that packing need not import sft, which imports
packing to choose between the two: that would be an import cycle. ``engine.data.sft``
re-exports every name here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

from engine.data.chat import render_chat, render_text
from engine.data.errors import DataError
from engine.data.tokenizers import Tokenizer

# The name of the module these helpers came from, so log lines read as before.
logger = logging.getLogger("engine.data.sft")


@dataclass
class DropCounts:
    """What the over-long policy did to the rows of one source (logged per source, as the reward
    models' :class:`engine.data.fit.OverlongCounts`)."""

    overlong: int = 0  # dropped: longer than seq_length + 1 (data.overlong=drop)
    no_loss_tokens: int = 0  # dropped: no loss token within the sequence
    truncated: int = 0  # kept, cut to their first seq_length + 1 tokens (data.overlong=truncate)
    source: str = "<data>"
    rows: int = 0  # rows read (set by build_documents)
    seq_length: int = 0

    def log(self, total: int, seq_length: int) -> None:
        if not total:
            return
        limit = seq_length + 1
        if self.truncated:
            logger.warning("%s: truncated %d of %d rows longer than seq_length+1=%d tokens to their first %d "
                           "(data.overlong=truncate)", self.source, self.truncated, total, limit, limit)
        if self.overlong:
            logger.warning("%s: dropped %d of %d rows longer than seq_length+1=%d tokens (data.overlong=drop)",
                           self.source, self.overlong, total, limit)
        if not (self.truncated or self.overlong or self.no_loss_tokens):
            logger.info("%s: all %d rows fit seq_length+1=%d tokens", self.source, total, limit)
        if self.no_loss_tokens:
            logger.warning("%s: dropped %d of %d rows with no loss token within seq_length=%d (prompt too long)",
                           self.source, self.no_loss_tokens, total, seq_length)

    def empty_error(self) -> DataError:
        """The one-line error for a source whose rows were all dropped, saying how many and why."""
        limit = self.seq_length + 1
        why = [f"{n} {reason}" for n, reason in (
            (self.overlong, f"longer than seq_length+1={limit} tokens, data.overlong=drop"),
            (self.no_loss_tokens, f"with no loss token within seq_length={self.seq_length}: prompt too long")) if n]
        hint = "raise data.seq_length" + (", or set data.overlong=truncate" if self.overlong else "") + \
            ", or shorten the rows"
        return DataError(None, "<rows>", f"at least one row that fits data.seq_length={self.seq_length}, got none: "
                         f"all {self.rows} rows were dropped ({'; '.join(why)})", source=self.source, hint=hint)


def render_row(row: dict[str, Any], tokenizer: Tokenizer, fmt: str = "chat",
               template: str = "plain") -> tuple[list[int], list[int]]:
    """(ids, mask) of one chat or text row; chat ``attributes`` are used by the nemotron template."""
    if fmt == "text":
        return render_text(row["text"], tokenizer)
    if fmt != "chat":
        raise ValueError(f"SFT rows must be 'chat' or 'text', not {fmt!r}")
    attributes = row.get("attributes") if template == "nemotron" else None
    return render_chat(row["messages"], tokenizer, template, attributes)


def fit_document(ids: list[int], mask: list[int], limit: int, overlong: str,
                 drops: DropCounts) -> Optional[tuple[list[int], list[int]]]:
    """Apply the over-long policy to one document of at most ``limit`` tokens; None = dropped."""
    if overlong not in ("truncate", "drop"):
        raise ValueError(f"overlong={overlong!r}: choose 'truncate' or 'drop'")
    cut = len(ids) > limit
    if cut:
        if overlong == "drop":
            drops.overlong += 1
            return None
        ids, mask = ids[:limit], mask[:limit]
    if not any(mask[1:]):
        drops.no_loss_tokens += 1
        return None
    drops.truncated += int(cut)
    return ids, mask


def build_documents(rows: list[dict[str, Any]], tokenizer: Tokenizer, seq_length: int, fmt: str = "chat",
                    loss_on: str = "assistant", template: str = "plain",
                    overlong: str = "truncate", source: str = "<data>",
                    drops: Optional[DropCounts] = None) -> list[tuple[list[int], list[int]]]:
    """Rendered, length-checked (ids, mask) documents of at most ``seq_length + 1`` tokens; what the
    over-long policy did is logged for ``source`` (the rows' file or data-set name) and counted in ``drops``."""
    if loss_on not in ("assistant", "all"):
        raise ValueError(f"loss_on={loss_on!r}: choose 'assistant' or 'all'")
    if fmt == "chat" and template != "nemotron" and any(row.get("attributes") for row in rows[:1000]):
        named = "auto (the tokenizer's own template)" if template == "auto" else template
        logger.warning("%s: rows carry SteerLM attributes, which only data.chat_template=nemotron writes into the "
                       "prompt: with data.chat_template=%s the model never sees them (set data.chat_template=nemotron "
                       "to train an attribute-conditioned model)", source, named)
    drops = drops if drops is not None else DropCounts(source=source)
    drops.source, drops.rows, drops.seq_length = source, len(rows), seq_length
    documents = []
    for row in rows:
        ids, mask = render_row(row, tokenizer, fmt, template)
        if loss_on == "all":
            mask = [1] * len(mask)
        fitted = fit_document(ids, mask, seq_length + 1, overlong, drops)
        if fitted is not None:
            documents.append(fitted)
    drops.log(len(rows), seq_length)
    return documents
