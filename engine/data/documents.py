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
from engine.data.tokenizers import Tokenizer

# The name of the module these helpers came from, so log lines read as before.
logger = logging.getLogger("engine.data.sft")


@dataclass
class DropCounts:
    overlong: int = 0
    no_loss_tokens: int = 0

    def log(self, total: int, seq_length: int) -> None:
        if self.overlong:
            logger.warning("dropped %d of %d rows longer than seq_length+1=%d tokens (data.overlong=drop)",
                           self.overlong, total, seq_length + 1)
        if self.no_loss_tokens:
            logger.warning("dropped %d of %d rows with no loss token within seq_length=%d (prompt too long)",
                           self.no_loss_tokens, total, seq_length)


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
    if len(ids) > limit:
        if overlong == "drop":
            drops.overlong += 1
            return None
        ids, mask = ids[:limit], mask[:limit]
    if not any(mask[1:]):
        drops.no_loss_tokens += 1
        return None
    return ids, mask


def build_documents(rows: list[dict[str, Any]], tokenizer: Tokenizer, seq_length: int, fmt: str = "chat",
                    loss_on: str = "assistant", template: str = "plain",
                    overlong: str = "truncate") -> list[tuple[list[int], list[int]]]:
    """Rendered, length-checked (ids, mask) documents of at most ``seq_length + 1`` tokens."""
    if loss_on not in ("assistant", "all"):
        raise ValueError(f"loss_on={loss_on!r}: choose 'assistant' or 'all'")
    if fmt == "chat" and template != "nemotron" and any(row.get("attributes") for row in rows[:1000]):
        logger.info("rows carry attributes; only the nemotron template writes them, template=%s ignores them",
                    template)
    drops = DropCounts()
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
