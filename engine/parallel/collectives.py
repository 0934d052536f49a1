"""Named cross-rank patterns, so call sites say what moves where.

* :func:`from_last_stage`: a value that only the last pipeline stage computed (losses,
  rewards, log-probs), made available on every stage of the pipeline.
* :func:`sum_over_data_parallel`: totals (sum, count) summed over data-parallel replicas.
* :func:`gather_data_parallel_rows`: rows sharded round-robin over data-parallel ranks
  (row ``i`` on rank ``i % dp``) put back into their original order on every rank.
* :func:`any_rank`: a flag that is true when it is true on any rank of the world.

Each works on CPU tensors in and out; on GPU the communication happens on the device.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def _device(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.cuda() if torch.cuda.is_available() else tensor


def from_last_stage(value: torch.Tensor, parallel: Any) -> torch.Tensor:
    """``value`` of the last pipeline stage on every stage (other stages' values are ignored)."""
    if parallel.layout.pipeline == 1:
        return value
    moved = _device(value.clone())
    if not parallel.is_last_stage():
        moved.zero_()
    dist.all_reduce(moved, group=parallel.pp_group)
    return moved.cpu()


def sum_over_data_parallel(value: torch.Tensor, parallel: Any) -> torch.Tensor:
    """Element-wise sum of ``value`` over the data-parallel replicas."""
    if parallel.layout.data == 1:
        return value
    moved = _device(value.clone())
    dist.all_reduce(moved, group=parallel.dp_group)
    return moved.cpu()


def gather_data_parallel_rows(local: torch.Tensor, total_rows: int, parallel: Any) -> torch.Tensor:
    """All ``total_rows`` rows in order, from each rank's round-robin shard ``local`` (rows first)."""
    dp_size = parallel.layout.data
    if dp_size == 1:
        return local
    width = -(-total_rows // dp_size)
    padded = _device(torch.zeros(width, *local.shape[1:], dtype=local.dtype))
    padded[: local.shape[0]] = _device(local)
    gathered = [torch.zeros_like(padded) for _ in range(dp_size)]
    dist.all_gather(gathered, padded, group=parallel.dp_group)
    result = torch.zeros(total_rows, *local.shape[1:], dtype=local.dtype)
    for rank, shard in enumerate(gathered):
        count = len(range(rank, total_rows, dp_size))
        result[rank::dp_size] = shard[:count].cpu()
    return result


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank of the world."""
    value = _device(torch.tensor([1.0 if flag else 0.0]))
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)
