"""Core attention for the local (non-Transformer-Engine) layer spec.

megatron-core's own ``DotProductAttention`` builds its causal mask with
``device="cuda"`` and materialises the full score matrix. This module keeps the
same constructor (so it drops into ``SelfAttentionSubmodules.core_attention``) and
computes attention with ``torch.nn.functional.scaled_dot_product_attention``, which
runs on any device and uses the fused kernels torch has for that device.

Shapes follow megatron: query ``[sq, b, heads, head_dim]``, key/value
``[sk, b, groups, head_dim]``; output ``[sq, b, heads * head_dim]``.

An explicit ``attention_mask`` (bool, True = masked out, broadcastable to
``[b, 1 or heads, sq, sk]``) replaces the causal mask; the data pipeline uses it for
packed sequences so no token attends across a document boundary.

With a KV cache the queries are the last ``sq`` of ``sk`` positions. SDPA's
``is_causal`` aligns its triangle top-left (query ``i`` sees keys ``<= i``), which is
right only when ``sq == sk``; a chunk of several new tokens onto a non-empty cache gets
the bottom-right triangle (query ``i`` sees keys ``<= i + sk - sq``) as an explicit mask.
A single new token sees the whole cache.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPACoreAttention(DotProductAttention):
    """Drop-in replacement for megatron's DotProductAttention built on torch SDPA."""

    def forward(  # type: ignore[override]
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Any = None,
    ) -> torch.Tensor:
        if packed_seq_params is not None:
            raise NotImplementedError("packed_seq_params needs Transformer Engine; pass a block mask instead")
        # Grouped-query attention: SDPA broadcasts the KV groups itself (enable_gqa), which avoids
        # materialising repeated keys and values.
        gqa = query.shape[2] != key.shape[2]
        if query.device.type == "cpu" and query.shape[0] == key.shape[0]:
            # [s, b, h, d] -> [b, h, s, d] laid out as [b, s, h, d]: on that layout torch's CPU flash
            # kernel gains more, forward and backward, than the copies cost (bench-34m, 8 x 256:
            # 16.2 -> 14.1 ms a layer), and its results are bitwise the same. Queries onto a KV cache
            # (fewer than the keys) keep the views, so the cache is not copied at every step.
            q, k, v = (t.transpose(0, 1).contiguous().transpose(1, 2) for t in (query, key, value))
        else:  # [s, b, h, d] -> [b, h, s, d]
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        dropout = self.attention_dropout.p if self.training else 0.0
        if attention_mask is not None:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=~attention_mask, dropout_p=dropout, scale=self.softmax_scale, enable_gqa=gqa,
            )
        else:
            mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
            causal = mask_type == AttnMaskType.causal and q.shape[2] > 1
            sq, sk = q.shape[2], k.shape[2]
            if causal and sq != sk:
                allowed = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(diagonal=sk - sq)
                out = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=allowed, dropout_p=dropout, scale=self.softmax_scale, enable_gqa=gqa,
                )
            else:
                out = F.scaled_dot_product_attention(
                    q, k, v, is_causal=causal, dropout_p=dropout, scale=self.softmax_scale, enable_gqa=gqa,
                )
        # [b, h, s, d] -> [s, b, h*d]
        b, h, s, d = out.shape
        return out.permute(2, 0, 1, 3).reshape(s, b, h * d)
