"""``tools/rm_synthetic_eval.py`` with responses the reward model could not score (longer than its seq_length)."""

from __future__ import annotations

import importlib.util
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

TOOL = Path(__file__).resolve().parents[2] / "tools" / "rm_synthetic_eval.py"


@pytest.fixture(scope="module")
def tool() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("rm_synthetic_eval", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_pairs_with_an_unscored_side_are_left_out_and_counted(tool: ModuleType) -> None:
    """A NaN score made every comparison False: those pairs counted as lost (accuracy 0.15 for a fine model)."""
    pairs = tool.controlled_pairs(6, seed=5)
    goodness = {(p.prompt, p.right): 1.0 for p in pairs} | {(p.prompt, p.wrong): 0.0 for p in pairs}
    lost = [p for p in pairs if p.wrong_kind == "misreading"][:2]
    for pair in lost:
        goodness[(pair.prompt, pair.wrong)] = math.nan
    report = tool.pairwise_report(pairs, goodness)
    misreading, same_form = report["misreading"], report["same_form"]
    assert (misreading["pairs"], misreading["unscored"], misreading["accuracy"]) == (4, 2, 1.0)
    assert (same_form["pairs"], same_form["unscored"], same_form["accuracy"]) == (6, 0, 1.0)
    by_task = misreading["by_task"]
    assert sum(entry["unscored"] for entry in by_task.values()) == 2
    assert all(entry["accuracy"] in (1.0, None) for entry in by_task.values())

    for pair in pairs:  # nothing scored: no accuracy, not 0
        goodness[(pair.prompt, pair.right)] = math.nan
    assert tool.pairwise_report(pairs, goodness)["same_form"] | {"by_task": None} == \
        {"pairs": 0, "accuracy": None, "unscored": 6, "by_task": None}


def test_mse_is_over_the_scored_rows(tool: ModuleType) -> None:
    """Every MSE was nan as soon as one row was not scored."""
    rows = [{"helpfulness": 4, "coherence": 2}, {"helpfulness": 0, "coherence": 4}, {"helpfulness": 2, "coherence": 0}]
    rewards = torch.tensor([[3.0, 2.0], [math.nan, math.nan], [2.0, 1.0]])
    train = [{"helpfulness": 1, "coherence": 1}, {"helpfulness": 3, "coherence": 3}]  # mean 2
    mse = tool._mse(rewards, rows, train, ["helpfulness", "coherence"])
    assert mse["helpfulness"] == {"model": pytest.approx(0.5), "predict_training_mean": pytest.approx(2.0), "rows": 2}
    assert mse["coherence"] == {"model": pytest.approx(0.5), "predict_training_mean": pytest.approx(2.0), "rows": 2}
    nothing = tool._mse(torch.full((3, 2), math.nan), rows, train, ["helpfulness", "coherence"])
    assert nothing["helpfulness"] == {"model": None, "predict_training_mean": None, "rows": 0}
