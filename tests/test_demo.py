"""``make demo``'s job (tools/demo.py) runs for real, cut to a few steps per stage: SFT, then a
reward model from the SFT trunk, then DPO and GRPO (trained at TP2, generated at TP1) from the SFT
checkpoint, one result line per stage."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO, _env


def test_demo_runs_sft_rm_dpo_grpo(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "tools/demo.py", "--quick", "--output", str(tmp_path), "--nproc", "2"],
                          cwd=REPO, env=_env(), text=True, capture_output=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    assert [line[:5] for line in lines] == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"], proc.stdout
    assert "held-out pairwise accuracy" in lines[1]
    before, after = map(float, re.search(r"accuracy ([\d.]+) -> ([\d.]+)", lines[2]).groups())  # type: ignore[union-attr]
    assert before == 0.5  # the policy starts as its reference: every pair ties
    assert 0.0 <= after <= 1.0
    assert "trained at TP2, generated at TP1 x 2 replicas" in lines[3]
    before, after = map(float, re.search(r"correctness ([\d.]+) -> ([\d.]+)", lines[3]).groups())  # type: ignore[union-attr]
    assert 0.0 <= before <= 1.0 and 0.0 <= after <= 1.0
    for stage in ("sft", "rm", "dpo", "grpo"):
        assert (tmp_path / stage / "checkpoints" / "latest").is_file()
    assert (tmp_path / "grpo" / "curves.png").is_file()
