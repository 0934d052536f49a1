"""megatron's tensor-parallel linear layers on CPU through oneDNN's matrix products.

torch's default CPU GEMM (MKL in the x86 builds) packs the weight matrix into its own blocked
layout inside every call. Measured on a 2-core AMD EPYC for the shapes of a training step
(2048 tokens, fp32), oneDNN's inner product, given the same plain tensors, is faster for the
forward product ``X Wᵀ`` of large enough matrices (fc1 512→3072: 56.7 → 32.2 ms; a 512→8192
output layer: 162.6 → 113.7 ms). On a 2-core Intel Xeon, where MKL runs its own code paths,
torch's GEMM is the faster one for the same shapes (fc1 14.5 against 15.5 ms; 512→8192 equal;
SmolLM2's 576→49152 output layer at 4096 tokens 566 against 707 ms). So by default
(``KEEL_CPU_LINEAR=auto``) the layer is installed on AMD CPUs only (:func:`preferred`);
``onednn`` installs it anywhere, ``torch`` nowhere.

:func:`install` replaces the two functions megatron's ``ColumnParallelLinear`` and
``RowParallelLinear`` call per forward (``linear_with_grad_accumulation_and_async_allreduce``
and ``linear_with_frozen_weight``, looked up at call time) with versions that route the common
CPU case to :class:`OneDnnLinear`: fp32 tensors on the CPU, no sequence parallelism, no deferred
embedding weight gradient, no gradient-accumulation fusion, and a product large enough to gain
(:func:`worth_it`; for small matrices a oneDNN call costs more than torch's). Every other call
goes to megatron's own function unchanged. Only the forward product changes kernel: the two
backward products stay on torch's GEMM, as in megatron (oneDNN needs ``Wᵀ`` laid out again for
``dY W``, and measured, that gains for some shapes and loses for others). The maths is
megatron's; only the kernel of the forward product, and so its order of summation, changes
(a few ulps). GPU runs never install it (the CPU layer is off under CUDA), and
``KEEL_CPU_LINEAR=torch`` keeps torch's GEMM on CPU.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any, Optional

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

ENV = "KEEL_CPU_LINEAR"
_ORIGINALS: dict[str, Callable[..., Any]] = {}
_group_if_none: Callable[[Any], Any] = lambda group: group  # megatron's, set by install()


def available() -> bool:
    """True when this torch build has oneDNN's linear (``torch.ops.mkldnn._linear_pointwise``)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._linear_pointwise(torch.zeros(1, 2), torch.zeros(3, 2), None, "none", [], "")
    except (RuntimeError, AttributeError):
        return False
    return True


def cpu_vendor() -> str:
    """The CPU's vendor string from ``/proc/cpuinfo`` (``AuthenticAMD``, ``GenuineIntel``), or "" where unknown."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def preferred() -> bool:
    """Whether this process should route the products through oneDNN: ``KEEL_CPU_LINEAR`` (``auto``, the
    default: on AMD CPUs, where it was measured faster than MKL's GEMM; ``onednn``: always; ``torch``: never)."""
    choice = os.environ.get(ENV, "auto")
    if choice not in ("auto", "onednn", "torch"):
        raise ValueError(f"{ENV}={choice!r}: expected auto, onednn or torch")
    if choice == "auto":
        return cpu_vendor() == "AuthenticAMD"
    return choice == "onednn"


def onednn_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` for ``x [..., in]`` and ``weight [out, in]`` through oneDNN; not a view of anything."""
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), weight, None, "none", [], "")
    return torch.ops.aten._unsafe_view(out, (*x.shape[:-1], weight.shape[0]))


class OneDnnLinear(torch.autograd.Function):
    """``Y = X Wᵀ (+ b)`` through oneDNN, with megatron's backward on torch's GEMM: ``dX = dY W``
    (all-reduced over the TP group when asked), ``dW = dYᵀ X``, ``db = Σ dY``. ``weight_grad=False``
    is the frozen weight's case."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                allreduce_dgrad: bool, tp_group: Any, weight_grad: bool) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.use_bias, ctx.allreduce_dgrad, ctx.tp_group, ctx.weight_grad = bias is not None, allreduce_dgrad, \
            tp_group, weight_grad
        out = onednn_linear(x, weight)
        return out + bias if bias is not None else out

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        x, weight = ctx.saved_tensors
        grad_input = grad_output.matmul(weight)
        handle = dist.all_reduce(grad_input, group=ctx.tp_group, async_op=True) if ctx.allreduce_dgrad else None
        grad_weight = grad_bias = None
        if ctx.weight_grad:
            rows = grad_output.reshape(-1, grad_output.shape[-1])
            grad_weight = rows.t().matmul(x.reshape(-1, x.shape[-1]))
            grad_bias = rows.sum(dim=0) if ctx.use_bias else None
        if handle is not None:
            handle.wait()
        return grad_input, grad_weight, grad_bias, None, None, None


def worth_it(rows: int, weight_elements: int) -> bool:
    """Whether oneDNN beats torch's GEMM for ``rows`` input rows: measured, large weights always do, medium
    ones from 128 rows on, small ones never (a oneDNN call costs ~20 µs more: 16 rows × 512×128 take 25 µs
    with torch's GEMM and 43 µs with oneDNN; 2048 rows × 3072×512, 56.7 and 32.2 ms)."""
    return weight_elements >= 1 << 18 or (weight_elements >= 1 << 16 and rows >= 128)


def _eligible(x: torch.Tensor, weight: torch.Tensor, sequence_parallel: bool, fusion: bool = False,
              buffer: Any = None) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not sequence_parallel and not fusion and buffer is None
            and worth_it(x.numel() // max(x.shape[-1], 1), weight.numel()))


def _tp_group(kwargs: dict[str, Any]) -> Any:
    """The call's TP group, or megatron's global one where it passes none (as megatron's functions do)."""
    return _group_if_none(kwargs.get("tp_group"))


def _trainable(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
               gradient_accumulation_fusion: bool, allreduce_dgrad: bool, sequence_parallel: bool,
               grad_output_buffer: Any = None, *args: Any, **kwargs: Any) -> torch.Tensor:
    if not _eligible(input, weight, sequence_parallel, gradient_accumulation_fusion, grad_output_buffer):
        return _ORIGINALS["linear_with_grad_accumulation_and_async_allreduce"](
            input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel,
            grad_output_buffer, *args, **kwargs)
    return OneDnnLinear.apply(input, weight, bias, allreduce_dgrad, _tp_group(kwargs), True)


def _frozen(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
            gradient_accumulation_fusion: bool, allreduce_dgrad: bool, sequence_parallel: bool,
            *args: Any, **kwargs: Any) -> torch.Tensor:
    if not _eligible(input, weight, sequence_parallel):
        return _ORIGINALS["linear_with_frozen_weight"](input, weight, bias, gradient_accumulation_fusion,
                                                       allreduce_dgrad, sequence_parallel, *args, **kwargs)
    return OneDnnLinear.apply(input, weight, bias, allreduce_dgrad, _tp_group(kwargs), False)


def install() -> bool:
    """Route megatron's CPU linear products through oneDNN (see the module docstring). True when installed."""
    global _group_if_none
    if _ORIGINALS:
        return True
    if not preferred() or not available():
        logger.debug("megatron's linear layers keep torch's GEMM on CPU (%s=%s, vendor %r)",
                     ENV, os.environ.get(ENV, "auto"), cpu_vendor())
        return False
    from megatron.core.tensor_parallel import layers
    from megatron.core.utils import get_tensor_model_parallel_group_if_none

    _group_if_none = get_tensor_model_parallel_group_if_none
    for name, replacement in (("linear_with_grad_accumulation_and_async_allreduce", _trainable),
                              ("linear_with_frozen_weight", _frozen)):
        _ORIGINALS[name] = getattr(layers, name)
        if hasattr(_ORIGINALS[name], "warned"):  # megatron's function reads its flag through the module's name
            replacement.warned = _ORIGINALS[name].warned  # type: ignore[attr-defined]
        setattr(layers, name, replacement)
    return True


def uninstall() -> None:
    """Give megatron its own functions back."""
    if not _ORIGINALS:
        return
    from megatron.core.tensor_parallel import layers

    for name, original in _ORIGINALS.items():
        setattr(layers, name, original)
    _ORIGINALS.clear()
