"""Sequence log-probabilities from (vocabulary-parallel) logits, shared by every policy algorithm.

The model's last stage returns logits ``[batch, seq, V / TP]``: each tensor-parallel rank
holds one slice of the vocabulary. :func:`kernels.token_logprobs` combines per-rank
statistics with two small all-reduces instead of gathering the vocabulary, so DPO, PPO and
the generation backend get the same numbers from the same function.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from kernels import token_logprobs
from kernels._dispatch import Backend


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor,
                      parallel: Optional[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(``sum_t mask_t log p(labels_t)`` per row ``[batch]``, masked token count per row ``[batch]``)."""
    tp_group, vocab_start = None, 0
    if parallel is not None and parallel.layout.tensor > 1:
        tp_group, vocab_start = parallel.tp_group, parallel.tp_rank * logits.shape[-1]
    mask = loss_mask.to(logits.device).float()
    # Triton on GPUs; on CPU always the chunked torch path (TRITON_INTERPRET=1, which the kernel tests
    # set, would otherwise pick Triton's interpreter: exact, but an order of magnitude slower)
    backend: Backend = "auto" if logits.is_cuda else "torch"
    per_token = token_logprobs(logits, labels.to(logits.device), tp_group=tp_group, vocab_start=vocab_start,
                               loss_mask=mask, backend=backend)
    assert isinstance(per_token, torch.Tensor)
    return (per_token * mask).sum(-1), mask.sum(-1)


def lm_forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The GPT model on ``batch['tokens']`` without labels: logits on the last stage, hidden states before."""
    tokens = batch["tokens"]
    positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    output: torch.Tensor = model(tokens, positions, None)
    return output
