"""The generation layout: a second split of the same world, beside the training layout.

Rollouts are generated at their own tensor-parallel size ``G``, usually smaller than the
training model's TP × PP (no pipeline: generation is latency-bound and a pipeline would
idle its stages). The world is cut into ``world / G`` replicas of ``G`` consecutive ranks
(so a replica stays inside a node); each replica holds the whole model at TP ``G`` and
generates its share of the prompts.

:class:`GenerationParallelState` owns the process groups of that layout, created with
``torch.distributed.new_group`` next to megatron's training groups, and hands them to
megatron modules through a ``ProcessGroupCollection``: megatron's own global
``parallel_state`` keeps describing the training layout.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from engine.parallel.layout import LayoutError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationLayout:
    """``tensor`` ranks per generation replica, ``replicas`` of them over the world."""

    tensor: int
    replicas: int

    # What code shared with the training layout reads (log-probs, model builder).
    pipeline: int = 1
    virtual_pipeline: None = None
    sequence_parallel: bool = False

    @property
    def world_size(self) -> int:
        return self.tensor * self.replicas

    @property
    def data(self) -> int:
        return self.replicas

    @classmethod
    def for_world(cls, tensor: int, world_size: int, preset: Any = None, named: str = "") -> GenerationLayout:
        """The layout of ``tensor`` ranks per replica over ``world_size``; with ``preset``, checked against the
        model too (:meth:`check_model`), and a refusal names the sizes that suit both. ``named``: the option or
        setting that gave ``tensor``, which a refusal starts with."""
        try:
            if tensor < 1 or world_size % tensor:
                raise LayoutError(f"generation tensor-parallel size {tensor} does not divide the world size "
                                  f"{world_size}; pick {_choices(world_size, preset)}")
            layout = cls(tensor, world_size // tensor)
            if preset is not None:
                layout.check_model(preset, world_size)
        except LayoutError as exc:
            raise LayoutError(f"{named}: {exc}" if named else str(exc)) from None
        return layout

    def check_model(self, preset: Any, world_size: int = 0) -> None:
        """Every size the generation TP splits must divide evenly (checked before any group exists)."""
        for name, value in _split_sizes(preset):
            if value % self.tensor:
                raise LayoutError(
                    f"model {preset.name}: {name}={value} is not divisible by the generation tensor-parallel "
                    f"size {self.tensor}; pick {_choices(world_size, preset) if world_size else f'one that divides {value}'}")

    def describe(self) -> str:
        return f"generation TP{self.tensor}×{self.replicas} replicas"


def _split_sizes(preset: Any) -> tuple[tuple[str, int], ...]:
    return (("num_attention_heads", preset.num_attention_heads), ("num_query_groups (KV heads)", preset.num_query_groups),
            ("ffn_hidden_size", preset.ffn_hidden_size), ("vocab_size", preset.vocab_size))


def _choices(world_size: int, preset: Any) -> str:
    """The generation TP sizes that divide ``world_size`` and, with a ``preset``, every size the TP splits."""
    sizes = [d for d in range(1, world_size + 1) if world_size % d == 0
             and (preset is None or all(value % d == 0 for _, value in _split_sizes(preset)))]
    where = f"the world size {world_size}" + (f" and model {preset.name}'s heads, KV heads, FFN and vocabulary"
                                              if preset is not None else "")
    return f"one of {', '.join(map(str, sizes))} (those that divide {where})"


class GenerationParallelState:
    """Process groups of a :class:`GenerationLayout`; the same accessors as the training state."""

    def __init__(self, layout: GenerationLayout, groups: dict[str, Any]):
        self.layout = layout
        self._groups = groups

    @classmethod
    def initialize(cls, tensor: int) -> GenerationParallelState:
        """Create the generation groups (a collective: every rank of the world calls it, in the same order)."""
        if not dist.is_initialized():
            raise LayoutError("the generation layout needs an initialised world (ParallelState.initialize first)")
        world, rank = dist.get_world_size(), dist.get_rank()
        layout = GenerationLayout.for_world(tensor, world)
        groups: dict[str, Any] = {}
        for replica in range(layout.replicas):
            ranks = list(range(replica * tensor, (replica + 1) * tensor))
            group = dist.new_group(ranks)
            if rank in ranks:
                groups.update(tp_group=group, tp_ranks=ranks, replica=replica, tp_rank=ranks.index(rank))
        # Singleton groups for the dimensions the generation model does not split (megatron asks for them)
        for other in range(world):
            group = dist.new_group([other])
            if other == rank:
                groups["self_group"] = group
        logger.info("rank %d: %s (replica %d, TP rank %d)", rank, layout.describe(), groups["replica"],
                    groups["tp_rank"])
        return cls(layout, groups)

    @property
    def tp_group(self) -> Any:
        return self._groups["tp_group"]

    @property
    def tp_rank(self) -> int:
        return int(self._groups["tp_rank"])

    @property
    def tp_ranks(self) -> list[int]:
        return list(self._groups["tp_ranks"])

    @property
    def replica(self) -> int:
        return int(self._groups["replica"])

    @property
    def rank(self) -> int:
        return dist.get_rank()

    def process_groups(self) -> Any:
        """megatron ``ProcessGroupCollection`` of a generation model: TP over the replica, nothing else split."""
        from megatron.core.process_groups_config import ProcessGroupCollection

        alone = self._groups["self_group"]
        return ProcessGroupCollection(tp=self.tp_group, pp=alone, cp=alone, tp_cp=self.tp_group, mp=self.tp_group,
                                      embd=alone, pos_embd=alone, dp=alone, dp_cp=alone)
