"""Layout-invariant weight initialisation.

megatron-core initialises each rank's shard from the rank's own RNG stream, so a model
built at TP2×PP2 starts from different weights than the same model at TP1. For parity
tests (and for users who compare layouts) Keel can instead draw every *full* tensor
from a generator seeded by ``(seed, checkpoint key)`` and copy in the local slice. The
slice geometry comes from the model's own ``sharded_state_dict`` — the same metadata
``dist_checkpointing`` uses — so fused QKV, gate/up projections and tied embeddings
are handled exactly as checkpoints handle them.

The cost is one full tensor per parameter on every rank: fine up to a few billion
parameters; larger models use ``model.init=megatron``.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from typing import Any

import torch


def _iter_sharded_tensors(state: Any) -> Iterator[Any]:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    if isinstance(state, dict):
        for value in state.values():
            yield from _iter_sharded_tensors(value)
    elif isinstance(state, (list, tuple)):
        for value in state:
            yield from _iter_sharded_tensors(value)
    elif isinstance(state, ShardedTensorFactory):
        yield from _iter_sharded_tensors(state.build())
    elif isinstance(state, ShardedTensor):
        yield state


def _full_tensor(key: str, shape: tuple[int, ...], seed: int, std: float, num_layers: int, zero_centered: bool) -> torch.Tensor:
    name = key.rsplit(".", 1)[-1]
    is_norm = "layer_norm_weight" in key or key.endswith("final_layernorm.weight") or "norm.weight" in key
    if name == "bias" or "layer_norm_bias" in key:
        return torch.zeros(shape)
    if is_norm:
        return torch.zeros(shape) if zero_centered else torch.ones(shape)
    if key.endswith("linear_proj.weight") or key.endswith("linear_fc2.weight"):
        std = std / math.sqrt(2.0 * num_layers)
    generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63))
    return torch.randn(shape, generator=generator) * std


@torch.no_grad()
def init_layout_invariant(chunks: list[Any], seed: int, std: float, num_layers: int, zero_centered_gamma: bool) -> None:
    """Overwrite every parameter of ``chunks`` with its slice of a per-key seeded full tensor.

    The layers of a chunk share their keys (the layer number is a prepended axis of one stacked tensor), so
    the slices are grouped by key and each full tensor is drawn once: drawing it per layer made the
    initialisation quadratic in the depth (34 s of SmolLM2-135M's 38 s build, 30 layers).
    """
    by_key: dict[str, list[Any]] = {}
    for chunk in chunks:
        module = getattr(chunk, "module", chunk)
        for sharded in _iter_sharded_tensors(module.sharded_state_dict()):
            if sharded.data is not None and isinstance(sharded.data, torch.Tensor):
                by_key.setdefault(sharded.key, []).append(sharded)
    for key, pieces in by_key.items():
        full = _full_tensor(key, tuple(pieces[0].global_shape), seed, std, num_layers, zero_centered_gamma)
        for sharded in pieces:
            prepend = sharded.prepend_axis_num
            index: list[Any] = list(sharded.global_offset[:prepend])
            for dim, size in enumerate(sharded.local_shape):
                start = sharded.global_offset[prepend + dim]
                index.append(slice(start, start + size))
            sharded.data.copy_(full[tuple(index)].to(sharded.data.dtype))
