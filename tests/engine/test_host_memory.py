"""The CPU layer keeps freed host memory, so a step's big buffers are reused, not faulted in again.

Each case runs in a fresh interpreter: glibc's thresholds are process-wide and cannot be reset.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Allocate, touch and free a 64 MiB buffer (the size of a 256 x 8 x 8192 fp32 logits tensor) 16 times;
# report the minor page faults of the last four rounds. (Retained, a freed chunk is not always big
# enough for the next aligned request at once: the first few rounds still grow the heap, then it holds.)
SCRIPT = r"""
import json, resource, sys
import torch
from engine.parallel import cpu

activated = cpu.activate() if sys.argv[1] == "activate" else False
from engine.parallel import host_memory

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

counts = []
for _ in range(16):
    before = faults()
    buffer = torch.empty(16 * 2**20)
    buffer.fill_(1.0)
    del buffer
    counts.append(faults() - before)
print(json.dumps({"activated": activated, "retained": host_memory._applied, "faults": counts[-4:], "all": counts}))
"""


def _run(mode: str, **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    environ.update(env, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], env=environ, cwd=REPO, capture_output=True,
                         text=True, check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def glibc() -> None:
    from engine.parallel.host_memory import _glibc

    if _glibc() is None:
        pytest.skip("not glibc")


def test_without_the_layer_every_round_faults_the_buffer_in_again(glibc: None) -> None:
    result = _run("plain")
    pages = 64 * 2**20 // 4096
    assert not result["retained"]
    assert min(result["faults"]) >= pages * 0.9, result


def test_cpu_layer_reuses_freed_buffers(glibc: None) -> None:
    result = _run("activate")
    assert result["activated"] and result["retained"]
    assert max(result["faults"]) < 500, result


def test_user_malloc_settings_are_kept(glibc: None) -> None:
    result = _run("activate", MALLOC_TRIM_THRESHOLD_="131072")
    assert result["activated"] and not result["retained"]
    assert min(result["faults"]) >= 64 * 2**20 // 4096 * 0.9, result
