"""megatron's fallback multi-tensor kernels, on torch's ``_foreach`` ops.

Without apex or Transformer Engine, megatron-core's gradient clipping falls back to
``megatron.core.utils.local_multi_tensor_l2_norm`` and ``local_multi_tensor_scale``. The
scale computes ``dst.copy_(src * scale)`` per tensor, which for clipping (``src is dst``)
allocates a temporary for every gradient and passes over the memory three times instead of
twice: on a 49M-parameter model, 19 ms a step against 7 ms for ``torch._foreach_mul_``. The
norm loops over the tensors in Python.

:func:`targets` lists megatron's module attributes that hold those fallbacks, each with its
replacement here; the CPU layer (:mod:`engine.parallel.cpu`) patches them and restores them on
deactivation. The results are bitwise equal: the same per-tensor norms (torch's CPU
``_foreach_norm`` runs ``linalg.vector_norm`` per tensor) and the same fp32 products by the
same scalar, written in place. A copy between different tensors (``_multi_tensor_copy_this_to_that``)
goes to megatron's own loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def foreach_l2_norm(chunk_size: int, noop_flag: Any, tensor_lists: list[list[torch.Tensor]],
                    per_tensor: bool, *args: Any) -> tuple[torch.Tensor, None]:
    """Drop-in for megatron's ``local_multi_tensor_l2_norm``: the 2-norm of all tensors, shape ``[1]``, fp32."""
    norms = [n.float() for tensors in tensor_lists if tensors for n in torch._foreach_norm(tensors)]
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    return total.reshape(1), None


def make_scale(original: Callable[..., None]) -> Callable[..., None]:
    """Drop-in for megatron's ``local_multi_tensor_scale``: in place through ``_foreach_mul_`` when
    every destination is its source (gradient clipping), else ``original``."""

    def foreach_scale(chunk_size: int, noop_flag: Any, tensor_lists: list[list[torch.Tensor]], scale: float) -> None:
        sources, destinations = tensor_lists[0], tensor_lists[1]
        if len(sources) == len(destinations) and all(s is d for s, d in zip(sources, destinations, strict=True)):
            torch._foreach_mul_(destinations, scale)
        else:
            original(chunk_size, noop_flag, tensor_lists, scale)

    return foreach_scale


def targets() -> list[tuple[Any, str, Any]]:
    """``(module, attribute, replacement)`` for each megatron attribute that holds a local fallback."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    found: list[tuple[Any, str, Any]] = []
    scale = make_scale(utils.local_multi_tensor_scale)
    for module in (clip_grads, optimizer):
        if getattr(module, "multi_tensor_scale_impl", None) is utils.local_multi_tensor_scale:
            found.append((module, "multi_tensor_scale_impl", scale))
        if getattr(module, "l2_norm_impl", None) is utils.local_multi_tensor_l2_norm:
            found.append((module, "l2_norm_impl", foreach_l2_norm))
    return found
