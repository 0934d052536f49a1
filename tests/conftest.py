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
    """Order for ``make test``'s two pytest-xdist workers (``-n 2 --dist loadscope``).

    A module is one unit of work, so its module-scoped launches run once. The modules of
    learning tests (``@pytest.mark.learning``: single-threaded recipes of minutes each) go
    first, so the workers start on the longest work and fill the end with short modules. A
    learning run is deterministic in its own process: sharing the machine changes its time,
    not its numbers. Learning tests are ordered by the minutes their marker gives, longest
    first (``@pytest.mark.learning(minutes=30)``), so that the other worker takes the shorter
    ones meanwhile. ``make test`` leaves out the recipes at full length
    (``@pytest.mark.full_recipe``); ``make test-learning`` runs them the same way.
    """
    _skip_gpu_tests_without_cuda(items)
    if hasattr(config, "workerinput"):
        items.sort(key=_learning_minutes, reverse=True)  # stable: the other tests keep their order


def _learning_minutes(item: pytest.Item) -> float:
    """How long a learning test takes, from its ``learning`` marker (0 for the other tests)."""
    marker = item.get_closest_marker("learning")
    return 0.0 if marker is None else float(marker.kwargs.get("minutes", 1))


def _skip_gpu_tests_without_cuda(items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` are skipped at collection without CUDA, before any of their fixtures (a
    module-scoped launch on the GPU, say) is set up, whichever folder pytest was pointed at."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
