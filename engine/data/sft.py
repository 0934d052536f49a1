"""SFT samples: rendered, truncated/padded to a fixed length, with a loss mask.

Each row becomes one *document* (ids, mask) of at most ``seq_length + 1`` tokens; a
sample is its next-token view: ``tokens = ids[:-1]``, ``labels = ids[1:]``,
``loss_mask = mask[1:]``, right-padded with the pad id (loss 0) to ``seq_length``.

Over-long rows follow ``overlong``: ``"truncate"`` keeps the first ``seq_length + 1``
tokens, ``"drop"`` drops the row. A row left with no loss token (its prompt alone
fills the sequence) is always dropped; both counts are logged. Padding waste is
reported by :meth:`SFTDataset.padding_stats`; :class:`engine.data.packing.PackedSFTDataset`
removes most of it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch

from engine.data.chat import render_chat, render_text
from engine.data.synthetic import builtin_rows as _builtin_rows
from engine.data.tokenizers import Tokenizer

logger = logging.getLogger(__name__)


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


class SFTDataset:
    """Fixed-length next-token samples: ``tokens``, ``labels`` (shifted), ``loss_mask``."""

    def __init__(self, rows: list[dict[str, Any]], tokenizer: Tokenizer, seq_length: int,
                 fmt: str = "chat", loss_on: str = "assistant", template: str = "plain",
                 overlong: str = "truncate"):
        self.tokenizer = tokenizer
        self.seq_length = seq_length
        self.samples = build_documents(rows, tokenizer, seq_length, fmt, loss_on, template, overlong)

    def __len__(self) -> int:
        return len(self.samples)

    def length(self, index: int) -> int:
        """Positions sample ``index`` uses (its tokens, without the final label-only id)."""
        return min(len(self.samples[index][0]) - 1, self.seq_length)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids, mask = self.samples[index]
        pad = self.seq_length + 1 - len(ids)
        ids = ids + [self.tokenizer.pad_id] * pad
        mask = mask + [0] * pad
        tokens = torch.tensor(ids[:-1], dtype=torch.long)
        labels = torch.tensor(ids[1:], dtype=torch.long)
        loss_mask = torch.tensor(mask[1:], dtype=torch.float32)
        return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask}

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        items = [self[i] for i in indices]
        return {key: torch.stack([item[key] for item in items]) for key in items[0]}

    def padding_stats(self) -> dict[str, float]:
        """Token budget vs real tokens: ``padding_fraction`` is the share of padded positions."""
        real = sum(len(ids) - 1 for ids, _ in self.samples)
        total = len(self.samples) * self.seq_length
        return {"samples": len(self.samples), "documents": len(self.samples), "tokens": total,
                "real_tokens": real, "padding_fraction": 1.0 - real / total if total else 0.0}


def build_sft_dataset(rows: list[dict[str, Any]], tokenizer: Tokenizer, data: Any) -> Any:
    """SFT data set from a ``DataConfig``-like object (format, loss_on, chat_template, overlong, pack)."""
    kwargs = dict(fmt=data.format, loss_on=data.loss_on, template=getattr(data, "chat_template", "plain"),
                  overlong=getattr(data, "overlong", "truncate"))
    if getattr(data, "pack", False):
        from engine.data.packing import PackedSFTDataset

        return PackedSFTDataset(rows, tokenizer, data.seq_length, **kwargs)
    return SFTDataset(rows, tokenizer, data.seq_length, **kwargs)


def builtin_rows(name: str, num: int, seed: int) -> list[dict[str, Any]]:
    """Rows of a built-in synthetic data set (``builtin:sft``, ``builtin:helpsteer``, ...)."""
    return _builtin_rows(name, num, seed)
