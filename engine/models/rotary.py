"""Unfused rotary embedding without megatron's per-call overheads.

Without Transformer Engine, megatron-core applies rotary embeddings with
``rope_utils._apply_rotary_pos_emb_bshd``. For every query and key of every layer it
recomputes ``cos``/``sin`` of the (cached) frequency tensor and, when the whole head
dimension rotates, concatenates the result with an empty pass-through slice, which
copies the full tensor once more.

:func:`install` replaces that function with one that computes the same expression,
``t * cos + rotate_half(t) * sin``, in the same order (results are bitwise equal), keeps
``cos``/``sin`` per frequency tensor (megatron's ``RotaryEmbedding.forward`` is
``lru_cache``d, so one tensor serves every layer and step), and skips the empty
concatenation. Interleaved and multi-latent-attention variants, and any ``mscale`` other
than 1, go to megatron's original function.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, Optional

import torch

_original: Optional[Callable[..., torch.Tensor]] = None
_cache: dict[tuple[Any, ...], tuple[Any, torch.Tensor, torch.Tensor]] = {}
_CACHE_SIZE = 16


def _cos_sin(freqs: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # With a KV cache megatron passes each layer a fresh slice of one frequency tensor: key by the
    # base tensor and the slice, so every layer of a decoding step shares one cos/sin.
    base = freqs if freqs._base is None else freqs._base
    key = (id(base), freqs.storage_offset(), tuple(freqs.shape), tuple(freqs.stride()), dtype)
    hit = _cache.get(key)
    if hit is not None and hit[0]() is base:
        return hit[1], hit[2]
    cos, sin = torch.cos(freqs).to(dtype), torch.sin(freqs).to(dtype)
    if len(_cache) >= _CACHE_SIZE:
        _cache.pop(next(iter(_cache)))
    _cache[key] = (weakref.ref(base), cos, sin)
    return cos, sin


def apply_rotary_bshd(
    t: torch.Tensor, freqs: torch.Tensor, rotary_interleaved: bool = False,
    multi_latent_attention: bool = False, mscale: float = 1.0,
) -> torch.Tensor:
    """Drop-in for megatron's ``_apply_rotary_pos_emb_bshd`` (see the module docstring)."""
    if rotary_interleaved or multi_latent_attention or mscale != 1.0 or freqs.requires_grad:
        assert _original is not None
        return _original(t, freqs, rotary_interleaved=rotary_interleaved,
                         multi_latent_attention=multi_latent_attention, mscale=mscale)
    rot_dim = freqs.shape[-1]
    cos, sin = _cos_sin(freqs, t.dtype)
    rotated = t if rot_dim == t.shape[-1] else t[..., :rot_dim]
    first, second = torch.chunk(rotated, 2, dim=-1)
    out = rotated * cos + torch.cat((-second, first), dim=-1) * sin
    if rot_dim == t.shape[-1]:
        return out
    return torch.cat((out, t[..., rot_dim:]), dim=-1)


def install() -> None:
    """Route megatron's unfused rotary through :func:`apply_rotary_bshd` (idempotent)."""
    global _original
    from megatron.core.models.common.embeddings import rope_utils

    if _original is None:
        _original = rope_utils._apply_rotary_pos_emb_bshd
        rope_utils._apply_rotary_pos_emb_bshd = apply_rotary_bshd
