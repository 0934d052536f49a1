"""Diverging preferences: pairs whose annotators disagree, and accuracy on them.

Annotators often disagree for legitimate reasons (an under-specified task, a matter
of style, a refusal) rather than noise, and a Bradley-Terry loss cannot tell a
unanimous preference from a split vote. A pair is *diverging* when its annotators
disagree on the direction (some strengths > 0 and some < 0), or — when a threshold is
given — when the spread ``max - min`` of their strengths is above the threshold.
Without a threshold this is the rule the preference data set uses for its per-pair
``diverging`` flag (:mod:`engine.data.preference`).

Per-annotator strengths come from ``annotator_strengths`` (pairs format, positive =
chosen better) or ``individual_preference`` (HelpSteer2-Preference format, negative =
response_1 better). Flipping every sign changes neither rule, so both read the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

Row = dict[str, Any]
STRENGTH_FIELDS = ("annotator_strengths", "individual_preference")


def annotator_strengths(row: Row) -> Optional[list[int]]:
    """The row's per-annotator strengths, or None when it has none."""
    for field in STRENGTH_FIELDS:
        value = row.get(field)
        if value:
            return [int(v) for v in value]
    return None


def is_diverging(strengths: Optional[Sequence[int]], spread_threshold: Optional[float] = None) -> bool:
    """Annotators disagree on the direction, or (with a threshold) ``max - min > spread_threshold``."""
    if not strengths:
        return False
    if any(s > 0 for s in strengths) and any(s < 0 for s in strengths):
        return True
    return spread_threshold is not None and max(strengths) - min(strengths) > spread_threshold


def describe_rule(spread_threshold: Optional[float] = None) -> str:
    """The diverging rule in words, for reports."""
    rule = "diverging = annotators disagree on the direction"
    return rule if spread_threshold is None else f"{rule} or their spread max-min > {spread_threshold:g}"


def split_accuracy(rows: Sequence[Row], chosen_scores: Sequence[float], rejected_scores: Sequence[float],
                   spread_threshold: Optional[float] = None) -> dict[str, Any]:
    """Accuracy on unanimous vs diverging pairs (ties count as incorrect).

    Returns ``{"rule", "unanimous": {"count", "correct", "accuracy"}, "diverging": {...},
    "without_annotators"}``; ``accuracy`` is None for an empty group. Rows without
    annotator strengths are counted, not split.
    """
    if not len(rows) == len(chosen_scores) == len(rejected_scores):
        raise ValueError(f"{len(rows)} rows but {len(chosen_scores)} chosen and {len(rejected_scores)} rejected "
                         "scores")
    groups = {"unanimous": [0, 0], "diverging": [0, 0]}  # [count, correct]
    without = 0
    for row, chosen, rejected in zip(rows, chosen_scores, rejected_scores, strict=True):
        strengths = annotator_strengths(row)
        if strengths is None:
            without += 1
            continue
        group = groups["diverging" if is_diverging(strengths, spread_threshold) else "unanimous"]
        group[0] += 1
        group[1] += int(chosen > rejected)
    out: dict[str, Any] = {"rule": describe_rule(spread_threshold), "without_annotators": without}
    for name, (count, correct) in groups.items():
        out[name] = {"count": count, "correct": correct, "accuracy": correct / count if count else None}
    return out


def list_diverging(rows: Sequence[Row], spread_threshold: Optional[float] = None) -> tuple[list[Row], dict[str, int]]:
    """The diverging rows, and counts.

    Counts: ``rows``, ``with_annotators``, ``unanimous``, ``diverging``, and among the
    diverging ``direction`` (annotators disagree on the direction) and ``spread_only``
    (same direction, spread above the threshold).
    """
    counts = {"rows": len(rows), "with_annotators": 0, "unanimous": 0, "diverging": 0, "direction": 0,
              "spread_only": 0}
    diverging = []
    for row in rows:
        strengths = annotator_strengths(row)
        if strengths is None:
            continue
        counts["with_annotators"] += 1
        if not is_diverging(strengths, spread_threshold):
            counts["unanimous"] += 1
            continue
        counts["diverging"] += 1
        counts["direction" if is_diverging(strengths) else "spread_only"] += 1
        diverging.append(row)
    return diverging, counts
