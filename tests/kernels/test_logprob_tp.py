"""Vocabulary-parallel token_logprobs on 2 gloo ranks equals the full-vocabulary result.

One launch runs every case (spawning ranks costs seconds). Each rank builds the same
full logits from a shared seed, keeps its slice, and compares its slice of the
gradient with the single-process reference on the full vocabulary.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch
import torch.distributed as dist

from keel_kernels._dispatch import Backend
from keel_kernels.logprob import IGNORE_INDEX, token_logprobs, token_logprobs_reference
from tests.kernels.gloo_ranks import spawn_gloo_ranks

VOCAB = 22
SHAPE = (2, 3)


def _full_inputs(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    logits = (3.0 * torch.randn(*SHAPE, VOCAB, generator=generator)).to(dtype)
    # Targets land on both ranks' slices; one token is masked.
    targets = torch.tensor([[0, 21, 8], [9, IGNORE_INDEX, 15]])
    return logits, targets


def _check_case(
    rank: int, group: dist.ProcessGroup, bounds: list[int], dtype: torch.dtype, backend: Backend
) -> None:
    full, targets = _full_inputs(dtype)
    start, stop = bounds[rank], bounds[rank + 1]
    weight = torch.linspace(-1.0, 1.0, targets.numel()).view(SHAPE)

    shard = full[..., start:stop].clone().requires_grad_()
    lp, ent = token_logprobs(
        shard, targets, tp_group=group, vocab_start=start, chunk_size=4, return_entropy=True, backend=backend
    )
    (lp.sum() + (ent * weight).sum()).backward()

    ref_full = full.clone().requires_grad_()
    ref_lp, ref_ent = token_logprobs_reference(ref_full, targets, return_entropy=True)
    (ref_lp.sum() + (ref_ent * weight).sum()).backward()
    assert ref_full.grad is not None and shard.grad is not None

    where = f"rank {rank}, slices {bounds}, {dtype}, {backend}"
    grad_tol: dict[str, Any] = (
        {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 2e-2}
    )
    torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=1e-5, msg=lambda m: f"logprob {where}: {m}")
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=1e-5, msg=lambda m: f"entropy {where}: {m}")
    torch.testing.assert_close(
        shard.grad, ref_full.grad[..., start:stop], **grad_tol, msg=lambda m: f"grad {where}: {m}"
    )


def _check_reference_gathers(rank: int, group: dist.ProcessGroup) -> None:
    full, targets = _full_inputs(torch.float32)
    width = VOCAB // 2
    shard = full[..., rank * width : (rank + 1) * width].clone().requires_grad_()
    lp = token_logprobs_reference(shard, targets, tp_group=group, vocab_start=rank * width)
    assert isinstance(lp, torch.Tensor)
    lp.sum().backward()
    ref_full = full.clone().requires_grad_()
    ref_lp = token_logprobs_reference(ref_full, targets)
    assert isinstance(ref_lp, torch.Tensor)
    ref_lp.sum().backward()
    assert ref_full.grad is not None
    torch.testing.assert_close(lp, ref_lp)
    torch.testing.assert_close(shard.grad, ref_full.grad[..., rank * width : (rank + 1) * width])


def _worker(rank: int, world_size: int) -> None:
    group = dist.new_group(list(range(world_size)))
    _check_case(rank, group, [0, 11, 22], torch.float32, "torch")
    _check_case(rank, group, [0, 9, 22], torch.bfloat16, "torch")
    _check_reference_gathers(rank, group)
    if importlib.util.find_spec("triton") is not None:
        os.environ["TRITON_INTERPRET"] = "1"
        _check_case(rank, group, [0, 13, 22], torch.float32, "triton")


def test_vocab_parallel_matches_full_vocabulary() -> None:
    spawn_gloo_ranks(_worker, 2)
