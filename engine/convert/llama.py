"""Llama-family tensor mapping: transformers ``LlamaForCausalLM`` / ``NemotronForCausalLM`` <-> megatron-core ``GPTModel``.

Both sides are full (unsharded, TP1/PP1) state dicts; resharding to a layout is
dist_checkpointing's job. megatron keeps

* ``linear_qkv`` as one matrix ordered *per query group*: for each of the ``g`` KV heads,
  its ``heads/g`` query heads, then its key head, then its value head (rows of ``head_dim``);
* ``linear_fc1`` as ``[gate; up]`` (SwiGLU computes ``silu(gate) * up``); Nemotron's squared-ReLU MLP
  has no gate, so ``linear_fc1`` is ``up_proj``;
* the final RMSNorm in ``decoder.final_layernorm`` and the LM head in ``output_layer``
  (absent with tied embeddings).

Rotary embeddings use the same rotate-half convention on both sides (also for partial rotary: both
rotate the first ``rotary_percent`` of each head), so q/k need no permutation.

The two families differ only in the MLP gate, the norm (RMSNorm vs LayerNorm with bias) and how
gamma is stored: HF Llama stores gamma, HF Nemotron (``NemotronLayerNorm1P``) stores gamma - 1, and
Keel stores gamma - 1 when the preset has ``zero_centered_gamma`` (else gamma). Where the two
differ the weight is shifted by 1 in fp32 (so for a non-zero-centred preset such as ``tiny-nemotron``
a round trip is exact only where ``w + 1`` is; otherwise it is off by fp32 rounding of gamma).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from engine.config import ConfigError
from engine.models.presets import ModelPreset

Tensor = torch.Tensor


def _layer(i: int) -> str:
    return f"decoder.layers.{i}."


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, heads: int, groups: int) -> Tensor:
    """HF q/k/v projections -> megatron ``linear_qkv`` (rows grouped per KV head)."""
    hidden = q.shape[1]
    head = q.shape[0] // heads
    per_group = heads // groups
    fused = torch.cat([q.reshape(groups, per_group * head, hidden), k.reshape(groups, head, hidden),
                       v.reshape(groups, head, hidden)], dim=1)
    return fused.reshape(-1, hidden)


def split_qkv(qkv: Tensor, heads: int, groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """megatron ``linear_qkv`` -> HF q, k, v projections."""
    hidden = qkv.shape[1]
    per_group = heads // groups
    head = qkv.shape[0] // (groups * (per_group + 2))
    grouped = qkv.reshape(groups, (per_group + 2) * head, hidden)
    q, k, v = torch.split(grouped, [per_group * head, head, head], dim=1)
    return q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)


def is_nemotron(preset: ModelPreset) -> bool:
    """Nemotron-shaped preset (LayerNorm, squared-ReLU MLP) rather than Llama-shaped (RMSNorm, SwiGLU)."""
    return preset.activation == "squared_relu"


def _check_preset(preset: ModelPreset) -> None:
    llama = preset.activation == "swiglu" and preset.normalization == "RMSNorm"
    nemotron = preset.activation == "squared_relu" and preset.normalization == "LayerNorm"
    if not (llama or nemotron) or preset.add_bias_linear:
        raise ConfigError(f"preset {preset.name} is neither Llama-shaped (SwiGLU, RMSNorm) nor Nemotron-shaped "
                          "(squared ReLU, LayerNorm), or has linear biases")


def _gamma_shift(preset: ModelPreset) -> int:
    """Keel norm weight = HF norm weight + shift (HF Nemotron stores gamma-1, Keel does when zero-centred)."""
    return int(is_nemotron(preset)) - int(preset.zero_centered_gamma)


def _norm_params(preset: ModelPreset) -> tuple[str, ...]:
    return ("weight", "bias") if preset.normalization == "LayerNorm" else ("weight",)


def _norm_pairs(preset: ModelPreset) -> list[tuple[str, str]]:
    """(HF name, megatron name) of every norm, without the ``.weight``/``.bias`` suffix."""
    pairs = [("model.norm", "decoder.final_layernorm")]
    for i in range(preset.num_layers):
        src, dst = f"model.layers.{i}.", _layer(i)
        pairs += [(src + "input_layernorm", dst + "input_layernorm"),
                  (src + "post_attention_layernorm", dst + "pre_mlp_layernorm")]
    return pairs


def _shifted(weight: Tensor, shift: int) -> Tensor:
    return weight if shift == 0 else (weight.float() + shift).to(weight.dtype)


def hf_to_megatron(hf: dict[str, Tensor], preset: ModelPreset) -> dict[str, Tensor]:
    """transformers Llama/Nemotron state dict -> megatron GPTModel state dict (local-spec names)."""
    _check_preset(preset)
    heads, groups, shift = preset.num_attention_heads, preset.num_query_groups, _gamma_shift(preset)
    out = {"embedding.word_embeddings.weight": hf["model.embed_tokens.weight"]}
    for hf_name, name in _norm_pairs(preset):
        for param in _norm_params(preset):
            value = hf[f"{hf_name}.{param}"]
            out[f"{name}.{param}"] = _shifted(value, shift) if param == "weight" else value
    for i in range(preset.num_layers):
        src, dst = f"model.layers.{i}.", _layer(i)
        out[dst + "self_attention.linear_qkv.weight"] = fuse_qkv(
            hf[src + "self_attn.q_proj.weight"], hf[src + "self_attn.k_proj.weight"],
            hf[src + "self_attn.v_proj.weight"], heads, groups,
        )
        out[dst + "self_attention.linear_proj.weight"] = hf[src + "self_attn.o_proj.weight"]
        up = hf[src + "mlp.up_proj.weight"]
        out[dst + "mlp.linear_fc1.weight"] = torch.cat([hf[src + "mlp.gate_proj.weight"], up]) if preset.gated else up
        out[dst + "mlp.linear_fc2.weight"] = hf[src + "mlp.down_proj.weight"]
    if not preset.tie_embeddings:
        out["output_layer.weight"] = hf["lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


class _Reads(dict):  # type: ignore[type-arg]
    """A state dict that records the names read from it."""

    def __init__(self, state: dict[str, Tensor]):
        super().__init__(state)
        self.read: set[str] = set()

    def __getitem__(self, name: str) -> Tensor:
        self.read.add(name)
        return super().__getitem__(name)  # type: ignore[no-any-return]


def hf_to_megatron_unread(hf: dict[str, Tensor], preset: ModelPreset) -> tuple[dict[str, Tensor], list[str]]:
    """:func:`hf_to_megatron`, and the weights of ``hf`` it did not read (biases, extra norms...): converted without
    them, the model would compute another function. One conversion: the names come from the reads it made."""
    reads = _Reads(hf)
    state = hf_to_megatron(reads, preset)
    unread = sorted(name for name in hf if name not in reads.read and not name.endswith("rotary_emb.inv_freq")
                    and not (name == "lm_head.weight" and preset.tie_embeddings))
    return state, unread


def megatron_to_hf(state: dict[str, Tensor], preset: ModelPreset) -> dict[str, Tensor]:
    """megatron GPTModel state dict (local- or TE-spec names) -> transformers Llama/Nemotron state dict."""
    _check_preset(preset)
    state = {k: v for k, v in state.items() if not k.endswith("_extra_state")}
    aliases = {f"self_attention.linear_qkv.layer_norm_{p}": f"input_layernorm.{p}" for p in ("weight", "bias")}
    aliases.update({f"mlp.linear_fc1.layer_norm_{p}": f"pre_mlp_layernorm.{p}" for p in ("weight", "bias")})
    for key in list(state):
        for te_name, local_name in aliases.items():
            if key.endswith(te_name):
                state[key[: -len(te_name)] + local_name] = state.pop(key)
    heads, groups, shift = preset.num_attention_heads, preset.num_query_groups, _gamma_shift(preset)
    out = {"model.embed_tokens.weight": state["embedding.word_embeddings.weight"]}
    for hf_name, name in _norm_pairs(preset):
        for param in _norm_params(preset):
            value = state[f"{name}.{param}"]
            out[f"{hf_name}.{param}"] = _shifted(value, -shift) if param == "weight" else value
    for i in range(preset.num_layers):
        src, dst = _layer(i), f"model.layers.{i}."
        q, k, v = split_qkv(state[src + "self_attention.linear_qkv.weight"], heads, groups)
        fc1 = state[src + "mlp.linear_fc1.weight"]
        if preset.gated:
            out[dst + "mlp.gate_proj.weight"], out[dst + "mlp.up_proj.weight"] = torch.chunk(fc1, 2, dim=0)
        else:
            out[dst + "mlp.up_proj.weight"] = fc1
        out.update({
            dst + "self_attn.q_proj.weight": q,
            dst + "self_attn.k_proj.weight": k,
            dst + "self_attn.v_proj.weight": v,
            dst + "self_attn.o_proj.weight": state[src + "self_attention.linear_proj.weight"],
            dst + "mlp.down_proj.weight": state[src + "mlp.linear_fc2.weight"],
        })
    if not preset.tie_embeddings:
        out["lm_head.weight"] = state["output_layer.weight"]
    return {k: v.contiguous() for k, v in out.items()}


_LLAMA_TYPES = ("llama", "mistral", "smollm", "smollm2")
# Llama 3.x RoPE scaling as megatron-core builds it (rotary_pos_embedding.py, RotaryEmbedding._apply_scaling)
LLAMA3_SCALING = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# config.json key -> the model.* setting that gives it (what a mismatch tells the user to set)
_OVERRIDE_OF = {
    "num_hidden_layers": "num_layers", "hidden_size": "hidden_size", "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_query_groups", "intermediate_size": "ffn_hidden_size", "vocab_size": "vocab_size",
    "tie_word_embeddings": "tie_embeddings", "rope_theta": "rotary_base", "rms_norm_eps": "layernorm_epsilon",
    "norm_eps": "layernorm_epsilon", "rope_scaling_factor": "rope_scaling_factor",
}


def hf_rope_scaling(hf_config: dict[str, Any]) -> Optional[float]:
    """The Llama 3.x RoPE scaling factor of a ``config.json`` (``rope_scaling``, or transformers 5's
    ``rope_parameters``), None without scaling; any other scaling is refused: converting it would give another
    model (positions rotated at other frequencies), with nothing said."""
    rope = hf_config.get("rope_scaling") or hf_config.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise ConfigError(f"config.json rope_scaling={rope!r}: expected an object")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in (None, "default"):
        return None
    if kind == "llama3":
        odd = {key: rope.get(key) for key, value in LLAMA3_SCALING.items()
               if rope.get(key) is None or float(rope[key]) != value}
        if not odd and float(rope.get("factor") or 0) > 1:
            return float(rope["factor"])
        raise ConfigError(f"config.json rope_scaling {rope}: Keel builds Llama 3 RoPE scaling with factor > 1, "
                          f"low_freq_factor 1, high_freq_factor 4 and 8192 original positions (as megatron-core "
                          f"does); this one differs ({odd or {'factor': rope.get('factor')}})")
    raise ConfigError(f"config.json rope_scaling rope_type={kind!r} is not supported: Keel builds RoPE without "
                      "scaling or with Llama 3.x's (rope_type 'llama3'); the converted model would place tokens "
                      "at other rotary frequencies than the original")


def _found_config(hf_config: dict[str, Any], nemotron: bool) -> dict[str, Any]:
    """``config.json`` with transformers' defaults filled in and the nested rope settings lifted out."""
    found = dict(hf_config)
    rope = found.get("rope_parameters") or found.get("rope_scaling") or {}
    if isinstance(rope, dict):  # transformers 5 nests these in rope_parameters
        for key in ("rope_theta", "partial_rotary_factor"):
            if key not in found and key in rope:
                found[key] = rope[key]
    found["rope_scaling_factor"] = hf_rope_scaling(found)
    if nemotron:
        found.setdefault("partial_rotary_factor", 0.5)  # transformers' NemotronConfig default
    found.setdefault("rope_theta", 10000.0)  # transformers' defaults (LlamaConfig, NemotronConfig)
    found.setdefault("norm_eps" if nemotron else "rms_norm_eps", 1e-5 if nemotron else 1e-6)
    found.setdefault("num_key_value_heads", found.get("num_attention_heads"))
    if found.get("head_dim") is None and found.get("num_attention_heads"):
        found["head_dim"] = found.get("hidden_size", 0) // found["num_attention_heads"]
    for key in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
        found.setdefault(key, False)
    found.setdefault("hidden_act", "relu2" if nemotron else "silu")  # transformers' defaults
    if not found.get("use_sliding_window", True):  # Qwen-style configs keep a window they do not use
        found["sliding_window"] = None
    return found


def check_hf_config(hf_config: dict[str, Any], preset: ModelPreset) -> None:
    """The HF ``config.json`` must describe the same architecture as the Keel preset."""
    _check_preset(preset)
    model_type = hf_config.get("model_type", "llama")
    wanted = "nemotron" if is_nemotron(preset) else "llama"
    if model_type not in (("nemotron",) if wanted == "nemotron" else _LLAMA_TYPES):
        raise ConfigError(f"config.json model_type={model_type!r} does not match model preset {preset.name} "
                          f"(a {wanted}-family preset; only Llama-family and Nemotron models convert)")
    expected: dict[str, Any] = {
        "num_hidden_layers": preset.num_layers, "hidden_size": preset.hidden_size,
        "num_attention_heads": preset.num_attention_heads, "intermediate_size": preset.ffn_hidden_size,
        "vocab_size": preset.vocab_size, "tie_word_embeddings": preset.tie_embeddings,
        "num_key_value_heads": preset.num_query_groups, "rope_theta": float(preset.rotary_base),
        "head_dim": preset.kv_channels, "rope_scaling_factor": preset.rope_scaling_factor,
    }
    found = _found_config(hf_config, wanted == "nemotron")
    if wanted == "nemotron":
        expected.update({"norm_eps": preset.layernorm_epsilon, "partial_rotary_factor": preset.rotary_percent,
                         "hidden_act": "relu2", "attention_bias": False, "mlp_bias": False})
    else:  # what Keel's Llama builds: SwiGLU, no biases, full causal attention
        expected.update({"rms_norm_eps": preset.layernorm_epsilon, "hidden_act": "silu", "attention_bias": False,
                         "mlp_bias": False, "sliding_window": None})
    differing = [k for k, v in expected.items()
                 if (float(found[k]) != float(v) if isinstance(v, float) and found.get(k) is not None
                     else found.get(k) != v)]
    if differing:
        diffs = [f"{k}: config.json {found.get(k)!r} vs preset {expected[k]!r}" for k in differing]
        unbuilt = [f"{k}={found.get(k)!r}" for k in differing if k not in _OVERRIDE_OF]
        settings = [f"model.{_OVERRIDE_OF[k]}={'null' if found.get(k) is None else found.get(k)}" for k in differing
                    if k in _OVERRIDE_OF]
        remedy = (f"Keel does not build {', '.join(unbuilt)} in a {wanted}-family model: this one does not convert"
                  if unbuilt else f"set {' '.join(settings)}")
        raise ConfigError(f"config.json does not match model preset {preset.name} ({'; '.join(diffs)}); {remedy}")


def hf_model_overrides(hf_config: dict[str, Any]) -> list[str]:
    """``model.*`` settings that build the model ``config.json`` describes on its family's preset (Llama 3 or
    Nemotron-4) with every shape, RoPE and norm setting taken from the file."""
    nemotron = hf_config.get("model_type") == "nemotron"
    found = _found_config(hf_config, nemotron)
    values = {"preset": "nemotron4-15b" if nemotron else "llama3-8b", "num_layers": found.get("num_hidden_layers"),
              "hidden_size": found.get("hidden_size"), "num_attention_heads": found.get("num_attention_heads"),
              "num_query_groups": found.get("num_key_value_heads"), "ffn_hidden_size": found.get("intermediate_size"),
              "vocab_size": found.get("vocab_size"), "max_sequence_length": found.get("max_position_embeddings"),
              "rotary_base": found.get("rope_theta"),
              "layernorm_epsilon": found.get("norm_eps" if nemotron else "rms_norm_eps"),
              "tie_embeddings": found.get("tie_word_embeddings"), "rope_scaling_factor": found.get("rope_scaling_factor")}
    return [f"model.{key}={value}" for key, value in values.items() if value is not None]


def hf_config_for(preset: ModelPreset) -> dict[str, Any]:
    """A transformers ``LlamaConfig`` or ``NemotronConfig`` dict for the preset (what keel-to-hf writes as
    config.json)."""
    _check_preset(preset)
    common = {
        "num_hidden_layers": preset.num_layers, "hidden_size": preset.hidden_size,
        "num_attention_heads": preset.num_attention_heads, "num_key_value_heads": preset.num_query_groups,
        "intermediate_size": preset.ffn_hidden_size, "vocab_size": preset.vocab_size,
        "max_position_embeddings": preset.max_sequence_length, "rope_theta": float(preset.rotary_base),
        "tie_word_embeddings": preset.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "torch_dtype": "float32", "head_dim": preset.kv_channels,
    }
    if preset.rope_scaling_factor is not None:
        common["rope_scaling"] = {"rope_type": "llama3", "factor": float(preset.rope_scaling_factor), **LLAMA3_SCALING}
    if is_nemotron(preset):
        return {"architectures": ["NemotronForCausalLM"], "model_type": "nemotron", **common,
                "norm_eps": preset.layernorm_epsilon, "partial_rotary_factor": preset.rotary_percent,
                "hidden_act": "relu2"}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **common,
            "rms_norm_eps": preset.layernorm_epsilon, "hidden_act": "silu"}
