"""Cross entropy over a whole (tensor-parallel size 1) vocabulary, in cache-sized row blocks, for CPUs.

megatron-core's unfused ``vocab_parallel_cross_entropy`` (what ``GPTModel`` computes its loss
with when neither Transformer Engine's nor its own CUDA fusion runs) walks the full
``[tokens, vocab]`` logits six times: the row maximum, its subtraction, the target gather, the
exponential, the row sum and the division into the softmax it keeps for backward, and backward
walks it twice more. On a CPU each walk over the logits is a trip to main memory: on the
49M-parameter benchmark model (2048 tokens x 8192 vocabulary, 64 MiB of fp32 logits) about
26 ms of forward and 6 ms of backward a step, against 7 ms + 9 ms for torch's fused
``cross_entropy``.

:func:`row_block_cross_entropy` computes the same loss, ``logsumexp(x) - x_target``, block of
rows by block of rows: torch's fused ``log_softmax`` of a block that fits in the CPU's cache,
written back over the logits (in place, as megatron's own function overwrites them with the
softmax), so the extra memory is one block and a few per-token numbers. Backward turns each
block of saved log-probabilities into ``grad_output * (softmax - onehot(target))`` while it is
in cache. Rounding differs from megatron's (another order of the same sums); the loss and the
gradient are the same functions.

:func:`make_cross_entropy` wraps megatron's function: the block path takes CPU logits of a
tensor-parallel group of one and no label smoothing; everything else (vocabulary split over
ranks, smoothing, CUDA tensors) goes to megatron's own code. The CPU layer
(:mod:`engine.parallel.cpu`) installs it through :func:`targets`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

#: rows of logits per block: 64 rows of a 8192-word vocabulary are 2 MiB of fp32.
BLOCK_BYTES = 2 << 20


def _row_blocks(matrix: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
    """``(rows, scratch)`` over 2-D ``matrix`` in blocks of :data:`BLOCK_BYTES`; ``scratch`` is a
    block-shaped buffer (shared by all blocks) for the block's result before it goes back in place."""
    rows, vocab = matrix.shape
    step = max(1, BLOCK_BYTES // (4 * vocab))
    buffer = torch.empty(min(step, rows), vocab, dtype=matrix.dtype)
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        yield slice(start, stop), buffer[: stop - start]


class _RowBlockCrossEntropy(torch.autograd.Function):
    """``loss[i] = logsumexp(logits[i]) - logits[i, target[i]]`` on 2-D fp32 ``[N, V]``."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for rows, scratch in _row_blocks(logits):
            logits[rows].copy_(torch.log_softmax(logits[rows], dim=-1, out=scratch))
        loss = logits.gather(1, target[:, None]).squeeze(1).neg()
        ctx.save_for_backward(logits, target)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        log_probs, target = ctx.saved_tensors
        grad_output = grad_output.to(log_probs.dtype)
        for rows, scratch in _row_blocks(log_probs):
            # softmax(log p) = p: torch's fused softmax kernel is faster than its element-wise exp
            probs = torch.softmax(log_probs[rows], dim=-1, out=scratch)
            torch.mul(probs, grad_output[rows, None], out=log_probs[rows])
        count, vocab = log_probs.shape
        log_probs.view(-1)[torch.arange(count) * vocab + target] -= grad_output
        return log_probs, None


def row_block_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-token cross entropy ``[...]`` of fp32 ``logits [..., V]`` against ``target [...]`` (whole vocabulary).

    The logits' storage is overwritten with log-probabilities (when they are fp32 and contiguous;
    otherwise a copy is), as megatron's ``vocab_parallel_cross_entropy`` overwrites them.
    """
    vocab = logits.shape[-1]
    flat = logits.float().reshape(-1, vocab)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    loss: torch.Tensor = _RowBlockCrossEntropy.apply(flat, target.reshape(-1).long())
    return loss.view(target.shape)


def _in_range(target: torch.Tensor, vocab: int) -> bool:
    """Every id a column of the logits (megatron's function scores any other id against logit 0)."""
    if target.numel() == 0:
        return True
    low, high = torch.aminmax(target)
    return int(low) >= 0 and int(high) < vocab


def make_cross_entropy(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """megatron's ``vocab_parallel_cross_entropy`` with the row-block path for CPU logits of one TP rank."""
    from megatron.core import parallel_state

    def cross_entropy(vocab_parallel_logits: torch.Tensor, target: torch.Tensor,
                      label_smoothing: float = 0.0) -> torch.Tensor:
        if (vocab_parallel_logits.is_cuda or label_smoothing
                or parallel_state.get_tensor_model_parallel_world_size() != 1
                or not _in_range(target, vocab_parallel_logits.shape[-1])):
            return original(vocab_parallel_logits, target, label_smoothing)
        return row_block_cross_entropy(vocab_parallel_logits, target)

    cross_entropy.__wrapped__ = original  # type: ignore[attr-defined]
    return cross_entropy


def targets() -> list[tuple[Any, str, Any]]:
    """``(module, attribute, replacement)``: where megatron's language models look the function up."""
    from megatron.core import tensor_parallel

    return [(tensor_parallel, "vocab_parallel_cross_entropy",
             make_cross_entropy(tensor_parallel.vocab_parallel_cross_entropy))]
