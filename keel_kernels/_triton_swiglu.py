"""Triton kernels for :mod:`keel_kernels.swiglu` (imported lazily; never by ``import keel_kernels``).

One program per (row, column block); inputs are ``[N, H]`` with unit column stride
and any row stride (e.g. the two halves of megatron's ``fc1`` output). Math in fp32:
``out = gate * sig * up``; ``d gate = g * up * sig * (1 + gate (1 - sig))``;
``d up = g * gate * sig`` with ``sig = sigmoid(gate)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from keel_kernels._dispatch import triton_interpreter_requested

#: Interpreter mode the kernels below were defined under (see ``load_triton_module``).
INTERPRETED = triton_interpreter_requested()
_BLOCK_H = 1024


@triton.jit
def _swiglu_forward_kernel(
    gate_ptr, gate_stride, up_ptr, up_stride, out_ptr, out_stride, n_cols, BLOCK_H: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < n_cols
    gate = tl.load(gate_ptr + row * gate_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row * up_stride + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * out_stride + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_kernel(
    grad_ptr,
    grad_stride,
    gate_ptr,
    gate_stride,
    up_ptr,
    up_stride,
    grad_gate_ptr,
    grad_up_ptr,
    out_stride,
    n_cols,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < n_cols
    grad = tl.load(grad_ptr + row * grad_stride + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + row * gate_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row * up_stride + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    grad_gate = grad * up * sig * (1.0 + gate * (1.0 - sig))
    grad_up = grad * gate * sig
    offs = row * out_stride + cols
    tl.store(grad_gate_ptr + offs, grad_gate.to(grad_gate_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_up_ptr + offs, grad_up.to(grad_up_ptr.dtype.element_ty), mask=mask)


def _grid(n_rows: int, n_cols: int) -> tuple[int, int, int]:
    block = min(_BLOCK_H, triton.next_power_of_2(max(n_cols, 1)))
    return (n_rows, triton.cdiv(n_cols, block), block)


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``[N, H]`` inputs with unit column stride."""
    n_rows, n_cols = gate.shape
    out = torch.empty((n_rows, n_cols), dtype=gate.dtype, device=gate.device)
    if out.numel() == 0:
        return out
    rows, blocks, block = _grid(n_rows, n_cols)
    _swiglu_forward_kernel[(rows, blocks)](
        gate, gate.stride(0), up, up.stride(0), out, out.stride(0), n_cols, BLOCK_H=block
    )
    return out


def swiglu_backward(
    grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d gate, d up)`` for ``[N, H]`` inputs with unit column stride."""
    n_rows, n_cols = gate.shape
    grad_gate = torch.empty((n_rows, n_cols), dtype=gate.dtype, device=gate.device)
    grad_up = torch.empty_like(grad_gate)
    if grad_gate.numel() == 0:
        return grad_gate, grad_up
    rows, blocks, block = _grid(n_rows, n_cols)
    _swiglu_backward_kernel[(rows, blocks)](
        grad,
        grad.stride(0),
        gate,
        gate.stride(0),
        up,
        up.stride(0),
        grad_gate,
        grad_up,
        grad_gate.stride(0),
        n_cols,
        BLOCK_H=block,
    )
    return grad_gate, grad_up
