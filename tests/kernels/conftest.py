"""Shared fixtures for kernel tests.

Triton's interpreter is chosen by ``TRITON_INTERPRET=1`` at the time a kernel is
*defined* (``@triton.jit`` runs when its module is imported).
:func:`keel_kernels._dispatch.load_triton_module` re-imports kernel modules when the
variable changes, so setting it with ``monkeypatch`` per test is enough.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from typing import cast

import pytest

from keel_kernels._dispatch import Backend


@pytest.fixture
def triton_interpreter(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run Triton kernels on CPU tensors through Triton's interpreter."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


@pytest.fixture(params=["torch", "triton"])
def backend(request: pytest.FixtureRequest) -> Backend:
    """Each CPU-testable implementation: the chunked torch path and Triton interpreted."""
    if request.param == "triton":
        request.getfixturevalue("triton_interpreter")
    return cast(Backend, request.param)
