"""Compiled Triton kernels on CUDA against the references (skipped without a GPU)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from keel_kernels.logprob import IGNORE_INDEX, token_logprobs, token_logprobs_reference
from keel_kernels.swiglu import swiglu, swiglu_reference

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def compiled_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("vocab", [32000, 50257])
def test_logprob_cuda_matches_reference(dtype: torch.dtype, vocab: int) -> None:
    generator = torch.Generator(device="cuda").manual_seed(0)
    logits = (4.0 * torch.randn(3, 129, vocab, device="cuda", generator=generator)).to(dtype)
    targets = torch.randint(0, vocab, (3, 129), device="cuda", generator=generator)
    targets[:, ::5] = IGNORE_INDEX
    results = []
    runs: list[tuple[Any, dict[str, Any]]] = [
        (token_logprobs, {"backend": "triton"}),
        (token_logprobs_reference, {}),
    ]
    for fn, kwargs in runs:
        leaf = logits.clone().requires_grad_()
        lp, ent = fn(leaf, targets, return_entropy=True, **kwargs)
        (lp.sum() + (0.5 * ent).sum()).backward()
        results.append((lp, ent, leaf.grad))
    (lp, ent, grad), (ref_lp, ref_ent, ref_grad) = results
    torch.testing.assert_close(lp, ref_lp, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ent, ref_ent, atol=1e-4, rtol=1e-5)
    tol: dict[str, Any] = (
        {"atol": 1e-6, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 1e-3, "rtol": 2e-2}
    )
    torch.testing.assert_close(grad, ref_grad, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_swiglu_cuda_matches_reference(dtype: torch.dtype) -> None:
    fc1_out = torch.randn(4, 33, 2 * 2752, device="cuda").to(dtype).requires_grad_()
    gate, up = fc1_out.chunk(2, dim=-1)
    out = swiglu(gate, up, backend="triton")
    grad = torch.randn_like(out)
    out.backward(grad)
    fused_grad = fc1_out.grad
    fc1_out.grad = None
    ref = swiglu_reference(*fc1_out.chunk(2, dim=-1))
    ref.backward(grad)
    tol: dict[str, Any] = (
        {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 2e-2}
    )
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(fused_grad, fc1_out.grad, **tol)
