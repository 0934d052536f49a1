"""Backend choice shared by every kernel in :mod:`keel_kernels`.

Rules (the same for each kernel):

* ``backend="auto"``: CUDA tensors use Triton when it can be imported, otherwise the
  plain-torch path; CPU tensors use the plain-torch path, unless ``TRITON_INTERPRET=1``
  is set, in which case they run the Triton kernels in Triton's interpreter (tests).
* ``backend="torch"`` / ``backend="triton"`` force one path.

Triton is imported lazily: ``import keel_kernels`` never imports it.

``TRITON_INTERPRET`` is read by ``@triton.jit`` when a kernel is *defined*, i.e. when
the module holding it is imported, not when ``triton`` itself is imported nor when a
kernel is launched. :func:`load_triton_module` therefore records the mode a kernel
module was imported under and reloads it when ``TRITON_INTERPRET`` has changed since,
so one process can run interpreted kernels on CPU and compiled ones on CUDA.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType
from typing import Literal

import torch

Backend = Literal["auto", "torch", "triton"]
BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")


def triton_interpreter_requested() -> bool:
    """True when ``TRITON_INTERPRET=1`` asks for Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    """True when the ``triton`` package is installed (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def resolve_backend(tensor: torch.Tensor, backend: str) -> Literal["torch", "triton"]:
    """Pick the implementation for ``tensor`` according to the module rules."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}; use 'auto' unless testing.")
    if backend == "torch":
        return "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(
                "backend='triton' was requested but triton is not installed; pip install triton."
            )
        if tensor.device.type != "cuda" and not triton_interpreter_requested():
            raise RuntimeError(
                f"backend='triton' on a {tensor.device.type} tensor needs TRITON_INTERPRET=1 "
                "(Triton's interpreter); use backend='torch' or move the tensor to CUDA."
            )
        return "triton"
    if tensor.device.type == "cuda":
        return "triton" if triton_available() else "torch"
    if triton_interpreter_requested() and triton_available():
        return "triton"
    return "torch"


def load_triton_module(name: str) -> ModuleType:
    """Import the Triton kernel module ``name``, re-defining its kernels if needed.

    Each kernel module sets ``INTERPRETED`` to the interpreter mode it was imported
    under; when that differs from the current ``TRITON_INTERPRET`` the module is
    reloaded so ``@triton.jit`` runs again in the requested mode.
    """
    module = importlib.import_module(name)
    if getattr(module, "INTERPRETED", None) != triton_interpreter_requested():
        module = importlib.reload(module)
    return module
