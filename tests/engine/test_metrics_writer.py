"""``metrics.jsonl`` and TensorBoard show the same steps after a resume or a fresh run in a reused directory.

TensorBoard kept the interrupted run's events: a run killed at step 6 and resumed from step 3 drew
1..6 then 4, 5 (the curve looped back), and fresh runs in one directory were drawn over each other.
"""

from __future__ import annotations

import json
from pathlib import Path

from engine.metrics import MetricsWriter


def _tensorboard_steps(run: Path) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return [event.step for event in events.Scalars("train/loss")]


def _run(run: Path, start: int, steps: range) -> None:
    writer = MetricsWriter(str(run), enabled=True, tensorboard=True)
    writer.keep_until(start)
    for step in steps:
        writer.write(step, {"loss": float(step)})
    writer.close()


def test_a_resume_and_a_fresh_run_leave_one_curve(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _run(run, 0, range(1, 7))  # interrupted after step 6, its checkpoint at step 3
    _run(run, 3, range(4, 6))
    assert _tensorboard_steps(run) == [1, 2, 3, 4, 5]
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]
    _run(run, 0, range(1, 3))  # a fresh run in the same directory
    assert _tensorboard_steps(run) == [1, 2]


def test_a_fresh_run_does_not_keep_an_earlier_runs_step_0_evaluation(tmp_path: Path) -> None:
    """Killed before its first checkpoint and started again, a run with run.eval_at_start logged its step-0
    validation twice: keep_until(0) kept the old one, and the new run wrote it again."""
    run = tmp_path / "run"
    for _ in range(2):
        writer = MetricsWriter(str(run), enabled=True, tensorboard=True)
        writer.keep_until(0)
        writer.write(0, {"loss": 9.0}, prefix="validation")
        writer.write(1, {"loss": 1.0})
        writer.close()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in records] == [(0, "validation"), (1, "train")], records
    assert _tensorboard_steps(run) == [1]


def test_a_run_that_fails_before_training_writes_no_events_file(tmp_path: Path) -> None:
    writer = MetricsWriter(str(tmp_path / "run"), enabled=True, tensorboard=True)
    writer.close()
    assert not (tmp_path / "run" / "tensorboard").exists()
