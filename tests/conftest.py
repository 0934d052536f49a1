"""Fixtures shared by every test package."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# Triton decides between compiled and interpreted kernels when @triton.jit runs, and its own
# tl.* helpers are decorated when triton is first imported (megatron-core imports it). On a
# machine without CUDA the kernel tests need the interpreter, so it must be chosen before any
# import of triton in this process.
if not os.path.exists("/dev/nvidia0") and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def write_jsonl(tmp_path: Path) -> Callable[..., str]:
    """``write_jsonl(lines, name)``: lines are dicts (dumped as JSON) or raw strings (written as is)."""

    def write(lines: list[Any], name: str = "data.jsonl") -> str:
        path = tmp_path / name
        path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
        return str(path)

    return write


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``make test`` runs two pytest-xdist workers (``-n 2 --dist loadgroup``): the learning tests
    (``@pytest.mark.learning``, single-threaded recipes of minutes each) form one work unit that goes
    first, so one worker spends the run on them while the other takes the remaining modules.
    Each learning run is deterministic in its own process, so sharing the machine changes its
    time, not its numbers."""
    learning = [item for item in items if item.get_closest_marker("learning")]
    if not learning or not hasattr(config, "workerinput"):
        return
    for item in learning:
        item.add_marker(pytest.mark.xdist_group("learning"))
    items[:] = learning + [item for item in items if not item.get_closest_marker("learning")]
