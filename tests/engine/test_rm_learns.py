"""The from-scratch reward-model recipe learns what the synthetic data's labels say (about 12 minutes).

Trains ``examples/rm_regression_from_scratch.yaml`` (tiny-llama with 6 layers, random init) exactly as a user
would, then judges it with ``tools/rm_synthetic_eval.py`` on prompts of the ``eval`` split,
whose words and number pairs never occur in training. Controlled pairs (same prompt, same
style, both coherent, one right and one wrong answer) must be won, at ``MISREADING_BAR``, when
the wrong answer is a misreading (the answer to a sibling task); the figure for same-form wrong
answers (off by one, two letters swapped) is reported but has no bar (README). The style attributes' MSE must be
well under that of predicting the training mean.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import REPO, _env

pytestmark = pytest.mark.learning  # handed out first under xdist (tests/conftest.py)

# The target is 0.90. Measured on this recipe (6 layers, 4800 steps): 0.91 on an Intel Xeon. Its
# 4-layer, 1200-step predecessor gave 0.81 (0.83 before the exact cut); 6 layers x 3600 steps 0.897
# (600 unseen pairs; README, tools/bench/results/rm_from_scratch.json). The bar leaves room for other
# CPUs' kernels; same-form errors stay near chance (0.50-0.58).
MISREADING_BAR = 0.85


def check_report(report: dict[str, Any]) -> None:
    """The assertions on a ``tools/rm_synthetic_eval.py`` report (kept apart to check a saved report)."""
    accuracy = report["controlled_pairwise_accuracy"]
    misreading = accuracy["misreading"]
    assert misreading["pairs"] >= 500 and accuracy["same_form"]["pairs"] >= 500
    assert misreading["accuracy"] >= MISREADING_BAR, misreading
    for name in ("coherence", "complexity", "verbosity"):  # style: judged from the response alone
        mse = report["mse"][name]
        assert mse["model"] < 0.5 * mse["predict_training_mean"], (name, mse)
    for name in ("helpfulness", "correctness"):  # same-form errors leave part of these unexplained
        mse = report["mse"][name]
        assert mse["model"] < mse["predict_training_mean"], (name, mse)


def test_regression_rm_from_scratch_separates_right_from_misread_on_unseen_prompts(tmp_path: Path) -> None:
    run = tmp_path / "rm"
    subprocess.run([sys.executable, "-m", "engine", "train", "rm", "--config",
                    str(REPO / "examples/rm_regression_from_scratch.yaml"), f"run.output_dir={run}",
                    "logging.progress=false", "logging.tensorboard=false"], cwd=REPO, env=_env(), check=True,
                   stdout=subprocess.DEVNULL)
    report_file = tmp_path / "eval.json"
    subprocess.run([sys.executable, "tools/rm_synthetic_eval.py", "--checkpoint", str(run / "checkpoints" / "best"),
                    "--out", str(report_file)], cwd=REPO, env=_env(), check=True, stdout=subprocess.DEVNULL)
    check_report(json.loads(report_file.read_text()))
