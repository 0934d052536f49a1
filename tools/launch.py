"""Run ``keel`` the way a user does, for the tools: ``python -m engine`` as one process or under torchrun.

Multi-rank runs use ``torchrun --standalone``, so that two tools running side by side (two test
workers, say) each get their own rendezvous port instead of both binding the default one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def keel_command(args: list[str], nproc: int = 1) -> list[str]:
    """The command line of ``keel <args>`` on ``nproc`` gloo ranks (a plain process when 1)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] \
        if nproc > 1 else [sys.executable]
    return [*launcher, "-m", "engine", *args]


def keel(args: list[str], nproc: int = 1) -> None:
    """Run ``keel <args>`` from the repository; on failure exit with the command and its output's tail."""
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    proc = subprocess.run(keel_command(args, nproc), cwd=REPO, env=env, text=True, capture_output=True)
    if proc.returncode != 0:
        raise SystemExit(f"`keel {' '.join(args[:3])}` failed with exit code {proc.returncode}:\n"
                         f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
