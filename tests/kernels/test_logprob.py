"""token_logprobs (chunked torch and Triton-interpreted) against log_softmax + gather."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from keel_kernels._dispatch import Backend, resolve_backend
from keel_kernels.logprob import IGNORE_INDEX, token_logprobs, token_logprobs_reference

REPO_ROOT = Path(__file__).resolve().parents[2]
# Forward results are fp32 on both sides (inputs are upcast); gradients come back in
# the logits dtype, so bf16 gradients may differ by one bf16 rounding step.
GRAD_TOLERANCE: dict[torch.dtype, dict[str, Any]] = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.bfloat16: {"atol": 1e-2, "rtol": 2e-2},
}


def _inputs(
    shape: tuple[int, ...], vocab: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = (3.0 * torch.randn(*shape, vocab, generator=generator)).to(dtype)
    targets = torch.randint(0, vocab, shape, generator=generator)
    targets.view(-1)[1::4] = IGNORE_INDEX
    return logits, targets


def _forward_backward(
    fn: Callable[..., Any], logits: torch.Tensor, targets: torch.Tensor, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logprob, entropy, grad_logits) of a loss mixing both outputs with fixed weights."""
    leaf = logits.detach().requires_grad_()
    logprob, entropy = fn(leaf, targets, return_entropy=True, **kwargs)
    generator = torch.Generator().manual_seed(1)
    weight_lp = torch.randn(targets.shape, generator=generator)
    weight_ent = torch.randn(targets.shape, generator=generator)
    ((logprob * weight_lp).sum() + (entropy * weight_ent).sum()).backward()
    assert leaf.grad is not None
    return logprob.detach(), entropy.detach(), leaf.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_reference_ragged_and_masked(backend: Backend, dtype: torch.dtype) -> None:
    # 2 x 5 tokens, vocabulary 37 in chunks of 8: neither is a multiple of the block.
    logits, targets = _inputs((2, 5), 37, dtype)
    lp, ent, grad = _forward_backward(token_logprobs, logits, targets, chunk_size=8, backend=backend)
    ref_lp, ref_ent, ref_grad = _forward_backward(token_logprobs_reference, logits, targets)
    assert lp.dtype == ent.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, **GRAD_TOLERANCE[dtype])
    masked = targets == IGNORE_INDEX
    assert (lp[masked] == 0).all() and (ent[masked] == 0).all() and (grad[masked] == 0).all()


@pytest.mark.parametrize("chunk_size", [5, 64])
def test_logprob_only(backend: Backend, chunk_size: int) -> None:
    logits, targets = _inputs((7,), 29, torch.float32, seed=2)
    leaf = logits.clone().requires_grad_()
    lp = token_logprobs(leaf, targets, chunk_size=chunk_size, backend=backend)
    assert isinstance(lp, torch.Tensor) and lp.shape == (7,)
    lp.sum().backward()
    ref_leaf = logits.clone().requires_grad_()
    ref_lp = token_logprobs_reference(ref_leaf, targets)
    assert isinstance(ref_lp, torch.Tensor)
    ref_lp.sum().backward()
    torch.testing.assert_close(lp, ref_lp)
    torch.testing.assert_close(leaf.grad, ref_leaf.grad)


def test_entropy_only_gradient(backend: Backend) -> None:
    logits, targets = _inputs((6,), 19, torch.float32, seed=3)
    leaf = logits.clone().requires_grad_()
    token_logprobs(leaf, targets, chunk_size=4, return_entropy=True, backend=backend)[1].sum().backward()
    ref_leaf = logits.clone().requires_grad_()
    token_logprobs_reference(ref_leaf, targets, return_entropy=True)[1].sum().backward()
    torch.testing.assert_close(leaf.grad, ref_leaf.grad)


def test_strided_logits_and_loss_mask(backend: Backend) -> None:
    # Logits are a column slice of a wider buffer (row stride 40, width 33).
    wide, targets = _inputs((3, 2), 40, torch.float32, seed=4)
    targets = targets.clamp(0, 32)
    loss_mask = torch.tensor([[1, 0], [1, 1], [0, 1]])
    logits = wide[..., :33]
    got = token_logprobs(
        logits, targets, chunk_size=16, loss_mask=loss_mask, return_entropy=True, backend=backend
    )
    want = token_logprobs_reference(logits, targets, loss_mask=loss_mask, return_entropy=True)
    torch.testing.assert_close(got, want)
    assert (got[0][loss_mask == 0] == 0).all()


def test_large_logits_stay_finite(backend: Backend) -> None:
    logits, targets = _inputs((4,), 21, torch.float32, seed=5)
    logits = logits * 300.0 + 1000.0
    lp, ent, grad = _forward_backward(token_logprobs, logits, targets, chunk_size=8, backend=backend)
    ref_lp, ref_ent, ref_grad = _forward_backward(token_logprobs_reference, logits, targets)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(lp, ref_lp, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(ent, ref_ent, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-4)


def test_bad_inputs_are_reported() -> None:
    logits = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match="targets shape"):
        token_logprobs(logits, torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match="integer token ids"):
        token_logprobs(logits, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="backend="):
        token_logprobs(logits, torch.zeros(2, 3, dtype=torch.long), backend="cuda")  # type: ignore[arg-type]


def test_dispatch_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.zeros(1)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_backend(cpu, "auto") == "torch"
    assert resolve_backend(cpu, "torch") == "torch"
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend(cpu, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    expected = "triton" if importlib.util.find_spec("triton") else "torch"
    assert resolve_backend(cpu, "auto") == expected


def test_import_does_not_import_triton() -> None:
    code = "import sys, keel_kernels; assert 'triton' not in sys.modules, 'keel_kernels imported triton'"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT, env=env, timeout=120)
