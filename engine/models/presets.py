"""Model presets: declarative shapes, no parallel logic.

A :class:`ModelPreset` is the architecture of a decoder-only transformer; the builder
turns it into a megatron-core ``TransformerConfig`` plus a layer spec. Full-size
presets carry the published shapes (Llama-3, Nemotron-4); ``tiny-*`` presets have
the same structure at toy size for CPU tests.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from engine.errors import ConfigError


@dataclass(frozen=True)
class ModelPreset:
    name: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    vocab_size: int
    max_sequence_length: int
    normalization: str = "RMSNorm"  # or "LayerNorm"
    activation: str = "swiglu"  # "swiglu" | "squared_relu" | "gelu"
    add_bias_linear: bool = False
    tie_embeddings: bool = False
    rotary_base: int = 10000
    rotary_percent: float = 1.0
    layernorm_epsilon: float = 1e-5
    zero_centered_gamma: bool = False
    rope_scaling_factor: Optional[float] = None  # Llama 3.x frequency scaling (megatron's rope_scaling), None: off

    @property
    def gated(self) -> bool:
        return self.activation == "swiglu"

    @property
    def kv_channels(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def parameter_count(self) -> int:
        """Analytic parameter count (must match the built model; see tests)."""
        h, f, v = self.hidden_size, self.ffn_hidden_size, self.vocab_size
        head = self.kv_channels
        qkv_out = (self.num_attention_heads + 2 * self.num_query_groups) * head
        attn = h * qkv_out + self.num_attention_heads * head * h
        mlp = h * f * (2 if self.gated else 1) + f * h
        norm = h if self.normalization == "RMSNorm" else 2 * h
        bias = 0
        if self.add_bias_linear:
            bias = qkv_out + h + f * (2 if self.gated else 1) + h
        per_layer = attn + mlp + 2 * norm + bias
        embeddings = v * h * (1 if self.tie_embeddings else 2)
        return self.num_layers * per_layer + embeddings + norm

    def parameter_label(self) -> str:
        """The parameter count for people: ``"135.0M"``, ``"70.55B"``, ``"88.3K"`` (tiny presets printed 0.000B)."""
        return count_label(self.parameter_count())

    def non_embedding_parameter_count(self) -> int:
        return self.parameter_count() - self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)


_LLAMA = dict(normalization="RMSNorm", activation="swiglu", add_bias_linear=False)
_NEMOTRON = dict(
    normalization="LayerNorm", activation="squared_relu", add_bias_linear=False, tie_embeddings=False,
    rotary_percent=0.5, zero_centered_gamma=True,
)

PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in [
        ModelPreset("tiny-llama", 4, 64, 4, 2, 176, 512, 256, tie_embeddings=True, **_LLAMA),  # type: ignore[arg-type]
        ModelPreset(
            "tiny-nemotron", 4, 64, 4, 2, 256, 512, 256,
            normalization="LayerNorm", activation="squared_relu", tie_embeddings=False,
        ),
        ModelPreset("bench-34m", 8, 512, 8, 4, 1536, 8192, 1024, **_LLAMA),  # type: ignore[arg-type]
        # ~125M, heads and KV heads divisible by 2 and 4: multi-rank benchmarks (refit) on CPU
        ModelPreset("bench-125m", 12, 768, 12, 4, 2048, 32000, 1024, **_LLAMA),  # type: ignore[arg-type]
        ModelPreset("bench-1b", 24, 2048, 16, 8, 5632, 32000, 2048, **_LLAMA),  # type: ignore[arg-type]
        ModelPreset(
            "smollm2-135m", 30, 576, 9, 3, 1536, 49152, 8192, tie_embeddings=True, rotary_base=100000,
            **_LLAMA,  # type: ignore[arg-type]
        ),
        ModelPreset("llama3-8b", 32, 4096, 32, 8, 14336, 128256, 8192, rotary_base=500000, **_LLAMA),  # type: ignore[arg-type]
        ModelPreset("llama3-70b", 80, 8192, 64, 8, 28672, 128256, 8192, rotary_base=500000, **_LLAMA),  # type: ignore[arg-type]
        ModelPreset("nemotron4-15b", 32, 6144, 48, 8, 24576, 256000, 4096, **_NEMOTRON),  # type: ignore[arg-type]
        ModelPreset("nemotron4-340b", 96, 18432, 96, 8, 73728, 256000, 4096, **_NEMOTRON),  # type: ignore[arg-type]
    ]
}

_OVERRIDABLE = (
    "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size", "vocab_size",
    "max_sequence_length", "rotary_base", "layernorm_epsilon", "tie_embeddings", "rope_scaling_factor",
)


def resolve_preset(model_config: Any) -> ModelPreset:
    """The preset named by ``model.preset`` with any ``model.<shape>`` overrides applied."""
    name = model_config.preset
    if name not in PRESETS:
        raise ConfigError(f"model.preset={name!r} is unknown; choose one of {', '.join(PRESETS)}")
    preset = PRESETS[name]
    changes = {k: getattr(model_config, k) for k in _OVERRIDABLE if getattr(model_config, k, None) is not None}
    if isinstance(changes.get("rotary_base"), float) and changes["rotary_base"].is_integer():
        changes["rotary_base"] = int(changes["rotary_base"])  # as the presets write it
    if changes:
        preset = dataclasses.replace(preset, **changes)
    if preset.hidden_size % preset.num_attention_heads:
        raise ConfigError(
            f"model: hidden_size={preset.hidden_size} is not divisible by num_attention_heads={preset.num_attention_heads}"
        )
    if preset.num_attention_heads % preset.num_query_groups:
        raise ConfigError(
            f"model: num_attention_heads={preset.num_attention_heads} is not divisible by "
            f"num_query_groups={preset.num_query_groups}"
        )
    return preset


def count_label(count: int) -> str:
    """``count`` with a K/M/B suffix and three significant figures or more."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            value = count / scale
            return f"{value:.{2 if value < 10 else 1}f}{suffix}"
    return str(count)
