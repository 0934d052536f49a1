"""Move a trained model's optimizer state off the accelerator, and free its gradient buffers, between phases.

Online RL alternates training with generation. While the policy generates, nothing needs
its optimizer state or its gradients, only its weights. :class:`HostSwap` (used through
:meth:`engine.runner.ModelRunner.offload` / ``onload``) therefore

* copies the optimizer state to host memory (pinned under CUDA) and releases the device
  storage: every tensor in the torch optimizer's ``state`` (AdamW's ``exp_avg``,
  ``exp_avg_sq``, ``step``) of every optimizer inside megatron's (chained) optimizer, and the
  fp32 main params when the optimizer holds its own (``Float16OptimizerWithFloat16Params``'
  ``fp32_from_float16_groups``, the distributed optimizer's ``shard_fp32_from_float16_groups``);
* frees the DDP gradient buffers (``buffers`` and ``expert_parallel_buffers`` of megatron's
  ``DistributedDataParallel``) with megatron's own ``offload_grad_buffers``: the buffer's
  storage is resized to 0 bytes and, on onload, back to its size and zeroed
  (``restore_grad_buffers``), so every view of it (bucket grads, ``param.main_grad``) stays
  the same tensor object and is valid again afterwards.

Optimizer storages are released the same way (``untyped_storage().resize_(0)``, restored in
place): the optimizer's ``state`` keys, ``param.main_param`` handles and any views are the same
objects after onload, and nothing is re-registered with the optimizer. Offloading also drops
the optimizer params' ``.grad`` (``optimizer.zero_grad()``): they are views of the freed buffers
or stale fp32 copies, and every optimizer step sets them afresh from ``main_grad``.

Never moved: any storage a model parameter lives in (generation reads the weights). The FP32
optimizer's params and the distributed optimizer's fp32 shards are such views of the model
weights, so under fp32 training only the optimizer state moves. Small scalars megatron keeps
outside the torch optimizer (loss scale, found-inf flag) stay too.

On a machine without CUDA the same code runs with the CPU as the device: the move to the host
is a copy, after which the original storage is released, and the grad buffers are freed for
real, so the reported bytes are exact there as well. Bytes are this rank's.

Contract: :meth:`HostSwap.offload` while offloaded and :meth:`HostSwap.onload` while not
offloaded raise :class:`SwapError` (a swap out of order is a bug in the caller's loop, not
something to paper over); the runner refuses to train, step or checkpoint while offloaded.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

KINDS = ("optimizer_state_bytes", "main_param_bytes", "grad_buffer_bytes")


class SwapError(RuntimeError):
    """Offload/onload called out of order, or on a runner that has nothing to swap."""


@dataclass
class _Stashed:
    storage: torch.UntypedStorage  # the device storage, released while offloaded
    host: torch.Tensor  # its bytes (uint8) in host memory
    kind: str


def _device_type() -> str:
    """Where training tensors live: the accelerator, or the CPU on a machine without CUDA."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _bytes_of(storage: torch.UntypedStorage) -> torch.Tensor:
    """A flat uint8 tensor over all of ``storage``."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def torch_optimizers(optimizer: Any) -> Iterator[torch.optim.Optimizer]:
    """The torch optimizers inside megatron's optimizer (one per chained optimizer; stubs skipped)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is not None and not getattr(opt, "is_stub_optimizer", False):
            yield inner


def ddp_grad_buffers(chunks: Iterable[Any]) -> list[Any]:
    """Every ``_ParamAndGradBuffer`` of the DDP-wrapped ``chunks`` (dense and expert-parallel)."""
    return [buffer for chunk in chunks for buffer in [*chunk.buffers, *chunk.expert_parallel_buffers]]


def _optimizer_candidates(optimizer: Any) -> list[tuple[str, torch.Tensor]]:
    """(kind, tensor) for every state tensor and every param of the torch optimizers."""
    found: list[tuple[str, torch.Tensor]] = []
    for inner in torch_optimizers(optimizer):
        for per_param in inner.state.values():
            found += [("optimizer_state_bytes", v) for v in per_param.values() if isinstance(v, torch.Tensor)]
        found += [("main_param_bytes", p) for group in inner.param_groups for p in group["params"]]
    return found


class HostSwap:
    """Offloads the optimizer state and frees the grad buffers of one trained model; see the module doc."""

    def __init__(self, chunks: list[Any], optimizer: Any):
        if optimizer is None or not all(hasattr(chunk, "offload_grad_buffers") for chunk in chunks):
            raise SwapError("only a trained model (DDP-wrapped chunks and an optimizer) has state to offload")
        self.chunks = chunks
        self.optimizer = optimizer
        self._stash: list[_Stashed] = []
        self._freed_grads = 0  # bytes of grad buffers released, 0 when they are in place
        self.offloaded = False
        self._cycles = 0  # completed offload/onload cycles: the first is logged at INFO, later ones at DEBUG

    def _kept_storages(self) -> set[int]:
        """Storages that never move: the model's weights and the grad buffers (freed separately)."""
        kept = {p.untyped_storage().data_ptr() for chunk in self.chunks for p in chunk.parameters()}
        kept |= {b.grad_data.untyped_storage().data_ptr() for b in ddp_grad_buffers(self.chunks)}
        return kept

    def _optimizer_storages(self) -> list[tuple[str, torch.UntypedStorage]]:
        """(kind, storage) of each optimizer tensor on the device, once per storage, weights excluded."""
        seen = self._kept_storages()
        picked: list[tuple[str, torch.UntypedStorage]] = []
        for kind, tensor in _optimizer_candidates(self.optimizer):
            storage = tensor.untyped_storage()
            if tensor.device.type != _device_type() or storage.nbytes() == 0 or storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            picked.append((kind, storage))
        return picked

    def _offload_optimizer(self) -> None:
        pin = torch.cuda.is_available()
        for kind, storage in self._optimizer_storages():
            host = torch.empty(storage.nbytes(), dtype=torch.uint8, device="cpu", pin_memory=pin)
            host.copy_(_bytes_of(storage), non_blocking=pin)
            self._stash.append(_Stashed(storage, host, kind))
        _synchronize()  # the copies have landed before their source is released
        for item in self._stash:
            item.storage.resize_(0)

    def _free_grad_buffers(self) -> int:
        nbytes = sum(b.grad_data.untyped_storage().nbytes() for b in ddp_grad_buffers(self.chunks))
        with warnings.catch_warnings():  # megatron resizes through the deprecated TypedStorage
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
            for chunk in self.chunks:
                chunk.offload_grad_buffers(synchronize=torch.cuda.is_available(), empty_cache=False)
        return nbytes

    def offload(self, optimizer_state: bool = True, grad_buffers: bool = True) -> dict[str, int]:
        """Move the optimizer state to the host and free the grad buffers; returns bytes per kind."""
        if self.offloaded:
            raise SwapError("offload() called twice: the model is already offloaded; call onload() first")
        if not (optimizer_state or grad_buffers):
            raise ValueError("offload(optimizer_state=False, grad_buffers=False) would move nothing")
        began = time.perf_counter()
        self.optimizer.zero_grad()  # .grad of the optimizer params: views of the buffers or stale copies
        if optimizer_state:
            self._offload_optimizer()
        if grad_buffers:
            self._freed_grads = self._free_grad_buffers()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.offloaded = True
        stats = self._stats()
        logger.log(self._level(), "offloaded to host: optimizer state %d B, main params %d B; freed grad buffers %d B "
                   "(%.3f s)", *stats.values(), time.perf_counter() - began)
        return stats

    def onload(self) -> dict[str, int]:
        """Bring the optimizer state back and re-allocate the grad buffers (zeroed); returns bytes per kind."""
        if not self.offloaded:
            raise SwapError("onload() without offload(): the model's state is already in place")
        began = time.perf_counter()
        stats = self._stats()
        if self._freed_grads:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
                for chunk in self.chunks:
                    chunk.restore_grad_buffers(synchronize=False)
        pin = torch.cuda.is_available()
        for item in self._stash:
            item.storage.resize_(item.host.numel())
            _bytes_of(item.storage).copy_(item.host, non_blocking=pin)
        _synchronize()  # the state is in place before the host copies go
        self._stash, self._freed_grads, self.offloaded = [], 0, False
        logger.log(self._level(), "onloaded from host: optimizer state %d B, main params %d B; re-allocated grad "
                   "buffers %d B (%.3f s)%s", *stats.values(), time.perf_counter() - began,
                   "" if self._cycles else "; later cycles are logged at DEBUG (metrics.jsonl: swapped_bytes)")
        self._cycles += 1
        return stats

    def _level(self) -> int:
        """INFO for the first cycle, DEBUG after it: an online run swaps every iteration, 4 lines each with a critic."""
        return logging.DEBUG if self._cycles else logging.INFO

    def _stats(self) -> dict[str, int]:
        stats = dict.fromkeys(KINDS, 0)
        for item in self._stash:
            stats[item.kind] += item.host.numel()
        stats["grad_buffer_bytes"] = self._freed_grads
        return stats
