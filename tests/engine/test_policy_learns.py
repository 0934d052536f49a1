"""Policies learn what they are taught, judged on prompts never seen in training.

* DPO (``tools/dpo_learns.py``, its defaults): from a tiny SFT model, the implicit reward
  prefers the right answer on unseen prompts (eval split) in >= 90% of controlled pairs whose
  wrong answer is a misreading (0.5 before DPO: the policy is its reference). Same-form wrong
  answers have no bar; the number is recorded in tools/bench/results/dpo_learns.json.

SteerLM's own check (verbosity 4 vs 0 on unseen prompts) lives in test_iterative_learns.py, where it
reuses SteerLM 2.0's SFT model.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, _env

# handed out first under xdist, longest first, with the minutes the AMD EPYC CI machines take (tests/conftest.py);
# make test-learning runs them, make test leaves them out
pytestmark = [pytest.mark.learning(minutes=8), pytest.mark.full_recipe]


def _run(tool: str, out: Path) -> dict:
    proc = subprocess.run([sys.executable, tool, "--out", str(out)], cwd=REPO, env=_env(), text=True,
                          capture_output=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads((out / "report.json").read_text())


def test_dpo_prefers_right_answers_on_unseen_prompts(tmp_path: Path) -> None:
    report = _run("tools/dpo_learns.py", tmp_path)["unseen_prompts_after_dpo"]
    assert report["misreading"]["pairs"] >= 300
    assert report["misreading"]["accuracy"] >= 0.90, report
    # measured 0.70 (AMD) and 0.65 (Intel): above chance, no bar beyond that
    assert report["same_form"]["accuracy"] > 0.5, report
