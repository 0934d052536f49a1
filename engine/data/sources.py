"""Resolve ``data.source`` / ``data.validation_source`` into validated rows (train, validation).

Sources are files (``.jsonl``, ``.json``, ``.parquet``), ``hf:<org>/<name>`` hub data
sets or ``builtin:<name>`` synthetic sets (see :mod:`engine.data.loaders`). Every row is
checked against ``data.format`` before training; ``data.on_error`` decides whether a bad
row stops the run (naming file, line and field) or is skipped and counted.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Optional

from engine.data.loaders import load_rows as _load_source
from engine.data.schemas import Row
from engine.data.synthetic import SPLITS, UNSPLIT


def read_source(source: str, fmt: str, num: int, seed: int, on_error: str = "raise",
                formats: Optional[Sequence[str]] = None) -> list[Row]:
    """Validated rows of one source (``num``/``seed`` only matter for ``builtin:`` sources); ``formats``
    are those the run trains on, so a row's format hint names no other."""
    return _load_source(source, fmt, on_error=on_error, num=num, seed=seed, formats=formats)


def load_rows(data: Any, seed: int, formats: Optional[Sequence[str]] = None) -> tuple[list[dict[str, Any]],
                                                                                      list[dict[str, Any]]]:
    """Training and validation rows; without a validation source a seeded holdout is split off."""
    fmt = getattr(data, "format", "chat")
    on_error = getattr(data, "on_error", "raise")
    rows = read_source(data.source, fmt, data.num_samples, seed, on_error, formats)
    if data.validation_source:
        return rows, read_source(data.validation_source, fmt, data.num_samples, seed + 1, on_error, formats)
    holdout = int(len(rows) * data.validation_fraction)
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    valid = set(order[:holdout])
    return [r for i, r in enumerate(rows) if i not in valid], [r for i, r in enumerate(rows) if i in valid]


def validation_split(source: str) -> Optional[str]:
    """``builtin:<set>:validation`` for a built-in set with splits named without one, else None."""
    base, _, split = source.partition(":")[2].partition(":")
    if not source.startswith("builtin:") or split or f"builtin:{base}" in UNSPLIT:
        return None
    return f"builtin:{base}:{SPLITS[1]}"


def _prompt_key(row: dict[str, Any]) -> str:
    return json.dumps(row.get("prompt"), sort_keys=True)


def hold_out_prompts(rows: list[dict[str, Any]], fraction: float, seed: int) -> tuple[list[dict[str, Any]],
                                                                                       list[dict[str, Any]]]:
    """(train, validation): about ``fraction`` of the rows, whole prompts at a time, chosen by ``seed``.

    Every row of a prompt lands on the same side, so validation pairs stay complete and no
    validation prompt is seen in training.
    """
    keys = sorted({_prompt_key(row) for row in rows})
    random.Random(seed).shuffle(keys)
    target, held, count = int(len(rows) * fraction), set(), 0
    sizes: dict[str, int] = defaultdict(int)
    for row in rows:
        sizes[_prompt_key(row)] += 1
    for key in keys:
        if count >= target:
            break
        held.add(key)
        count += sizes[key]
    return [r for r in rows if _prompt_key(r) not in held], [r for r in rows if _prompt_key(r) in held]


def paired_rows(data: Any, seed: int, formats: Optional[Sequence[str]] = None) -> tuple[list[dict[str, Any]],
                                                                                        list[dict[str, Any]]]:
    """Training and validation rows of data whose rows group by prompt (reward models, DPO).

    Without ``data.validation_source`` validation comes from ``data.source``: a ``builtin:``
    set with splits validates on its ``:validation`` split (words and numbers training never
    sees), another ``builtin:`` set draws fresh rows with the next seed, and a file or hub set
    holds out ``data.validation_fraction`` of its rows, whole prompts at a time.
    """
    if data.validation_source:
        return load_rows(data, seed, formats)
    if data.source.startswith("builtin:"):
        held_out = validation_split(data.source)
        return (read_source(data.source, data.format, data.num_samples, seed, data.on_error, formats),
                read_source(held_out or data.source, data.format, data.num_samples, seed + 1, data.on_error, formats))
    rows = read_source(data.source, data.format, data.num_samples, seed, data.on_error, formats)
    return hold_out_prompts(rows, data.validation_fraction, seed)
