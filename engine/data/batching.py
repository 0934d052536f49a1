"""Turning a step's sample indices into micro-batches for megatron's schedules.

Every data set an algorithm trains on satisfies :class:`StepDataset`: a length, the
positions a sample uses (for grouping rows of similar length), and ``collate``. The
helpers here group a step's rows by length and cut each micro-batch to its longest row,
which changes nothing but the order of floating-point sums (causal attention: no kept
position sees a cut one, and every cut position is padding).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

Batch = dict[str, torch.Tensor]

SEQUENCE_KEYS = ("tokens", "labels", "loss_mask")


class StepDataset(Protocol):
    """What the training loop needs of a data set."""

    def __len__(self) -> int: ...

    def length(self, index: int) -> int:
        """Positions sample ``index`` uses (the longest of its rows)."""
        ...

    def collate(self, indices: list[int]) -> Batch:
        """One micro-batch of the samples ``indices``, padded to ``seq_length``."""
        ...


def to_device(batch: Batch) -> Batch:
    """``batch`` on the current CUDA device when there is one (unchanged on CPU)."""
    if not torch.cuda.is_available():
        return batch
    return {key: value.cuda(non_blocking=True) for key, value in batch.items()}


def group_by_length(groups: list[list[int]], length: Callable[[int], int]) -> list[list[int]]:
    """The same indices, longest first, in groups of the same sizes.

    The loss is a sum over the step's items divided by their total count, so how rows are
    grouped into micro-batches changes nothing but the order of floating-point sums.
    """
    ordered = sorted((i for indices in groups for i in indices), key=length, reverse=True)
    out, start = [], 0
    for indices in groups:
        out.append(ordered[start: start + len(indices)])
        start += len(indices)
    return out


def length_multiple(layout: Any) -> int:
    """What a cut micro-batch's length is rounded up to.

    Under sequence parallelism megatron splits the positions over the tensor-parallel ranks. On a
    GPU each rank's share is kept a multiple of 16 (Transformer Engine's FP8 GEMMs need aligned
    token counts, and tensor cores prefer them). On CPU nothing else: every padded position is
    computed for nothing.
    """
    per_rank = 16 if torch.cuda.is_available() else 1
    return per_rank * (layout.tensor if layout.sequence_parallel else 1)


def padded_length(used: int, seq_length: int, multiple: int) -> int:
    """``used`` rounded up to ``multiple`` (:func:`length_multiple`), at most ``seq_length``."""
    return min(seq_length, -(-max(used, 1) // multiple) * multiple)


def cut_to_length(batch: Batch, length: int) -> Batch:
    """``batch`` with its per-position tensors (:data:`SEQUENCE_KEYS`) cut to ``length`` positions.

    Under causal attention no kept position sees a cut one, and every cut position is padding
    (no loss, after every row's end), so the outputs that matter are unchanged.
    """
    return {key: value[:, :length] if key in SEQUENCE_KEYS else value for key, value in batch.items()}


def schedule_iterators(micro_batches: list[Batch], num_chunks: int) -> Any:
    """Data iterator(s) for megatron's schedule: one, or one per virtual-pipeline chunk."""
    if num_chunks == 1:
        return iter(micro_batches)
    return [iter(micro_batches) for _ in range(num_chunks)]


def micro_batches_for(groups: list[list[int]], dataset: StepDataset, seq_length: int, layout: Any,
                      by_length: bool) -> list[Batch]:
    """Collate one step's index groups; with ``by_length``, group rows by length and cut padding.

    Under pipeline parallelism the stages exchange fixed-size activations, so every
    micro-batch of the step is cut to the same (longest) length.
    """
    if not by_length:
        return [dataset.collate(indices) for indices in groups]
    groups = group_by_length(groups, dataset.length)
    lengths = [max(dataset.length(i) for i in indices) for indices in groups]
    if layout.pipeline > 1:
        lengths = [max(lengths)] * len(lengths)
    multiple = length_multiple(layout)
    return [cut_to_length(dataset.collate(indices), padded_length(n, seq_length, multiple))
            for indices, n in zip(groups, lengths, strict=True)]


KEEP = "keep"  # per batch row: 1.0, or 0.0 for a row that only fills the last validation batch (no loss)


class ReadOnce:
    """``dataset`` read exactly once by whole global batches: ids ``>= len(dataset)`` fill the last batch.

    A filler is the sample ``id % len(dataset)`` (real data, so shapes and lengths stay ordinary), collated
    with ``batch["keep"]`` 0.0 on its rows so that a loss that reads :data:`KEEP` counts nothing of it.
    """

    def __init__(self, dataset: StepDataset, total: int):
        self.dataset, self.real, self.total = dataset, len(dataset), total

    def __len__(self) -> int:
        return self.total

    def length(self, index: int) -> int:
        return self.dataset.length(index % self.real)

    def collate(self, indices: list[int]) -> Batch:
        batch = self.dataset.collate([i % self.real for i in indices])
        items = torch.tensor([float(i < self.real) for i in indices])
        rows = batch["tokens"].shape[0]
        batch[KEEP] = items.repeat_interleave(rows // len(indices))  # a pair's two rows share their item's flag
        return batch


def kept_rows(batch: Batch, rows: int, device: Any) -> torch.Tensor:
    """Per-row weights of :class:`ReadOnce` (all ones for any other batch), ``[rows]`` on ``device``."""
    keep = batch.get(KEEP)
    return torch.ones(rows, device=device) if keep is None else keep.to(device)
