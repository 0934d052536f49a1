"""Sequence log-probabilities from (vocabulary-parallel) logits, shared by every policy algorithm.

The model's last stage returns logits ``[batch, seq, V / TP]``: each tensor-parallel rank
holds one slice of the vocabulary. :func:`keel_kernels.token_logprobs` combines per-rank
statistics with two small all-reduces instead of gathering the vocabulary, so DPO, PPO and
the generation backend get the same numbers from the same function.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch

from keel_kernels import token_logprobs
from keel_kernels._dispatch import Backend


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor,
                      parallel: Optional[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(``sum_t mask_t log p(labels_t)`` per row ``[batch]``, masked token count per row ``[batch]``)."""
    mask = loss_mask.to(logits.device).float()
    per_token: torch.Tensor = per_token_logprobs(logits, labels, mask, parallel)
    return (per_token * mask).sum(-1), mask.sum(-1)


def per_token_logprobs(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor,
                       parallel: Optional[Any], return_entropy: bool = False) -> Any:
    """``log p(labels_t)`` per position ``[batch, seq]`` (0 where ``loss_mask`` is 0) from this rank's vocab slice;
    with ``return_entropy`` also each position's entropy (a pair)."""
    tp_group, vocab_start = None, 0
    if parallel is not None and parallel.layout.tensor > 1:
        tp_group, vocab_start = parallel.tp_group, parallel.tp_rank * logits.shape[-1]
    # Triton on GPUs; on CPU always the chunked torch path (TRITON_INTERPRET=1, which the kernel tests
    # set, would otherwise pick Triton's interpreter: exact, but an order of magnitude slower)
    backend: Backend = "auto" if logits.is_cuda else "torch"
    return token_logprobs(logits, labels.to(logits.device), tp_group=tp_group, vocab_start=vocab_start,
                          loss_mask=loss_mask.to(logits.device).float(), backend=backend, return_entropy=return_entropy)


def lm_forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The GPT model on ``batch['tokens']`` without labels: logits on the last stage, hidden states before."""
    tokens = batch["tokens"]
    positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    output: torch.Tensor = model(tokens, positions, None)
    return output


def sequence_batches(sequences: list[list[int]], prompt_lengths: list[int], micro_batch_size: int,
                     pad_id: int = 0, width: Optional[int] = None) -> list[dict[str, torch.Tensor]]:
    """Micro-batches of prompt+response rows, all padded to one length (pipeline stages exchange fixed shapes).

    ``labels[t]`` is ``tokens[t + 1]`` and ``loss_mask`` is 1 exactly on the response tokens
    (the label positions ``prompt - 1 .. len - 2``). ``width`` defaults to the longest row.
    """
    width = width or max(len(s) for s in sequences)
    batches = []
    for first in range(0, len(sequences), micro_batch_size):
        rows = sequences[first: first + micro_batch_size]
        lengths = prompt_lengths[first: first + micro_batch_size]
        tokens = torch.full((micro_batch_size, width), pad_id, dtype=torch.long)
        labels = torch.full((micro_batch_size, width), pad_id, dtype=torch.long)
        mask = torch.zeros(micro_batch_size, width)
        for i, (row, prompt) in enumerate(zip(rows, lengths, strict=True)):
            tokens[i, : len(row)] = torch.tensor(row)
            labels[i, : len(row) - 1] = torch.tensor(row[1:])
            mask[i, prompt - 1: len(row) - 1] = 1.0
        batches.append({"tokens": tokens, "labels": labels, "loss_mask": mask})
    return batches


def response_logprobs(runner: Any, sequences: list[list[int]], prompt_lengths: list[int],
                      micro_batch_size: int = 8) -> list[list[float]]:
    """Per-token log-probs of each row's response under ``runner``'s model, on every rank.

    The trainer's side of the rollout/trainer agreement: the same kernel the generation backend
    uses, on the training layout's vocabulary-parallel logits. Every rank passes the same rows.
    """
    parallel = runner.parallel

    def logps(output: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return per_token_logprobs(output, batch["labels"], batch["loss_mask"], parallel).float()

    return response_values(runner, sequences, prompt_lengths, logps, micro_batch_size)


def response_values(runner: Any, sequences: list[list[int]], prompt_lengths: list[int],
                    per_position: Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor],
                    micro_batch_size: int = 8) -> list[list[float]]:
    """``per_position(model output, batch) -> [rows, seq]`` read at each response token's label position,
    per row, on every rank (forward-only schedule of ``runner`` under any TP/PP).

    Every rank passes the same rows. Each data-parallel replica computes only its round-robin share
    (row ``i`` on replica ``i % dp``), and the shares are then gathered, so the pass costs every
    replica ``1/dp`` of the rows instead of all of them.
    """
    from engine.parallel.collectives import gather_data_parallel_rows

    parallel = runner.parallel
    mine = list(range(parallel.dp_rank, len(sequences), parallel.layout.data))
    width = max(len(s) for s in sequences)
    local = _local_values(runner, [sequences[i] for i in mine], [prompt_lengths[i] for i in mine], per_position,
                          micro_batch_size, width)
    values = gather_data_parallel_rows(local, len(sequences), parallel)
    return [values[i, p - 1: len(s) - 1].tolist() for i, (s, p) in enumerate(zip(sequences, prompt_lengths, strict=True))]


def _local_values(runner: Any, sequences: list[list[int]], prompt_lengths: list[int],
                  per_position: Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor],
                  micro_batch_size: int, width: int) -> torch.Tensor:
    """``[len(sequences), width]`` values of this replica's rows, on every pipeline stage.

    Rows go longest first; without pipeline parallelism each micro-batch is cut to its longest
    row (causal attention: a row's positions never see the padding after it), with it every
    micro-batch has the longest row's width (stages exchange fixed shapes).
    """
    from engine.data.batching import length_multiple, to_device
    from engine.parallel.collectives import from_last_stage

    parallel = runner.parallel
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    multiple = length_multiple(parallel.layout)
    groups = [order[first: first + micro_batch_size] for first in range(0, len(order), micro_batch_size)]
    batches: list[dict[str, torch.Tensor]] = []
    for group in groups:
        longest = len(sequences[group[0]]) if parallel.layout.pipeline == 1 or not batches else batches[0]["tokens"].shape[1]
        batches += sequence_batches([sequences[i] for i in group], [prompt_lengths[i] for i in group],
                                    micro_batch_size, width=-(-longest // multiple) * multiple)

    def step(data_iterator: Any, model: torch.nn.Module) -> tuple[torch.Tensor, Any]:
        batch = to_device(next(data_iterator))

        def collect(output: torch.Tensor, non_loss_data: bool = True) -> torch.Tensor:
            return per_position(output, batch).float()

        return lm_forward(model, batch), collect

    with torch.no_grad():
        outputs = runner.run_schedule(batches, step, forward_only=True, collect_outputs=True)
    local = torch.zeros(len(sequences), max([width, *(b["tokens"].shape[1] for b in batches)]))
    if parallel.is_last_stage():
        for group, output in zip(groups, outputs, strict=True):
            local[group, : output.shape[1]] = output[: len(group)].cpu()
    return from_last_stage(local, parallel)[:, :width]
