"""megatron-core's import-time ``torch.compile`` calls, skipped on machines without CUDA.

megatron-core wraps its fusion kernels (bias-GeLU, bias-SwiGLU, bias-dropout-add, squared
ReLU, ...) in ``torch.compile`` while its modules are imported (``megatron.core.jit.jit_fuser``).
On a machine without CUDA that costs twice:

* the first wrapper imports torch's dynamo and inductor stack: about 2 s of the 6 s that a
  one-step ``keel train sft`` takes on CPU, paid again by every rank of every launch;
* a wrapped function that does run there is compiled by inductor into C++ on its first call,
  which needs a C++ compiler and takes seconds. Keel's local spec leaves the bias fusions off
  without a GPU (``engine/models/builder.py``), but Nemotron's squared-ReLU activation is
  such a function.

An uncompiled function computes the same values eagerly, so there the wrappers buy nothing.

:func:`install` (run by ``import engine``) puts a finder in front of ``sys.meta_path``. While a
``megatron`` module executes on a machine without CUDA, ``torch.compile`` returns what it was
given. Nothing else changes: the module is found and loaded by the finder that would have
loaded it, and ``torch.compile`` is itself again as soon as the import returns.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import Any, Optional

_depth = 0


def _unchanged(model: Optional[Callable[..., Any]] = None, **_: Any) -> Any:
    """``torch.compile`` stand-in: ``f`` for ``compile(f)`` and an identity decorator for ``compile(**options)``."""
    return model if model is not None else (lambda fn: fn)


@contextlib.contextmanager
def eager_compile() -> Iterator[None]:
    """``torch.compile`` returns its argument inside the block (re-entrant, for nested imports)."""
    global _depth
    import torch

    original = torch.compile
    _depth += 1
    if _depth == 1:
        torch.compile = _unchanged  # type: ignore[assignment]
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            torch.compile = original


@functools.lru_cache(maxsize=1)
def _without_cuda() -> bool:
    import torch

    return not torch.cuda.is_available()


class _EagerLoader(importlib.abc.Loader):
    """The original loader, executing its module under :func:`eager_compile`."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Optional[ModuleType]:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        with eager_compile():
            self.inner.exec_module(module)

    def __getattr__(self, name: str) -> Any:  # get_data, is_package, get_resource_reader, ...
        return getattr(self.inner, name)


class _MegatronFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Optional[Sequence[str]],
                  target: Optional[ModuleType] = None) -> Optional[importlib.machinery.ModuleSpec]:
        if name.partition(".")[0] != "megatron" or not _without_cuda():
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _EagerLoader(spec.loader)
                return spec
        return None


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once; a no-op when megatron is already imported)."""
    if "megatron.core" in sys.modules or any(isinstance(f, _MegatronFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _MegatronFinder())
