"""Fused SwiGLU activation: ``out = silu(gate) * up``, forward and backward.

With ``sig = sigmoid(gate)`` and incoming gradient ``g``::

    out          = gate * sig * up
    d out/d gate = g * up * sig * (1 + gate * (1 - sig))
    d out/d up   = g * gate * sig

Computed in fp32 and rounded once to the input dtype. The fused function saves only
``gate`` and ``up`` for backward (autograd on ``F.silu(gate) * up`` also keeps
``silu(gate)``) and recomputes the sigmoid there.

megatron-core's GLU MLP produces ``fc1`` output ``[..., 2 * ffn]``; pass
``gate, up = fc1_out.chunk(2, dim=-1)`` (views; no copy is made when the last dim
is contiguous).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from keel_kernels._dispatch import Backend, load_triton_module, resolve_backend


def torch_swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Torch-path ``silu(gate) * up`` in fp32, returned in the input dtype."""
    gate32 = gate.float()
    return (gate32 * torch.sigmoid(gate32) * up.float()).to(gate.dtype)


def torch_swiglu_backward(
    grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch-path ``(d gate, d up)`` in fp32, returned in the input dtypes."""
    grad32, gate32, up32 = grad.float(), gate.float(), up.float()
    sig = torch.sigmoid(gate32)
    silu = gate32 * sig
    grad_gate = grad32 * up32 * sig * (1.0 + gate32 * (1.0 - sig))
    return grad_gate.to(gate.dtype), (grad32 * silu).to(up.dtype)


def _as_rows(tensor: torch.Tensor) -> torch.Tensor:
    """``[..., H]`` as ``[N, H]`` with a unit stride along ``H`` (a view when possible)."""
    rows = tensor.reshape(-1, tensor.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


class _SwiGLU(torch.autograd.Function):
    """Autograd wrapper saving only ``gate`` and ``up``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, gate: torch.Tensor, up: torch.Tensor, backend: str
    ) -> torch.Tensor:
        ctx.backend = backend
        ctx.save_for_backward(gate, up)
        if backend == "triton":
            out: torch.Tensor = load_triton_module("keel_kernels._triton_swiglu").swiglu_forward(
                _as_rows(gate), _as_rows(up)
            )
            return out.view(gate.shape)
        return torch_swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        gate, up = ctx.saved_tensors
        if ctx.backend == "triton":
            module = load_triton_module("keel_kernels._triton_swiglu")
            grad_gate, grad_up = module.swiglu_backward(_as_rows(grad), _as_rows(gate), _as_rows(up))
            return grad_gate.view(gate.shape), grad_up.view(up.shape), None
        grad_gate, grad_up = torch_swiglu_backward(grad, gate, up)
        return grad_gate, grad_up, None


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: Backend = "auto") -> torch.Tensor:
    """Fused ``silu(gate) * up`` = ``gate * sigmoid(gate) * up`` (see module docstring).

    Args:
        gate: ``[..., H]`` float tensor.
        up: same shape and dtype as ``gate``.
        backend: ``"auto"`` (see :mod:`keel_kernels._dispatch`), ``"torch"`` or ``"triton"``.

    Returns:
        ``[..., H]`` in the dtype of ``gate``.
    """
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(
            f"swiglu needs gate and up of one shape and dtype; got {tuple(gate.shape)} {gate.dtype} "
            f"and {tuple(up.shape)} {up.dtype}."
        )
    if not gate.is_floating_point():
        raise TypeError(f"swiglu needs floating-point inputs, got {gate.dtype}.")
    out: torch.Tensor = _SwiGLU.apply(gate, up, resolve_backend(gate, backend))
    return out


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Plain ``F.silu(gate) * up`` in fp32, cast back to the input dtype."""
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)
