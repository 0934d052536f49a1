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

Over-long: a prompt that leaves no room for a reply token drops the pair; otherwise a
too-long reply is cut at the end (``"truncate"``; the end-of-turn is then lost) or the
pair is dropped (``"drop"``). Both counts are logged.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from engine.data.chat import prompt_messages, render_prompt, render_reply
from engine.data.schemas import ATTRIBUTES, MISSING
from engine.data.tokenizers import Tokenizer

logger = logging.getLogger(__name__)


class _Fitter:
    """Applies the over-long policy to (prompt, reply) and counts what it dropped."""

    def __init__(self, seq_length: int, overlong: str):
        if overlong not in ("truncate", "drop"):
            raise ValueError(f"overlong={overlong!r}: choose 'truncate' or 'drop'")
        self.seq_length = seq_length
        self.overlong = overlong
        self.long_prompts = 0
        self.long_replies = 0

    def fit(self, prompt: list[int], reply: list[int]) -> Optional[tuple[list[int], int]]:
        """(ids, prompt length) or None when dropped."""
        if len(prompt) + 1 > self.seq_length:
            self.long_prompts += 1
            return None
        if len(prompt) + len(reply) > self.seq_length:
            if self.overlong == "drop":
                self.long_replies += 1
                return None
            reply = reply[: self.seq_length - len(prompt)]
        return prompt + reply, len(prompt)

    def log(self, what: str, total: int) -> None:
        if self.long_prompts:
            logger.warning("dropped %d of %d %s whose prompt fills seq_length=%d", self.long_prompts, total, what,
                           self.seq_length)
        if self.long_replies:
            logger.warning("dropped %d of %d %s longer than seq_length=%d (data.overlong=drop)", self.long_replies,
                           total, what, self.seq_length)


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
                 template: str = "plain", overlong: str = "truncate"):
        self.tokenizer = tokenizer
        self.seq_length = seq_length
        fitter = _Fitter(seq_length, overlong)
        self.pairs: list[tuple[tuple[list[int], int], tuple[list[int], int], dict[str, float]]] = []
        for row in rows:
            prompt = render_prompt(prompt_messages(row["prompt"]), tokenizer, template)
            chosen = fitter.fit(prompt, render_reply(row["chosen"], tokenizer, template))
            rejected = fitter.fit(prompt, render_reply(row["rejected"], tokenizer, template))
            if chosen is None or rejected is None:
                continue
            self.pairs.append((chosen, rejected, _pair_scalars(row)))
        fitter.log("pairs", len(rows))

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
                 template: str = "plain", overlong: str = "truncate"):
        self.tokenizer = tokenizer
        self.seq_length = seq_length
        fitter = _Fitter(seq_length, overlong)
        self.samples: list[tuple[tuple[list[int], int], list[float]]] = []
        self.row_index: list[int] = []  # position in ``rows`` of each sample (over-long rows may be dropped)
        for i, row in enumerate(rows):
            prompt = render_prompt(prompt_messages(row["prompt"]), tokenizer, template)
            fitted = fitter.fit(prompt, render_reply(row["response"], tokenizer, template))
            if fitted is not None:
                self.samples.append((fitted, [float(row.get(name, MISSING)) for name in ATTRIBUTES]))
                self.row_index.append(i)
        fitter.log("rows", len(rows))

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
