"""CPU compatibility layer for megatron-core.

megatron-core's pipeline schedules, distributed data parallel wrapper, optimizers and
``dist_checkpointing`` call a handful of CUDA-only torch APIs even when every tensor
lives on the CPU (``torch.cuda.current_device()``, ``torch.cuda.synchronize()``,
CUDA events and streams, ``Tensor.cuda()``, ``pin_memory`` and ``torch.cuda.*Tensor``
type strings). On a machine without CUDA this module maps exactly those calls onto
their CPU equivalents so the same code paths run under the gloo backend.

Rules:

* :func:`activate` is a no-op when CUDA is available: GPU runs never see this layer.
* Everything it patches is listed in :data:`PATCHED` so the effect is auditable, and
  :func:`deactivate` restores the originals (used by tests).
* ``Tensor.type()`` answers with CUDA type strings (``torch.cuda.FloatTensor``) because
  megatron's gradient clipping asserts on them.
* Tensor factories (``torch.tensor``, ``torch.zeros``, ... see ``_FACTORIES``) are wrapped
  so an explicit ``device='cuda'`` becomes the CPU; other arguments pass through.
* Nothing here changes the maths: it redirects device placement and turns synchronisation
  into no-ops (CPU ops are synchronous). One kernel changes on AMD CPUs: the forward products
  of megatron's linear layers with large enough fp32 weights go through oneDNN instead of
  torch's default GEMM (:mod:`engine.parallel.cpu_linear`: the same products, summed in another
  order, faster there; on Intel CPUs torch's MKL GEMM is the faster one and stays;
  ``KEEL_CPU_LINEAR=onednn|torch`` chooses either everywhere). The language-model loss of a
  tensor-parallel group of one is computed block of rows by block of rows
  (:mod:`engine.parallel.cpu_cross_entropy`: the same function, rounded differently), and
  gradient clipping's norm and scale run on torch's ``_foreach`` ops
  (:mod:`engine.parallel.cpu_multi_tensor`, bitwise equal).
* Activation also keeps freed host memory in the process
  (:func:`engine.parallel.host_memory.retain_freed_memory`), so each training step reuses
  the previous step's buffers instead of faulting fresh pages in. :func:`deactivate` leaves
  that setting in place: glibc's dynamic thresholds cannot be restored.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from engine.parallel import cpu_cross_entropy, cpu_linear, cpu_multi_tensor
from engine.parallel.host_memory import retain_freed_memory

logger = logging.getLogger(__name__)

#: (owner, attribute name) of everything :func:`activate` replaced.
PATCHED: list[tuple[Any, str]] = []
_ORIGINALS: dict[tuple[int, str], Any] = {}
_active = False


class _CpuEvent:
    """Stands in for ``torch.cuda.Event``: records wall time, synchronises trivially."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False):
        self._time = 0.0

    def record(self, stream: Any = None) -> None:
        self._time = time.perf_counter()

    def synchronize(self) -> None:
        return None

    def wait(self, stream: Any = None) -> None:
        return None

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: _CpuEvent) -> float:
        return (end._time - self._time) * 1000.0


class _CpuStream:
    """Stands in for ``torch.cuda.Stream``: a single synchronous stream."""

    def __init__(self, *args: Any, **kwargs: Any):
        pass

    def wait_stream(self, other: Any) -> None:
        return None

    def wait_event(self, event: Any) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def record_event(self, event: Any = None) -> _CpuEvent:
        ev = event or _CpuEvent()
        ev.record()
        return ev

    def __enter__(self) -> _CpuStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


_STREAM = _CpuStream()


def _tensor_cuda(self: torch.Tensor, device: Any = None, non_blocking: bool = False, **kwargs: Any) -> torch.Tensor:
    return self


def _module_cuda(self: torch.nn.Module, device: Any = None) -> torch.nn.Module:
    return self


def _pin_memory(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return self


def _cpu_tensor_type(dtype: torch.dtype) -> Callable[..., torch.Tensor]:
    def make(*args: Any) -> torch.Tensor:
        """``torch.cuda.FloatTensor(data)`` copies data; ``torch.cuda.FloatTensor(n, m)`` allocates."""
        if args and not isinstance(args[0], int):
            return torch.tensor(args[0], dtype=dtype)
        return torch.empty(*args, dtype=dtype)

    return make


_ORIGINAL_TYPE = torch.Tensor.type


def _tensor_type(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs: Any) -> Any:
    """``Tensor.type()`` reports CUDA type strings (megatron asserts on them); casts map back to CPU."""
    if dtype is None and not kwargs:
        name = _ORIGINAL_TYPE(self)
        return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
    if isinstance(dtype, str):
        dtype = dtype.replace("torch.cuda.", "torch.", 1)
    return _ORIGINAL_TYPE(self, dtype, non_blocking, **kwargs)


def _is_cuda(device: Any) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


def _cpu_device_factory(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a tensor factory so ``device='cuda'`` (as megatron hard-codes in places) means CPU."""

    def factory(*args: Any, **kwargs: Any) -> Any:
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return fn(*args, **kwargs)

    factory.__wrapped__ = fn  # type: ignore[attr-defined]
    factory.__name__ = getattr(fn, "__name__", "factory")
    return factory


_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "randn", "rand", "zeros_like", "ones_like",
              "empty_like", "full_like")


def _patch(owner: Any, name: str, value: Any) -> None:
    key = (id(owner), name)
    if key not in _ORIGINALS:
        _ORIGINALS[key] = getattr(owner, name, None)
        PATCHED.append((owner, name))
    setattr(owner, name, value)


def _memory_stats_zero(*args: Any, **kwargs: Any) -> int:
    return 0


def activate() -> bool:
    """Install the CPU shims if CUDA is absent. Returns True when the layer is active."""
    global _active
    if torch.cuda.is_available():
        return False
    if _active:
        return True
    cuda = torch.cuda
    _patch(cuda, "current_device", lambda: "cpu")
    _patch(cuda, "device_count", lambda: 0)
    _patch(cuda, "set_device", lambda *a, **k: None)
    _patch(cuda, "synchronize", lambda *a, **k: None)
    _patch(cuda, "Event", _CpuEvent)
    _patch(cuda, "Stream", _CpuStream)
    _patch(cuda, "current_stream", lambda *a, **k: _STREAM)
    _patch(cuda, "default_stream", lambda *a, **k: _STREAM)
    _patch(cuda, "stream", lambda *a, **k: contextlib.nullcontext())
    _patch(cuda, "empty_cache", lambda: None)
    _patch(cuda, "memory_allocated", _memory_stats_zero)
    _patch(cuda, "max_memory_allocated", _memory_stats_zero)
    _patch(cuda, "memory_reserved", _memory_stats_zero)
    _patch(cuda, "max_memory_reserved", _memory_stats_zero)
    _patch(cuda, "reset_peak_memory_stats", lambda *a, **k: None)
    _patch(cuda, "get_rng_state", lambda *a, **k: torch.get_rng_state())
    _patch(cuda, "set_rng_state", lambda state, *a, **k: None)
    _patch(cuda, "manual_seed", lambda seed: None)
    _patch(cuda, "FloatTensor", _cpu_tensor_type(torch.float32))
    _patch(cuda, "HalfTensor", _cpu_tensor_type(torch.float16))
    _patch(cuda, "BFloat16Tensor", _cpu_tensor_type(torch.bfloat16))
    _patch(cuda, "LongTensor", _cpu_tensor_type(torch.int64))
    _patch(cuda, "IntTensor", _cpu_tensor_type(torch.int32))
    _patch(cuda, "ByteTensor", _cpu_tensor_type(torch.uint8))
    for name in _FACTORIES:
        _patch(torch, name, _cpu_device_factory(getattr(torch, name)))
    _patch(torch.Tensor, "cuda", _tensor_cuda)
    _patch(torch.Tensor, "type", _tensor_type)
    _patch(torch.nn.Module, "cuda", _module_cuda)
    _patch(torch.Tensor, "pin_memory", _pin_memory)
    for owner, name, value in cpu_multi_tensor.targets() + cpu_cross_entropy.targets():
        _patch(owner, name, value)
    retain_freed_memory()
    cpu_linear.install()
    _active = True
    logger.debug("CPU compatibility layer active: %d attributes patched", len(PATCHED))
    return True


def deactivate() -> None:
    """Restore every attribute :func:`activate` replaced."""
    global _active
    for owner, name in reversed(PATCHED):
        setattr(owner, name, _ORIGINALS[(id(owner), name)])
    PATCHED.clear()
    _ORIGINALS.clear()
    cpu_linear.uninstall()
    _active = False


def is_active() -> bool:
    return _active
