"""The from-scratch reward-model recipe learns what the synthetic data's labels say (about 3 minutes).

Trains ``examples/rm_regression_from_scratch.yaml`` (tiny-llama, random init) exactly as a user
would, then judges it with ``tools/rm_synthetic_eval.py`` on held-out rows of another seed:
the right response of a same-prompt pair must score higher, and every attribute's MSE must
be well under that of predicting the training mean.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO


def test_regression_rm_from_scratch_separates_right_from_wrong(tmp_path: Path) -> None:
    run = tmp_path / "rm"
    subprocess.run([sys.executable, "-m", "engine", "train", "rm", "--config",
                    str(REPO / "examples/rm_regression_from_scratch.yaml"), f"run.output_dir={run}",
                    "logging.progress=false", "logging.tensorboard=false"], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL)
    report_file = tmp_path / "eval.json"
    subprocess.run([sys.executable, "tools/rm_synthetic_eval.py", "--checkpoint", str(run / "checkpoints" / "best"),
                    "--out", str(report_file)], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    report = json.loads(report_file.read_text())
    assert report["pairs_differing_in_correctness"] > 1000
    assert report["pairwise_accuracy"] >= 0.9, report["pairwise_accuracy_by_kind"]
    for name, mse in report["mse"].items():
        assert mse["model"] < 0.5 * mse["predict_training_mean"], (name, mse)
