"""Pairwise (DPO, Bradley-Terry) and attribute (regression reward model) samples.

Sequence layout, shared by both: ``tokens`` are the rendered ids (prompt with the
assistant header, then the reply with its end-of-turn), right-padded to ``seq_length``;
``labels[i] = tokens[i + 1]`` and ``loss_mask[i]`` is 1 where ``labels[i]`` is a reply
token (so the summed log-probability of the reply is ``sum(logp(labels) * loss_mask)``);
``end_index`` is the position of the last real token — the end-of-response token whose
final hidden state a reward head reads.

Pairs: :meth:`PreferenceDataset.collate` keeps both halves of a pair in the same
micro-batch, interleaved: rows ``[c0, r0, c1, r1, ...]`` (chosen at even rows, rejected
at odd rows), so ``rewards.view(-1, 2)`` gives ``[:, 0]`` chosen and ``[:, 1]`` rejected.
Per-pair tensors: ``margin`` (0 when the row has none), and from per-annotator
strengths (positive = chosen better) ``diverging`` (annotators disagree on the
direction) and ``annotator_spread`` (max - min), 0 without annotators.

Over-long rows (``overlong``): a reward is read at the end-of-response token, so a
response is never cut. ``"cut_prompt"`` (the default) keeps every response whole and
cuts the prompt from the left, keeping the template's structure
(:mod:`engine.data.fit`); the two responses of a pair share one prompt, cut to fit the
longer of them. A pair (or row) is dropped only when a response alone does not fit.
``"drop"`` drops every pair (row) longer than ``seq_length``. Per source, the number of
prompts cut and of items dropped is logged and kept in ``overlong_counts``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from engine.data.chat import prompt_messages, render_prompt, render_reply
from engine.data.fit import OVERLONG_POLICIES, OverlongCounts, fit_prompt
from engine.data.schemas import ATTRIBUTES, MISSING
from engine.data.tokenizers import Tokenizer


class PromptFitter:
    """Applies the over-long policy to (prompt, replies) and counts what it cut and dropped."""

    def __init__(self, tokenizer: Tokenizer, template: str, seq_length: int, overlong: str, source: str):
        if overlong not in OVERLONG_POLICIES:
            raise ValueError(f"overlong={overlong!r}: choose one of {', '.join(OVERLONG_POLICIES)}")
        self.tokenizer, self.template = tokenizer, template
        self.seq_length = seq_length
        self.overlong = overlong
        self.counts = OverlongCounts(source)

    def prompt(self, prompt: Any, replies: list[list[int]]) -> Optional[list[int]]:
        """Prompt ids that every reply of ``replies`` fits after, or None when the item is dropped."""
        self.counts.total += 1
        messages = prompt_messages(prompt)
        longest = max(len(reply) for reply in replies)
        if self.overlong == "drop":
            ids: Optional[list[int]] = render_prompt(messages, self.tokenizer, self.template)
            cut = False
            if ids is not None and len(ids) + longest > self.seq_length:
                ids = None
        else:
            fitted = fit_prompt(messages, longest, self.tokenizer, self.template, self.seq_length)
            ids, cut = fitted if fitted is not None else (None, False)
        if ids is None:
            self.counts.note_dropped()
            return None
        self.counts.prompt_cut += int(cut)
        return ids


def _sequence(ids: list[int], prompt_length: int, seq_length: int, pad_id: int) -> dict[str, torch.Tensor]:
    pad = seq_length - len(ids)
    padded = ids + [pad_id] * pad
    loss = [0] * prompt_length + [1] * (len(ids) - prompt_length) + [0] * pad
    return {
        "tokens": torch.tensor(padded, dtype=torch.long),
        "labels": torch.tensor(padded[1:] + [pad_id], dtype=torch.long),
        "loss_mask": torch.tensor(loss[1:] + [0], dtype=torch.float32),
        "end_index": torch.tensor(len(ids) - 1, dtype=torch.long),
    }


class PreferenceDataset:
    """Normalised ``pairs`` rows (see :mod:`engine.data.schemas`) as chosen/rejected samples."""

    def __init__(self, rows: list[dict[str, Any]], tokenizer: Tokenizer, seq_length: int,
                 template: str = "plain", overlong: str = "cut_prompt", source: str = "<data>"):
        self.tokenizer = tokenizer
        self.seq_length = seq_length
        fitter = PromptFitter(tokenizer, template, seq_length, overlong, source)
        self.pairs: list[tuple[tuple[list[int], int], tuple[list[int], int], dict[str, float]]] = []
        for row in rows:
            chosen = render_reply(row["chosen"], tokenizer, template)
            rejected = render_reply(row["rejected"], tokenizer, template)
            prompt = fitter.prompt(row["prompt"], [chosen, rejected])
            if prompt is not None:
                self.pairs.append(((prompt + chosen, len(prompt)), (prompt + rejected, len(prompt)),
                                   _pair_scalars(row)))
        fitter.counts.log("pairs", seq_length, overlong)
        self.overlong_counts = fitter.counts

    def __len__(self) -> int:
        return len(self.pairs)

    def length(self, index: int) -> int:
        """Positions sample ``index`` uses (the longer of chosen and rejected)."""
        chosen, rejected, _ = self.pairs[index]
        return max(len(chosen[0]), len(rejected[0]))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        chosen, rejected, scalars = self.pairs[index]
        pad = self.tokenizer.pad_id
        first = _sequence(*chosen, self.seq_length, pad)
        second = _sequence(*rejected, self.seq_length, pad)
        item = {key: torch.stack([first[key], second[key]]) for key in first}
        item.update({key: torch.tensor(value) for key, value in scalars.items()})
        return item

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """Rows ``[c0, r0, c1, r1, ...]`` for sequence tensors; one entry per pair otherwise."""
        items = [self[i] for i in indices]
        batch = {}
        for key in items[0]:
            stacked = torch.stack([item[key] for item in items])
            batch[key] = stacked.flatten(0, 1) if stacked.dim() >= 2 else stacked
        return batch


def _pair_scalars(row: dict[str, Any]) -> dict[str, Any]:
    votes = row.get("annotator_strengths") or []
    return {
        "margin": float(row.get("margin") or 0.0),
        "diverging": bool(any(v > 0 for v in votes) and any(v < 0 for v in votes)),
        "annotator_spread": float(max(votes) - min(votes)) if votes else 0.0,
    }


class AttributeDataset:
    """HelpSteer ``attributes`` rows for a regression reward model.

    Each sample: ``tokens`` (prompt + response, layout as in the module docstring),
    ``end_index`` and ``attributes`` ``[5]`` float in :data:`ATTRIBUTES` order, with
    missing ratings left at the sentinel :data:`MISSING` (-100) for the loss to mask.
    """

    def __init__(self, rows: list[dict[str, Any]], tokenizer: Tokenizer, seq_length: int,
                 template: str = "plain", overlong: str = "cut_prompt", source: str = "<data>"):
        self.tokenizer = tokenizer
        self.seq_length = seq_length
        fitter = PromptFitter(tokenizer, template, seq_length, overlong, source)
        self.samples: list[tuple[tuple[list[int], int], list[float]]] = []
        self.row_index: list[int] = []  # position in ``rows`` of each sample (over-long rows may be dropped)
        for i, row in enumerate(rows):
            reply = render_reply(row["response"], tokenizer, template)
            prompt = fitter.prompt(row["prompt"], [reply])
            if prompt is not None:
                self.samples.append(((prompt + reply, len(prompt)), [float(row.get(name, MISSING))
                                                                    for name in ATTRIBUTES]))
                self.row_index.append(i)
        fitter.counts.log("rows", seq_length, overlong)
        self.overlong_counts = fitter.counts

    def __len__(self) -> int:
        return len(self.samples)

    def length(self, index: int) -> int:
        """Positions sample ``index`` uses."""
        return len(self.samples[index][0][0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        (ids, prompt_length), attributes = self.samples[index]
        item = _sequence(ids, prompt_length, self.seq_length, self.tokenizer.pad_id)
        item["attributes"] = torch.tensor(attributes, dtype=torch.float32)
        return item

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        items = [self[i] for i in indices]
        return {key: torch.stack([item[key] for item in items]) for key in items[0]}
