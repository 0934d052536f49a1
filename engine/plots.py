"""Learning curves as a PNG, drawn with Pillow (no plotting library needed).

:func:`write_curves` reads a run's ``metrics.jsonl`` and draws one panel per metric
(training values as a line, held-out ``validation/`` values as dots) into
``<run>/curves.png``, so a run's progress can be looked at without TensorBoard.
"""

from __future__ import annotations

import math
import os
from typing import Optional

PANEL = (360, 220)
MARGIN = 40


def _read_records(path: str) -> list[dict]:
    """The whole records of a ``metrics.jsonl``, read once per drawing (a trainer redraws with every checkpoint)."""
    from engine.metrics import parse_records

    return [record for _, record in parse_records(path)]


def _series(records: list[dict], key: str) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(training, held-out) points of ``key``; a step logged again (a resumed or repeated run) keeps its last value."""
    points: dict[str, dict[int, float]] = {"train": {}, "validation": {}}
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            split = "validation" if record.get("split") == "validation" else "train"
            points[split][int(record.get("step", 0))] = float(value)
    return sorted(points["train"].items()), sorted(points["validation"].items())


def _panel(draw: object, origin: tuple[int, int], title: str, train: list[tuple[int, float]],
           held_out: list[tuple[int, float]]) -> None:
    x0, y0 = origin
    width, height = PANEL
    points = train + held_out
    draw.text((x0 + MARGIN, y0 + 4), title, fill="black")  # type: ignore[attr-defined]
    box = (x0 + MARGIN, y0 + 20, x0 + width - 10, y0 + height - 24)
    draw.rectangle(box, outline="gray")  # type: ignore[attr-defined]
    if not points:
        return
    steps = [p[0] for p in points]
    values = [p[1] for p in points]
    lo, hi = min(values), max(values)
    hi = hi if hi > lo else lo + 1.0
    first, last = min(steps), max(steps)
    last = last if last > first else first + 1

    def place(step: int, value: float) -> tuple[float, float]:
        return (box[0] + (step - first) / (last - first) * (box[2] - box[0]),
                box[3] - (value - lo) / (hi - lo) * (box[3] - box[1]))

    draw.text((x0 + 2, box[1]), f"{hi:.3g}", fill="gray")  # type: ignore[attr-defined]
    draw.text((x0 + 2, box[3] - 10), f"{lo:.3g}", fill="gray")  # type: ignore[attr-defined]
    draw.text((box[0], box[3] + 4), f"{first}", fill="gray")  # type: ignore[attr-defined]
    draw.text((box[2] - 30, box[3] + 4), f"{last}", fill="gray")  # type: ignore[attr-defined]
    if len(train) > 1:
        draw.line([place(s, v) for s, v in train], fill="royalblue", width=2)  # type: ignore[attr-defined]
    for s, v in held_out:
        x, y = place(s, v)
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill="darkorange")  # type: ignore[attr-defined]


def write_curves(run_dir: str, keys: tuple[str, ...], out: Optional[str] = None) -> Optional[str]:
    """Draw ``keys`` from ``run_dir/metrics.jsonl`` into ``out`` (default ``run_dir/curves.png``)."""
    from PIL import Image, ImageDraw

    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path) or not keys:
        return None
    columns = 2
    rows = -(-len(keys) // columns)
    image = Image.new("RGB", (PANEL[0] * columns, PANEL[1] * rows + 20), "white")
    draw = ImageDraw.Draw(image)
    draw.text((8, PANEL[1] * rows + 4), "line: training; dots: held-out evaluation", fill="gray")
    records = _read_records(path)
    for index, key in enumerate(keys):
        train, held_out = _series(records, key)
        _panel(draw, ((index % columns) * PANEL[0], (index // columns) * PANEL[1]), key, train, held_out)
    out = out or os.path.join(run_dir, "curves.png")
    from engine.files import atomic_open

    with atomic_open(out, "wb") as handle:
        image.save(handle, format="PNG")
    return out
