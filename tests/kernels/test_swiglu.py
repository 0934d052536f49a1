"""swiglu (torch path and Triton-interpreted) against F.silu(gate) * up."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from keel_kernels._dispatch import Backend
from keel_kernels.swiglu import swiglu, swiglu_reference

TOLERANCE: dict[torch.dtype, dict[str, Any]] = {
    torch.float32: {"atol": 1e-6, "rtol": 1e-5},
    torch.bfloat16: {"atol": 1e-2, "rtol": 2e-2},
}


def _autograd_reference(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
    gate32 = gate.detach().float().requires_grad_()
    up32 = up.detach().float().requires_grad_()
    out = F.silu(gate32) * up32
    out.backward(grad.float())
    assert gate32.grad is not None and up32.grad is not None
    return out.to(gate.dtype), gate32.grad.to(gate.dtype), up32.grad.to(up.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_autograd(backend: Backend, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    # megatron layout: gate and up are the two halves of fc1's output (row stride 2 * 37).
    fc1_out = (2.0 * torch.randn(3, 4, 74, generator=generator)).to(dtype)
    grad = torch.randn(3, 4, 37, generator=generator).to(dtype)
    leaf = fc1_out.clone().requires_grad_()
    gate, up = leaf.chunk(2, dim=-1)
    out = swiglu(gate, up, backend=backend)
    out.backward(grad)
    assert leaf.grad is not None and out.dtype == dtype
    ref_gate, ref_up = fc1_out.chunk(2, dim=-1)
    ref_out, ref_grad_gate, ref_grad_up = _autograd_reference(ref_gate, ref_up, grad)
    torch.testing.assert_close(out, ref_out, **TOLERANCE[dtype])
    torch.testing.assert_close(leaf.grad, torch.cat([ref_grad_gate, ref_grad_up], dim=-1), **TOLERANCE[dtype])
    torch.testing.assert_close(out, swiglu_reference(ref_gate, ref_up), **TOLERANCE[dtype])


def test_rejects_mismatched_inputs() -> None:
    with pytest.raises(ValueError, match="one shape and dtype"):
        swiglu(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(TypeError, match="floating-point"):
        swiglu(torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
