"""Sequence packing for SFT with attention boundaries preserved.

Each document contributes its next-token view (``ids[:-1]`` as tokens, ``ids[1:]`` as
labels), so no label ever crosses into the next document. Documents are packed into
rows of ``seq_length`` tokens by best-fit decreasing (deterministic: ties keep data
order). A packed sample carries:

* ``position_ids`` — restart at 0 in every document;
* ``segment_ids`` — document number within the row, ``-1`` on padding;
* in :meth:`PackedSFTDataset.collate`, ``attention_mask`` ``[b, 1, s, s]`` bool, True =
  masked out (the convention of ``engine.models.attention.SDPACoreAttention``): causal
  *and* block-diagonal, so a token sees only earlier tokens of its own document. Padding
  forms its own causal block, so no row of the mask is fully masked (SDPA would give NaN).

With RoPE the output equals running each document alone even though megatron derives
rotary positions from the row index: attention scores depend only on position
*differences*, which are the same inside a block. ``position_ids`` are still provided
for absolute position embeddings.

Padding waste: :meth:`padding_stats` reports the share of padded positions, to compare
with :meth:`engine.data.sft.SFTDataset.padding_stats` (``tools/bench/data.py`` does).
Packing changes what one *sample* is (a row of several documents), hence the number of
samples per epoch; the loss, summed per token, is unaffected.
"""

from __future__ import annotations

import bisect
from typing import Any

import torch

from engine.data.documents import DropCounts, build_documents
from engine.data.tokenizers import Tokenizer


def pack_lengths(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing bins of document indices whose lengths sum to at most ``capacity``."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, bin number)
    for index in order:
        length = lengths[index]
        if length > capacity:
            raise ValueError(f"document {index} has {length} tokens, more than the row capacity {capacity}")
        slot = bisect.bisect_left(free, (length, -1))
        if slot < len(free):
            remaining, number = free.pop(slot)
        else:
            remaining, number = capacity, len(bins)
            bins.append([])
        bins[number].append(index)
        bisect.insort(free, (remaining - length, number))
    return bins


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """``[b, s]`` segment ids → ``[b, 1, s, s]`` bool mask, True where attention is NOT allowed."""
    seq = segment_ids.shape[-1]
    same = segment_ids.unsqueeze(-1) == segment_ids.unsqueeze(-2)
    causal = torch.ones(seq, seq, dtype=torch.bool, device=segment_ids.device).tril()
    return ~(same & causal).unsqueeze(1)


class PackedSFTDataset:
    """SFT documents packed into ``seq_length`` rows (same arguments as ``SFTDataset``)."""

    def __init__(self, rows: list[dict[str, Any]], tokenizer: Tokenizer, seq_length: int,
                 fmt: str = "chat", loss_on: str = "assistant", template: str = "plain",
                 overlong: str = "truncate", source: str = "<data>"):
        self.tokenizer = tokenizer
        self.seq_length = seq_length
        self.drops = DropCounts(source=source)  # an empty set says why (DropCounts.empty_error)
        self.documents = build_documents(rows, tokenizer, seq_length, fmt, loss_on, template, overlong, source,
                                         self.drops)
        self.bins = pack_lengths([len(ids) - 1 for ids, _ in self.documents], seq_length)

    def __len__(self) -> int:
        return len(self.bins)

    def length(self, index: int) -> int:
        """Every packed row keeps all ``seq_length`` positions (its mask and positions are built for them)."""
        return self.seq_length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        tokens: list[int] = []
        labels: list[int] = []
        loss: list[int] = []
        positions: list[int] = []
        segments: list[int] = []
        for segment, doc in enumerate(self.bins[index]):
            ids, mask = self.documents[doc]
            tokens += ids[:-1]
            labels += ids[1:]
            loss += mask[1:]
            positions += range(len(ids) - 1)
            segments += [segment] * (len(ids) - 1)
        pad = self.seq_length - len(tokens)
        pad_id = self.tokenizer.pad_id
        return {
            "tokens": torch.tensor(tokens + [pad_id] * pad, dtype=torch.long),
            "labels": torch.tensor(labels + [pad_id] * pad, dtype=torch.long),
            "loss_mask": torch.tensor(loss + [0] * pad, dtype=torch.float32),
            "position_ids": torch.tensor(positions + list(range(pad)), dtype=torch.long),
            "segment_ids": torch.tensor(segments + [-1] * pad, dtype=torch.long),
        }

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """Stacked samples plus ``attention_mask`` ``[b, 1, s, s]`` (True = masked out)."""
        items = [self[i] for i in indices]
        batch = {key: torch.stack([item[key] for item in items]) for key in items[0]}
        batch["attention_mask"] = block_causal_mask(batch["segment_ids"])
        return batch

    def padding_stats(self) -> dict[str, float]:
        """Token budget vs real tokens: ``padding_fraction`` is the share of padded positions."""
        real = sum(len(ids) - 1 for ids, _ in self.documents)
        total = len(self.bins) * self.seq_length
        return {"samples": len(self.bins), "documents": len(self.documents), "tokens": total,
                "real_tokens": real, "padding_fraction": 1.0 - real / total if total else 0.0}
