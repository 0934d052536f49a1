"""``gguf-to-keel``: a llama.cpp GGUF file (Llama architecture) -> Keel checkpoint.

Every tensor is dequantised to fp32 with the ``gguf`` package (Q4_0/Q4_1/Q8_0/K-quants/F16/
F32...). llama.cpp's converter permutes the rows of ``attn_q``/``attn_k`` so that rotary
embeddings act on adjacent pairs; :func:`unpermute_rotary` undoes that to get back the
rotate-half layout transformers and megatron use. The GGUF metadata (``llama.*``) must
match the Keel preset; then the tensors take the Hugging Face path
(:func:`engine.convert.hf.write_keel_checkpoint`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from engine.config import ConfigError
from engine.models.presets import ModelPreset

logger = logging.getLogger(__name__)

_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return None
    value = field.parts[field.data[0]]
    if field.types and field.types[0].name == "STRING":
        return bytes(value).decode()
    return value.tolist()[0] if len(value) == 1 else value.tolist()


def read_gguf(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(metadata of interest, tensors dequantised to fp32 in PyTorch's [rows, cols] order)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from engine.data.gguf_tokenizer import gguf_header

    if not Path(path).is_file():
        raise ConfigError(f"{path}: no such file; pass a llama.cpp .gguf model file")
    gguf_header(str(path))  # a one-line error for a file that is not GGUF (the reader's is a traceback)
    reader = GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ConfigError(f"{path}: general.architecture={arch!r}; only 'llama' GGUF files convert")
    keys = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count",
            "attention.head_count_kv", "rope.freq_base", "attention.layer_norm_rms_epsilon", "vocab_size")
    meta = {key: _field(reader, f"llama.{key}") for key in keys}
    scaling = _field(reader, "llama.rope.scaling.type")
    if scaling not in (None, "none") or any(t.name == "rope_freqs.weight" for t in reader.tensors):
        # llama.cpp writes Llama 3.1's frequency factors as a tensor that no Keel weight takes: dropped, the
        # converted model would rotate positions at other frequencies than the original
        raise ConfigError(f"{path}: RoPE scaling ({scaling or 'rope_freqs.weight, Llama 3.1-style'}): gguf-to-keel "
                          "reads unscaled Llama models only; convert the Hugging Face model with hf-to-keel, "
                          "which reads Llama 3.x scaling")
    tensors = {t.name: np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32) for t in reader.tensors}
    if meta["vocab_size"] is None:
        meta["vocab_size"] = tensors["token_embd.weight"].shape[0]
    return meta, tensors


def unpermute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's ``permute``: adjacent-pair rotary rows -> rotate-half rows, per head."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _metadata_diffs(meta: dict[str, Any], tied: bool, preset: ModelPreset) -> list[str]:
    expected = {
        "block_count": preset.num_layers, "embedding_length": preset.hidden_size,
        "feed_forward_length": preset.ffn_hidden_size, "attention.head_count": preset.num_attention_heads,
        "attention.head_count_kv": preset.num_query_groups, "rope.freq_base": float(preset.rotary_base),
        "attention.layer_norm_rms_epsilon": preset.layernorm_epsilon, "vocab_size": preset.vocab_size,
    }
    diffs = [f"llama.{k}: gguf {meta.get(k)!r} vs preset {v!r}" for k, v in expected.items()
             if meta.get(k) is None or not np.isclose(float(meta[k]), float(v), rtol=1e-6)]
    if tied != preset.tie_embeddings:
        diffs.append(f"tied embeddings: gguf {tied} vs preset {preset.tie_embeddings}")
    return diffs


def check_gguf_metadata(meta: dict[str, Any], tied: bool, preset: ModelPreset) -> None:
    from engine.convert.llama import is_nemotron

    if is_nemotron(preset):
        raise ConfigError(f"model.preset={preset.name} is Nemotron-shaped; GGUF conversion reads Llama models only")
    diffs = _metadata_diffs(meta, tied, preset)
    if diffs:
        raise ConfigError(f"the GGUF file does not match model preset {preset.name} ({'; '.join(diffs)}); "
                          "pick the matching model.preset and model.* overrides")


def matching_preset(meta: dict[str, Any], tied: bool) -> Optional[str]:
    """The first Llama preset whose shape is the GGUF file's, if any (used when no model.preset is given)."""
    from engine.convert.llama import is_nemotron
    from engine.models.presets import PRESETS

    for name, preset in PRESETS.items():
        if not is_nemotron(preset) and not _metadata_diffs(meta, tied, preset):
            return name
    return None


def gguf_to_hf_state(meta: dict[str, Any], tensors: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """GGUF tensor names and layouts -> transformers Llama names (fp32)."""
    heads, kv_heads = int(meta["attention.head_count"]), int(meta["attention.head_count_kv"])
    out: dict[str, torch.Tensor] = {}
    for name, array in tensors.items():
        tensor = torch.from_numpy(array.copy())
        if name == "token_embd.weight":
            out["model.embed_tokens.weight"] = tensor
        elif name == "output_norm.weight":
            out["model.norm.weight"] = tensor
        elif name == "output.weight":
            out["lm_head.weight"] = tensor
        elif name.startswith("blk."):
            _, index, kind, _ = name.split(".", 3)
            if kind not in _LAYER_NAMES:
                raise ConfigError(f"GGUF tensor {name} has no Llama counterpart")
            if kind == "attn_q":
                tensor = unpermute_rotary(tensor, heads)
            elif kind == "attn_k":
                tensor = unpermute_rotary(tensor, kv_heads)
            out[f"model.layers.{index}.{_LAYER_NAMES[kind]}.weight"] = tensor
    return out


def gguf_to_keel(gguf_path: str | Path, out_dir: str | Path, overrides: Optional[list[str]] = None) -> Path:
    """Convert a Llama-architecture GGUF file into a Keel checkpoint under ``out_dir``."""
    from engine.config import TrainConfig, load_config
    from engine.convert.hf import write_keel_checkpoint
    from engine.convert.hf_tokenizer import tokenizer_override
    from engine.models.presets import resolve_preset

    # the file carries its tokenizer and chat template: runs from this checkpoint use them (engine.checkpoint.inherit)
    overrides = tokenizer_override(list(overrides or []), str(Path(gguf_path).resolve()))
    meta, tensors = read_gguf(gguf_path)
    if not any(item.startswith("model.") for item in overrides):
        preset = matching_preset(meta, "output.weight" not in tensors)
        if preset:
            logger.info("%s has the shape of preset %s", gguf_path, preset)
            overrides.append(f"model.preset={preset}")
    check_gguf_metadata(meta, "output.weight" not in tensors,
                        resolve_preset(load_config(TrainConfig, None, overrides).model))
    return write_keel_checkpoint(gguf_to_hf_state(meta, tensors), out_dir, overrides, source=str(gguf_path))
