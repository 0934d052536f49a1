"""Fused log-probability and entropy of target tokens, chunked over the vocabulary.

For one token with logits ``x`` (length ``V``) and target ``t``::

    lse      = log sum_j exp(x_j)
    logprob  = x_t - lse
    entropy  = -sum_j p_j log p_j = lse - sum_j p_j x_j,      p_j = exp(x_j - lse)

    d logprob / d x_j = onehot(t)_j - p_j
    d entropy / d x_j = p_j * (sum_k p_k x_k - x_j)

Both passes walk the vocabulary in chunks of ``chunk_size`` columns, so the full
fp32 softmax (``tokens x V`` floats) is never materialised; only per-token
statistics are kept between forward and backward. The backward pass recomputes
``p_j`` chunk by chunk from the saved logits and ``lse``.

Vocabulary (tensor) parallelism: rank ``r`` holds columns
``[vocab_start, vocab_start + V_local)``. Each rank computes, per token, its local
maximum ``m_r``, ``s_r = sum exp(x - m_r)``, ``w_r = sum exp(x - m_r) (x - m_r)``
and the target logit when the target falls in its slice (0 otherwise). One
all-reduce(MAX) gives the global maximum ``M``; the statistics are rescaled to it
(``s <- e^(m_r - M) s_r``, ``w <- e^(m_r - M) (w_r + (m_r - M) s_r)``) and one
all-reduce(SUM) combines ``[s, w, x_t]``. Then ``lse = M + log S`` and
``entropy = log S - W / S``. The backward pass is local to each rank.

Masked tokens (``targets == ignore_index`` or ``loss_mask == 0``) get logprob 0,
entropy 0 and a zero gradient row. Results are always fp32.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from keel_kernels._dispatch import Backend, load_triton_module, resolve_backend

IGNORE_INDEX = -100
DEFAULT_CHUNK_SIZE = 4096
# exp(-1e4) == 0 in fp32; clamping shifted logits here keeps 0 * -inf out of the sums.
_SHIFT_FLOOR = -1.0e4
# Finite stand-in for an empty maximum, so (m - M) * 0 stays 0 instead of NaN.
_MAX_FLOOR = -1.0e30


class RowStats(NamedTuple):
    """Per-token statistics of one vocabulary slice, all fp32 of shape ``[N]``.

    ``row_max`` m, ``sum_exp`` sum exp(x - m), ``weighted`` sum exp(x - m) (x - m)
    (zeros when entropy is not needed) and ``target_logit`` (0 when the target is
    not in the slice).
    """

    row_max: torch.Tensor
    sum_exp: torch.Tensor
    weighted: torch.Tensor
    target_logit: torch.Tensor


# --------------------------------------------------------------------------- torch path


def torch_row_stats(
    logits: torch.Tensor, local_targets: torch.Tensor, chunk_size: int, with_entropy: bool
) -> RowStats:
    """Chunked-torch :class:`RowStats` of ``logits [N, V]`` (targets ``-1`` = not here)."""
    n_rows, n_vocab = logits.shape
    row_max = logits.amax(dim=-1).float().clamp_min(_MAX_FLOOR)
    sum_exp = torch.zeros(n_rows, dtype=torch.float32, device=logits.device)
    weighted = torch.zeros_like(sum_exp)
    for start in range(0, n_vocab, chunk_size):
        # bf16/fp16 chunk minus an fp32 column promotes to a fresh fp32 tensor: safe in place.
        shifted = logits[:, start : start + chunk_size] - row_max[:, None]
        if with_entropy:
            shifted.clamp_min_(_SHIFT_FLOOR)
            exp = shifted.exp()
            sum_exp += exp.sum(dim=-1)
            weighted += torch.linalg.vecdot(exp, shifted)
        else:
            sum_exp += shifted.exp_().sum(dim=-1)
    here = local_targets >= 0
    picked = logits.gather(-1, local_targets.clamp_min(0)[:, None]).squeeze(-1).float()
    target_logit = torch.where(here, picked, torch.zeros_like(picked))
    return RowStats(row_max, sum_exp, weighted, target_logit)


def torch_grad_logits(
    logits: torch.Tensor,
    local_targets: torch.Tensor,
    lse: torch.Tensor,
    mean_logit: torch.Tensor | None,
    grad_logprob: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    chunk_size: int,
) -> torch.Tensor:
    """Chunked-torch ``d loss / d logits`` for ``logits [N, V]``, in the logits dtype.

    ``grad = g_lp (onehot - p) + g_H p (mean_logit - x)`` with ``p = exp(x - lse)``.
    """
    n_rows, n_vocab = logits.shape
    grad = torch.empty_like(logits)
    rows = torch.arange(n_rows, device=logits.device)
    for start in range(0, n_vocab, chunk_size):
        stop = min(start + chunk_size, n_vocab)
        shifted = logits[:, start:stop] - lse[:, None]  # fresh fp32 tensor
        if grad_entropy is not None and mean_logit is not None:
            shifted.clamp_min_(_SHIFT_FLOOR)
            prob = shifted.exp()
            # g_H p (mean - x) - g_lp p, with mean - x = (mean - lse) - (x - lse)
            chunk_grad = shifted.neg_().add_((mean_logit - lse)[:, None]).mul_(grad_entropy[:, None])
            chunk_grad = chunk_grad.sub_(grad_logprob[:, None]).mul_(prob)
        else:
            chunk_grad = shifted.exp_().mul_(-grad_logprob[:, None])
        column = local_targets - start
        hit = (column >= 0) & (column < stop - start)
        chunk_grad[rows[hit], column[hit]] += grad_logprob[hit]
        grad[:, start:stop] = chunk_grad  # copy_ casts to the logits dtype
    return grad


# ------------------------------------------------------------------ tensor parallel


def _tp_world_size(tp_group: Any) -> int:
    if tp_group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(tp_group)


def all_reduce_row_stats(stats: RowStats, tp_group: Any) -> RowStats:
    """Combine per-slice :class:`RowStats` over ``tp_group`` into full-vocabulary ones.

    Rescales every slice to the global maximum ``M`` (one all-reduce MAX), then sums
    ``[s, w, x_t]`` (one all-reduce SUM). With one rank this returns ``stats``.
    """
    if _tp_world_size(tp_group) == 1:
        return stats
    global_max = stats.row_max.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=tp_group)
    offset = stats.row_max - global_max
    scale = offset.exp()
    summed = torch.stack(
        [stats.sum_exp * scale, scale * (stats.weighted + offset * stats.sum_exp), stats.target_logit]
    )
    dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=tp_group)
    return RowStats(global_max, summed[0], summed[1], summed[2])


class _GatherVocabShards(torch.autograd.Function):
    """All-gather vocabulary shards along the last dim; backward keeps the local slice."""

    @staticmethod
    def forward(ctx: Any, shard: torch.Tensor, tp_group: Any) -> torch.Tensor:
        world = dist.get_world_size(tp_group)
        ctx.rank, ctx.width = dist.get_rank(tp_group), shard.shape[-1]
        parts = [torch.empty_like(shard) for _ in range(world)]
        dist.all_gather(parts, shard.contiguous(), group=tp_group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        start = ctx.rank * ctx.width
        return grad[..., start : start + ctx.width].contiguous(), None


def gather_vocab_shards(shard: torch.Tensor, tp_group: Any) -> torch.Tensor:
    """Full-vocabulary logits from equal per-rank slices (differentiable)."""
    out: torch.Tensor = _GatherVocabShards.apply(shard, tp_group)
    return out


# ------------------------------------------------------------------ autograd function


def _row_stats(backend: str, *args: Any) -> RowStats:
    if backend == "triton":
        return RowStats(*load_triton_module("keel_kernels._triton_logprob").row_stats(*args))
    return torch_row_stats(*args)


def _grad_logits(backend: str, *args: Any) -> torch.Tensor:
    if backend == "triton":
        grad: torch.Tensor = load_triton_module("keel_kernels._triton_logprob").grad_logits(*args)
        return grad
    return torch_grad_logits(*args)


class _TokenLogprobs(torch.autograd.Function):
    """Autograd wrapper: forward and backward both chunked, on 2-D ``[N, V_local]``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        logits: torch.Tensor,
        local_targets: torch.Tensor,
        valid: torch.Tensor,
        tp_group: Any,
        chunk_size: int,
        return_entropy: bool,
        backend: str,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        local = _row_stats(backend, logits, local_targets, chunk_size, return_entropy)
        stats = all_reduce_row_stats(local, tp_group)
        log_sum = stats.sum_exp.log()
        lse = stats.row_max + log_sum
        zero = torch.zeros_like(lse)
        logprob = torch.where(valid, stats.target_logit - lse, zero)
        ctx.set_materialize_grads(False)
        ctx.chunk_size, ctx.backend, ctx.return_entropy = chunk_size, backend, return_entropy
        if not return_entropy:
            ctx.save_for_backward(logits, local_targets, valid, lse)
            return logprob
        ratio = stats.weighted / stats.sum_exp
        entropy = torch.where(valid, log_sum - ratio, zero)
        ctx.save_for_backward(logits, local_targets, valid, lse, stats.row_max + ratio)
        return logprob, entropy

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        logits, local_targets, valid, lse, *rest = ctx.saved_tensors
        mean_logit = rest[0] if rest else None
        grad_logprob, grad_entropy = grads[0], (grads[1] if ctx.return_entropy else None)
        nones = (None,) * 6
        if grad_logprob is None and grad_entropy is None:
            return (None, *nones)
        zero = torch.zeros_like(lse)
        grad_logprob = zero if grad_logprob is None else torch.where(valid, grad_logprob.float(), zero)
        if grad_entropy is not None:
            grad_entropy = torch.where(valid, grad_entropy.float(), zero)
        grad = _grad_logits(
            ctx.backend, logits, local_targets, lse, mean_logit, grad_logprob, grad_entropy, ctx.chunk_size
        )
        return (grad, *nones)


# ------------------------------------------------------------------------ public API


def _valid_tokens(targets: torch.Tensor, ignore_index: int, loss_mask: torch.Tensor | None) -> torch.Tensor:
    valid = targets != ignore_index
    if loss_mask is not None:
        if loss_mask.shape != targets.shape:
            raise ValueError(
                f"loss_mask shape {tuple(loss_mask.shape)} must equal targets shape {tuple(targets.shape)}."
            )
        valid = valid & loss_mask.bool()
    return valid


def _check_inputs(logits: torch.Tensor, targets: torch.Tensor, chunk_size: int) -> None:
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got {logits.dtype}.")
    if logits.dim() < 1 or targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal logits shape {tuple(logits.shape)} "
            "without its last (vocabulary) dim."
        )
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise TypeError(f"targets must be integer token ids, got {targets.dtype}.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    tp_group: Any = None,
    vocab_start: int = 0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    return_entropy: bool = False,
    ignore_index: int = IGNORE_INDEX,
    loss_mask: torch.Tensor | None = None,
    backend: Backend = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability (and entropy) of ``targets`` under ``softmax(logits)``.

    ``logprob = x_t - logsumexp(x)``, ``entropy = logsumexp(x) - sum_j softmax(x)_j x_j``,
    computed ``chunk_size`` vocabulary columns at a time (Triton rounds it up to a
    power of two) without materialising the fp32 softmax.

    Args:
        logits: ``[..., V_local]``, any float dtype; the local vocabulary slice.
        targets: ``[...]`` global token ids; ``ignore_index`` marks masked tokens.
        tp_group: vocabulary-parallel process group; the result equals the one on the
            full vocabulary, identical on every rank.
        vocab_start: global id of this rank's first column.
        chunk_size: vocabulary columns processed at once.
        return_entropy: also return the entropy of each token's distribution.
        ignore_index: target id of masked tokens (logprob 0, entropy 0, zero grad).
        loss_mask: optional ``[...]`` mask; zeros are treated like ``ignore_index``.
        backend: ``"auto"`` (see :mod:`keel_kernels._dispatch`), ``"torch"`` or ``"triton"``.

    Returns:
        fp32 ``logprobs [...]``, or ``(logprobs, entropy)`` when ``return_entropy``.
    """
    _check_inputs(logits, targets, chunk_size)
    chosen = resolve_backend(logits, backend)
    n_vocab = logits.shape[-1]
    flat_logits = logits.reshape(-1, n_vocab)
    if flat_logits.stride(-1) != 1:
        flat_logits = flat_logits.contiguous()
    flat_targets = targets.reshape(-1).long()
    valid = _valid_tokens(targets, ignore_index, loss_mask).reshape(-1)
    column = flat_targets - vocab_start
    here = valid & (column >= 0) & (column < n_vocab)
    local_targets = torch.where(here, column, torch.full_like(column, -1)).contiguous()
    out = _TokenLogprobs.apply(
        flat_logits, local_targets, valid, tp_group, chunk_size, return_entropy, chosen
    )
    if return_entropy:
        logprob, entropy = out
        return logprob.view(targets.shape), entropy.view(targets.shape)
    result: torch.Tensor = out.view(targets.shape)
    return result


def token_logprobs_reference(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    tp_group: Any = None,
    vocab_start: int = 0,
    return_entropy: bool = False,
    ignore_index: int = IGNORE_INDEX,
    loss_mask: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch ``log_softmax(logits.float()).gather(targets)`` (and entropy).

    Materialises the full fp32 log-softmax: use it for tests and small inputs. With
    ``tp_group`` it first all-gathers the (equal-width) vocabulary slices.
    """
    _check_inputs(logits, targets, 1)
    world = _tp_world_size(tp_group)
    if world > 1:
        expected_start = dist.get_rank(tp_group) * logits.shape[-1]
        if vocab_start != expected_start:
            raise ValueError(
                f"token_logprobs_reference needs equal vocabulary slices in rank order: "
                f"vocab_start={vocab_start}, expected {expected_start}."
            )
        logits = gather_vocab_shards(logits, tp_group)
    valid = _valid_tokens(targets, ignore_index, loss_mask)
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    safe_targets = torch.where(valid, targets.long(), torch.zeros_like(targets.long()))
    picked = log_probs.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    logprob = torch.where(valid, picked, torch.zeros_like(picked))
    if not return_entropy:
        return logprob
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    return logprob, torch.where(valid, entropy, torch.zeros_like(entropy))
