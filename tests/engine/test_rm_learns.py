"""The from-scratch reward-model recipe learns what the synthetic data's labels say.

Trains ``examples/rm_regression_from_scratch.yaml`` (tiny-llama, random init) as a user would,
then judges it with ``tools/rm_synthetic_eval.py`` on prompts of the ``eval`` split, whose words
and number pairs never occur in training. Controlled pairs (same prompt, same style, both
coherent, one right and one wrong answer) must be won when the wrong answer is a misreading (the
answer to a sibling task); the figure for same-form wrong answers (off by one, two letters
swapped) is reported but has no bar (README). The style attributes' MSE must be well under that
of predicting the training mean.

Two lengths of the same recipe:

* ``make test`` runs it shortened to its first form, 4 layers and 1200 steps (``SHORTENED``;
  about 5.5 minutes on one idle AMD EPYC core): 0.81 on misreadings, measured on an Intel Xeon
  (2026-12-02) and on an AMD EPYC (2026-12-04) alike. Its bar is ``SHORTENED_BAR``;
* ``make test-learning`` also runs the example as shipped, 6 layers and 4800 steps (marked
  ``full_recipe``; 11 minutes on an idle Intel Xeon core, about 29 on an AMD EPYC one), against
  ``MISREADING_BAR``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import REPO, _env

# The target is 0.90. Measured on the shipped recipe (6 layers, 4800 steps): 0.91 on an Intel Xeon.
# 6 layers x 3600 steps gave 0.897 (600 unseen pairs; README, tools/bench/results/rm_from_scratch.json).
# The bar leaves room for other CPUs' kernels; same-form errors stay near chance (0.50-0.58).
MISREADING_BAR = 0.85

# The recipe's first form, before it grew to reach 0.90: 0.81 measured on both CPU models.
SHORTENED = ["model.num_layers=4", "run.train_steps=1200"]
SHORTENED_BAR = 0.75


def check_report(report: dict[str, Any], misreading_bar: float) -> None:
    """The assertions on a ``tools/rm_synthetic_eval.py`` report (kept apart to check a saved report)."""
    accuracy = report["controlled_pairwise_accuracy"]
    misreading = accuracy["misreading"]
    assert misreading["pairs"] >= 500 and accuracy["same_form"]["pairs"] >= 500
    assert misreading["accuracy"] >= misreading_bar, misreading
    for name in ("coherence", "complexity", "verbosity"):  # style: judged from the response alone
        mse = report["mse"][name]
        assert mse["model"] < 0.5 * mse["predict_training_mean"], (name, mse)
    for name in ("helpfulness", "correctness"):  # same-form errors leave part of these unexplained
        mse = report["mse"][name]
        assert mse["model"] < mse["predict_training_mean"], (name, mse)


def train_and_judge(tmp_path: Path, overrides: list[str]) -> dict[str, Any]:
    """Train the example with ``overrides`` and return the eval tool's report on its best checkpoint."""
    run = tmp_path / "rm"
    subprocess.run([sys.executable, "-m", "engine", "train", "rm", "--config",
                    str(REPO / "examples/rm_regression_from_scratch.yaml"), f"run.output_dir={run}",
                    "logging.progress=false", "logging.tensorboard=false", *overrides],
                   cwd=REPO, env=_env(), check=True, stdout=subprocess.DEVNULL)
    report_file = tmp_path / "eval.json"
    subprocess.run([sys.executable, "tools/rm_synthetic_eval.py", "--checkpoint", str(run / "checkpoints" / "best"),
                    "--out", str(report_file)], cwd=REPO, env=_env(), check=True, stdout=subprocess.DEVNULL)
    report: dict[str, Any] = json.loads(report_file.read_text())
    return report


@pytest.mark.learning(minutes=6)  # handed out first under xdist, longest first (tests/conftest.py)
def test_shortened_rm_recipe_separates_right_from_misread_on_unseen_prompts(tmp_path: Path) -> None:
    check_report(train_and_judge(tmp_path, SHORTENED), SHORTENED_BAR)


@pytest.mark.learning(minutes=30)
@pytest.mark.full_recipe
def test_regression_rm_from_scratch_separates_right_from_misread_on_unseen_prompts(tmp_path: Path) -> None:
    check_report(train_and_judge(tmp_path, []), MISREADING_BAR)
