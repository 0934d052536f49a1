"""Triton kernels for :mod:`keel_kernels.logprob` (imported lazily; never by ``import keel_kernels``).

Forward: one program per token walks its vocabulary slice in ``BLOCK_V`` columns with
an online maximum, producing ``m``, ``s = sum exp(x - m)``, ``w = sum exp(x - m)(x - m)``
and the target logit. When the running maximum moves from ``m`` to ``m'`` the sums are
rescaled: ``s <- e^(m - m') s``, ``w <- e^(m - m') (w + (m - m') s)``.

Backward: one program per (token, vocabulary block) writes
``g_lp (onehot - p) + g_H p (mean_logit - x)`` with ``p = exp(x - lse)``.

Launch wrappers have the same signatures as the torch functions they replace
(:func:`keel_kernels.logprob.torch_row_stats`, :func:`keel_kernels.logprob.torch_grad_logits`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from keel_kernels._dispatch import triton_interpreter_requested

#: Interpreter mode the kernels below were defined under (see ``load_triton_module``).
INTERPRETED = triton_interpreter_requested()
# Wider blocks spill registers; 16384 fp32 values per program is already 64 per thread at 8 warps.
_MAX_BLOCK_V = 16384


@triton.jit
def _row_stats_kernel(
    logits_ptr,
    row_stride,
    targets_ptr,
    max_ptr,
    sum_ptr,
    weighted_ptr,
    target_logit_ptr,
    n_vocab,
    BLOCK_V: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    cols = tl.arange(0, BLOCK_V)
    running_max = -1.0e30  # finite, so (m - m') * 0 stays 0
    sum_exp = 0.0
    weighted = 0.0
    for start in range(0, n_vocab, BLOCK_V):
        offs = start + cols
        x = tl.load(row_ptr + offs, mask=offs < n_vocab, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        offset = running_max - new_max
        scale = tl.exp(offset)
        shifted = tl.maximum(x - new_max, -1.0e4)  # exp(-1e4) == 0; keeps 0 * -inf out
        exp = tl.exp(shifted)
        if WITH_ENTROPY:
            weighted = scale * (weighted + offset * sum_exp) + tl.sum(exp * shifted, axis=0)
        sum_exp = sum_exp * scale + tl.sum(exp, axis=0)
        running_max = new_max
    target = tl.load(targets_ptr + row)
    picked = tl.load(row_ptr + tl.maximum(target, 0)).to(tl.float32)
    tl.store(max_ptr + row, running_max)
    tl.store(sum_ptr + row, sum_exp)
    if WITH_ENTROPY:
        tl.store(weighted_ptr + row, weighted)
    tl.store(target_logit_ptr + row, tl.where(target >= 0, picked, 0.0))


@triton.jit
def _grad_logits_kernel(
    logits_ptr,
    logits_row_stride,
    grad_ptr,
    grad_row_stride,
    targets_ptr,
    lse_ptr,
    mean_logit_ptr,
    grad_logprob_ptr,
    grad_entropy_ptr,
    n_vocab,
    BLOCK_V: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = offs < n_vocab
    x = tl.load(logits_ptr + row * logits_row_stride + offs, mask=mask, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + row)
    grad_logprob = tl.load(grad_logprob_ptr + row)
    target = tl.load(targets_ptr + row)
    shifted = tl.maximum(x - lse, -1.0e4)  # exp(-1e4) == 0; keeps 0 * -inf out
    prob = tl.exp(shifted)
    grad = tl.where(offs == target, grad_logprob, 0.0) - grad_logprob * prob
    if WITH_ENTROPY:
        grad_entropy = tl.load(grad_entropy_ptr + row)
        mean_logit = tl.load(mean_logit_ptr + row)
        grad += grad_entropy * prob * ((mean_logit - lse) - shifted)
    out_ptr = grad_ptr + row * grad_row_stride + offs
    tl.store(out_ptr, grad.to(grad_ptr.dtype.element_ty), mask=mask)


def _block_and_warps(chunk_size: int, n_vocab: int) -> tuple[int, int]:
    """``BLOCK_V``: ``chunk_size`` rounded up to a power of two, at most 16384 or the vocabulary."""
    block = min(triton.next_power_of_2(chunk_size), triton.next_power_of_2(max(n_vocab, 1)), _MAX_BLOCK_V)
    warps = 8 if block >= 2048 else 4
    return block, warps


def row_stats(
    logits: torch.Tensor, local_targets: torch.Tensor, chunk_size: int, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token ``(row_max, sum_exp, weighted, target_logit)`` of ``logits [N, V]``."""
    n_rows, n_vocab = logits.shape
    stats = torch.zeros(4, n_rows, dtype=torch.float32, device=logits.device)
    if n_rows == 0:
        return stats[0], stats[1], stats[2], stats[3]
    block, warps = _block_and_warps(chunk_size, n_vocab)
    _row_stats_kernel[(n_rows,)](
        logits,
        logits.stride(0),
        local_targets,
        stats[0],
        stats[1],
        stats[2],
        stats[3],
        n_vocab,
        BLOCK_V=block,
        WITH_ENTROPY=with_entropy,
        num_warps=warps,
    )
    return stats[0], stats[1], stats[2], stats[3]


def grad_logits(
    logits: torch.Tensor,
    local_targets: torch.Tensor,
    lse: torch.Tensor,
    mean_logit: torch.Tensor | None,
    grad_logprob: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    chunk_size: int,
) -> torch.Tensor:
    """``d loss / d logits`` for ``logits [N, V]``, in the logits dtype."""
    n_rows, n_vocab = logits.shape
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    if n_rows == 0:
        return grad
    block, warps = _block_and_warps(chunk_size, n_vocab)
    with_entropy = grad_entropy is not None and mean_logit is not None
    _grad_logits_kernel[(n_rows, triton.cdiv(n_vocab, block))](
        logits,
        logits.stride(0),
        grad,
        grad.stride(0),
        local_targets,
        lse.contiguous(),
        mean_logit.contiguous() if mean_logit is not None else lse,
        grad_logprob.contiguous(),
        grad_entropy.contiguous() if grad_entropy is not None else grad_logprob,
        n_vocab,
        BLOCK_V=block,
        WITH_ENTROPY=with_entropy,
        num_warps=warps,
    )
    return grad
