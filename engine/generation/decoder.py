"""A lean decoding forward over the megatron model's own parameters, with a cache of rotated keys.

On CPU, megatron's module stack costs about as much per decoding step as the matrix
products themselves (autograd functions, parallel-region bookkeeping, a dozen module calls
per layer), and its static KV cache stores keys before the rotary embedding, so every step
rotates the whole cache again in every layer. For decoding, :class:`CachedDecoder` runs the
same computation directly: per layer norm → fused QKV → rotary (new positions only) → cache
write → SDPA over the cache → output projection (+ TP all-reduce) → norm → fc1 → gated or
plain activation → fc2 (+ TP all-reduce), reading the weights of the megatron modules in
place (resharding writes into them; nothing is copied). The layouts are megatron's: QKV rows
grouped per KV head, ``[gate; up]`` per TP rank, a vocabulary-parallel embedding and output
layer. It covers the local layer spec without biases or QK norm; anything else (the TE spec
on GPU) decodes through megatron's own modules and static cache instead (see ``native.py``).

On CPU the products with weights of at least :data:`MIN_PACKED_ELEMENTS` go through oneDNN,
with the weights reordered once per batch into its blocked layout (:func:`pack_weight`). torch's
default CPU GEMM repacks the weight matrix on every call, which at a decoding step's few rows
costs more than the arithmetic: measured on bench-34m's shapes, batch 8, 2 AMD EPYC cores, 15.7 →
6.5 ms per step for the 33 products. On 2 Intel Xeon cores, where MKL is fast at few rows, they
still go from 4.3 to 3.1 ms, but the reordering wins only for the large weights (fc1 317 → 180 µs,
the output layer 902 → 442 µs) and loses for QKV, proj and fc2. The packed copies double the
weight memory while a batch decodes and are dropped by :meth:`CachedDecoder.release`; they are
rebuilt from the live parameters for every batch, so weights written in place (refit,
host-shared transport) are always the ones used. Rounding differs from the trainer's GEMM by the usual few
ulps of a different summation order (the rollout/trainer log-prob check bounds it).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from engine.parallel.cpu_linear import onednn_linear

#: Smaller weights stay with torch's GEMM: for them a oneDNN call costs more than the product
#: (batch 8, 2 cores: 512×64 takes 12 µs plain and 19 µs packed; 1024×256, 82 and 39 µs).
MIN_PACKED_ELEMENTS = 1 << 16


def pack_weight(weight: torch.Tensor) -> Optional[torch.Tensor]:
    """``weight [out, in]`` reordered for oneDNN's linear (CPU), or None where that is unavailable or not worth it."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available() \
            or weight.dtype not in (torch.float32, torch.bfloat16) or weight.numel() < MIN_PACKED_ELEMENTS:
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
    except (RuntimeError, AttributeError):  # a torch build without the op
        return None


def supports(model: Any) -> Optional[str]:
    """None when :class:`CachedDecoder` can run ``model``, else why not."""
    from engine.models.norm import LocalNorm

    config = model.config
    layer = model.decoder.layers[0]
    if not isinstance(layer.input_layernorm, LocalNorm):
        return "not the local layer spec"
    if config.add_bias_linear or config.add_qkv_bias or getattr(config, "qk_layernorm", False):
        return "linear biases or QK layernorm"
    if config.rotary_interleaved or config.apply_query_key_layer_scaling or model.position_embedding_type != "rope":
        return "a position or attention variant it does not implement"
    return None


class CachedDecoder:
    """Prefill and one-token decoding of a local-spec megatron ``GPTModel`` with a rotated-key cache."""

    def __init__(self, model: Any, tp_group: Any, tp_size: int, pack_weights: bool = True):
        self.model = model
        self.pack_weights = pack_weights
        self.config = model.config
        self.tp_group = tp_group if tp_size > 1 else None
        self.tp_size = tp_size
        attention = model.decoder.layers[0].self_attention
        self.head_dim = self.config.kv_channels
        self.groups = self.config.num_query_groups // tp_size
        self.heads = self.config.num_attention_heads // tp_size
        self.scale = attention.core_attention.softmax_scale
        self.gated = self.config.gated_linear_unit
        self.activation = self.config.activation_func
        self.cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._rotary: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self._packed: dict[int, torch.Tensor] = {}

    # -- cache -----------------------------------------------------------------------
    def allocate(self, batch: int, length: int) -> None:
        """Empty key/value caches ``[batch, groups, length, head_dim]`` per layer, and the rotary table."""
        weight = self.model.decoder.layers[0].self_attention.linear_qkv.weight
        shape = (batch, self.groups, length, self.head_dim)
        self.cache = [(weight.new_empty(shape), weight.new_empty(shape)) for _ in self.model.decoder.layers]
        freqs = self.model.rotary_pos_emb(length)  # [length, 1, 1, rotary dim]
        self._rotary = (torch.cos(freqs).to(weight.dtype).view(length, -1), torch.sin(freqs).to(weight.dtype).view(length, -1))
        self._pack()

    def _weights(self) -> list[torch.Tensor]:
        """Every weight the decoder multiplies by (the embedding's only when it is also the output layer)."""
        out = [self._output_weight()]
        for layer in self.model.decoder.layers:
            attention, mlp = layer.self_attention, layer.mlp
            out += [attention.linear_qkv.weight, attention.linear_proj.weight, mlp.linear_fc1.weight,
                    mlp.linear_fc2.weight]
        return out

    def _pack(self) -> None:
        """oneDNN copies of the current weights (see the module docstring); none when packing is off or unavailable."""
        self._packed = {}
        if not self.pack_weights:
            return
        for weight in self._weights():
            packed = pack_weight(weight)
            if packed is not None:
                self._packed[id(weight)] = packed

    def packed_bytes(self) -> int:
        """Bytes of the packed weight copies held now (0 when every product uses the parameters directly)."""
        return sum(w.numel() * w.element_size() for w in self._weights() if id(w) in self._packed)

    def _linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        packed = self._packed.get(id(weight))
        return F.linear(x, weight) if packed is None else onednn_linear(x, packed)

    def _output_weight(self) -> torch.Tensor:
        if self.model.share_embeddings_and_output_weights:
            return self.model.shared_embedding_or_output_weight()
        return self.model.output_layer.weight

    def cache_bytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.cache)

    def release(self) -> None:
        self.cache, self._rotary, self._packed = [], None, {}

    # -- forward ---------------------------------------------------------------------
    def _rotate(self, t: torch.Tensor, start: int) -> torch.Tensor:
        """Rotary embedding of ``t [batch, heads, seq, head_dim]`` at positions ``start..``, megatron's rotate-half form."""
        assert self._rotary is not None
        cos, sin = (x[start: start + t.shape[2]] for x in self._rotary)
        rot = cos.shape[-1]
        part = t[..., :rot]
        first, second = torch.chunk(part, 2, dim=-1)
        out = part * cos + torch.cat((-second, first), dim=-1) * sin
        return out if rot == t.shape[-1] else torch.cat((out, t[..., rot:]), dim=-1)

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_group is not None:
            dist.all_reduce(x, group=self.tp_group)
        return x

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        weight = self.model.embedding.word_embeddings.weight
        if self.tp_group is None:
            return F.embedding(tokens, weight)
        start = dist.get_rank(self.tp_group) * weight.shape[0]
        local = tokens - start
        outside = (local < 0) | (local >= weight.shape[0])
        hidden = F.embedding(local.masked_fill(outside, 0), weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return self._reduce(hidden)

    def _attention(self, layer: Any, x: torch.Tensor, index: int, start: int) -> torch.Tensor:
        batch, seq, _ = x.shape
        attention = layer.self_attention
        qkv = self._linear(x, attention.linear_qkv.weight).view(batch, seq, self.groups, -1, self.head_dim)
        per_group = self.heads // self.groups
        query = qkv[:, :, :, :per_group].reshape(batch, seq, self.heads, self.head_dim).transpose(1, 2)
        key = qkv[:, :, :, per_group].transpose(1, 2)
        value = qkv[:, :, :, per_group + 1].transpose(1, 2)
        keys, values = self.cache[index]
        keys[:, :, start: start + seq] = self._rotate(key, start)
        values[:, :, start: start + seq] = value
        end = start + seq
        query = self._rotate(query, start)
        if seq == 1:  # one new token: two batched products per KV group beat SDPA's small-query path on CPU
            grouped = query.view(batch, self.groups, per_group, self.head_dim)
            scores = torch.matmul(grouped, keys[:, :, :end].transpose(-1, -2)).mul_(self.scale)
            out = torch.matmul(scores.softmax(-1), values[:, :, :end]).view(batch, 1, self.heads * self.head_dim)
        else:
            mask = torch.ones(seq, end, dtype=torch.bool, device=x.device).tril(diagonal=start)
            out = F.scaled_dot_product_attention(query, keys[:, :, :end], values[:, :, :end], attn_mask=mask,
                                                 scale=self.scale, enable_gqa=self.heads != self.groups)
            out = out.transpose(1, 2).reshape(batch, seq, self.heads * self.head_dim)
        return self._reduce(self._linear(out, attention.linear_proj.weight))

    def _mlp(self, mlp: Any, x: torch.Tensor) -> torch.Tensor:
        hidden = self._linear(x, mlp.linear_fc1.weight)
        if self.gated:
            gate, up = torch.chunk(hidden, 2, dim=-1)
            hidden = self.activation(gate) * up
        else:
            hidden = self.activation(hidden)
        return self._reduce(self._linear(hidden, mlp.linear_fc2.weight))

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """Full-vocabulary fp32 logits ``[batch, vocab]`` at the last of ``tokens [batch, seq]`` (positions ``start..``)."""
        x = self._embed(tokens)
        for index, layer in enumerate(self.model.decoder.layers):
            x = x + self._attention(layer, layer.input_layernorm(x), index, start)
            x = x + self._mlp(layer.mlp, layer.pre_mlp_layernorm(x))
        last = self.model.decoder.final_layernorm(x[:, -1])
        logits = self._linear(last, self._output_weight()).float()
        if self.tp_group is None:
            return logits
        parts = [torch.empty_like(logits) for _ in range(self.tp_size)]
        dist.all_gather(parts, logits, group=self.tp_group)
        return torch.cat(parts, dim=-1)
