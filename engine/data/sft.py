"""SFT samples: rendered, truncated/padded to a fixed length, with a loss mask.

Each row becomes one *document* (ids, mask) of at most ``seq_length + 1`` tokens; a
sample is its next-token view: ``tokens = ids[:-1]``, ``labels = ids[1:]``,
``loss_mask = mask[1:]``, right-padded with the pad id (loss 0) to ``seq_length``.

Over-long rows follow ``overlong``: ``"truncate"`` keeps the first ``seq_length + 1``
tokens, ``"drop"`` drops the row. A row left with no loss token (its prompt alone
fills the sequence) is always dropped; the rows truncated or dropped are counted and
logged per source (the file, or ``<source> (validation)``). Padding waste is
reported by :meth:`SFTDataset.padding_stats`; :class:`engine.data.packing.PackedSFTDataset`
removes most of it.
"""

from __future__ import annotations

from typing import Any

import torch

# The document helpers live in engine.data.documents (shared with packing, which would
# otherwise import this module back); re-exported here for existing callers.
from engine.data.documents import DropCounts as DropCounts
from engine.data.documents import build_documents as build_documents
from engine.data.documents import fit_document as fit_document
from engine.data.documents import render_row as render_row
from engine.data.packing import PackedSFTDataset
from engine.data.synthetic import builtin_rows as _builtin_rows
from engine.data.tokenizers import Tokenizer


class SFTDataset:
    """Fixed-length next-token samples: ``tokens``, ``labels`` (shifted), ``loss_mask``."""

    def __init__(self, rows: list[dict[str, Any]], tokenizer: Tokenizer, seq_length: int,
                 fmt: str = "chat", loss_on: str = "assistant", template: str = "plain",
                 overlong: str = "truncate", source: str = "<data>"):
        self.tokenizer = tokenizer
        self.seq_length = seq_length
        self.drops = DropCounts(source=source)  # an empty set says why (DropCounts.empty_error)
        self.samples = build_documents(rows, tokenizer, seq_length, fmt, loss_on, template, overlong, source,
                                       self.drops)

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


def build_sft_dataset(rows: list[dict[str, Any]], tokenizer: Tokenizer, data: Any, source: str = "<data>") -> Any:
    """SFT data set from a ``DataConfig``-like object (format, loss_on, chat_template, overlong, pack); the
    over-long counts are logged for ``source``."""
    kwargs = dict(fmt=data.format, loss_on=data.loss_on, template=getattr(data, "chat_template", "plain"),
                  overlong=getattr(data, "overlong", "truncate"), source=source)
    if getattr(data, "pack", False):
        return PackedSFTDataset(rows, tokenizer, data.seq_length, **kwargs)
    return SFTDataset(rows, tokenizer, data.seq_length, **kwargs)


def builtin_rows(name: str, num: int, seed: int) -> list[dict[str, Any]]:
    """Rows of a built-in synthetic data set (``builtin:sft``, ``builtin:helpsteer``, ...)."""
    return _builtin_rows(name, num, seed)
