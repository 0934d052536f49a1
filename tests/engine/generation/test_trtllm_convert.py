"""Keel -> TensorRT-LLM conversion, on CPU, against TRT-LLM's Llama checkpoint layout.

The expected tensors are built here from the layout rules of TensorRT-LLM's Llama converter
(tensorrt_llm/models/llama/convert.py and models/convert_utils.py, around release 1.0): per rank,
[its block of query heads; its block of key heads; its block of value heads], where fewer KV heads
than ranks are first repeated in place (each head tp/kv times) and then cut into tp blocks;
``mlp.fc`` is the activated (gate_proj) half and ``mlp.gate`` the linear (up_proj) half; lm_head
is zero-padded to a multiple of tp. The megatron input is fused here with ``fuse_qkv`` from
per-head random blocks, so every row can be traced to its head.

The engine side (build, refit, generate on TensorRT-LLM) is not run here: there is no GPU and no
tensorrt_llm. The last tests only check the request/result plumbing against recording fakes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from engine.convert.llama import fuse_qkv
from engine.errors import ConfigError
from engine.generation import trtllm
from engine.generation.base import SamplingParams, backend_class
from engine.generation.trtllm import (
    TRTLLM_VERSION,
    TRTLLMBackend,
    TRTLLMOptions,
    megatron_to_trtllm,
    trtllm_checkpoint_config,
    write_trtllm_checkpoint,
)
from engine.models.presets import PRESETS, ModelPreset

ROOT = Path(__file__).resolve().parents[3]
BASE = dataclasses.replace(PRESETS["tiny-llama"], num_layers=2, num_attention_heads=8, num_query_groups=4,
                           tie_embeddings=False)


def shape(heads: int, groups: int, **changes: Any) -> ModelPreset:
    return dataclasses.replace(BASE, num_attention_heads=heads, num_query_groups=groups, **changes)


def make_state(preset: ModelPreset, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[int, dict[str, Any]]]:
    """A full megatron state dict of random tensors, and the per-head q/k/v and gate/up it was built from."""
    g = torch.Generator().manual_seed(seed)
    h, d, ffn, vocab = preset.hidden_size, preset.kv_channels, preset.ffn_hidden_size, preset.vocab_size

    def rand(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=g)

    state = {"embedding.word_embeddings.weight": rand(vocab, h), "decoder.final_layernorm.weight": rand(h)}
    parts: dict[int, dict[str, Any]] = {}
    for i in range(preset.num_layers):
        q = [rand(d, h) for _ in range(preset.num_attention_heads)]
        k = [rand(d, h) for _ in range(preset.num_query_groups)]
        v = [rand(d, h) for _ in range(preset.num_query_groups)]
        gate, up = rand(ffn, h), rand(ffn, h)
        parts[i] = {"q": q, "k": k, "v": v, "gate": gate, "up": up}
        src = f"decoder.layers.{i}."
        state[src + "self_attention.linear_qkv.weight"] = fuse_qkv(
            torch.cat(q), torch.cat(k), torch.cat(v), preset.num_attention_heads, preset.num_query_groups)
        state[src + "mlp.linear_fc1.weight"] = torch.cat([gate, up])  # megatron's SwiGLU fc1 is [gate; up]
        state[src + "self_attention.linear_proj.weight"] = rand(h, preset.num_attention_heads * d)
        state[src + "mlp.linear_fc2.weight"] = rand(h, ffn)
        state[src + "input_layernorm.weight"] = rand(h)
        state[src + "pre_mlp_layernorm.weight"] = rand(h)
    if not preset.tie_embeddings:
        state["output_layer.weight"] = rand(vocab, h)
    return state, parts


def expected_qkv(part: dict[str, Any], tp: int, rank: int) -> torch.Tensor:
    q, groups = torch.cat(part["q"]), len(part["k"])
    repeat = max(tp // groups, 1)  # fewer KV heads than ranks: each head repeated in place
    k = torch.cat([head for head in part["k"] for _ in range(repeat)])
    v = torch.cat([head for head in part["v"] for _ in range(repeat)])
    return torch.cat([q.chunk(tp)[rank], k.chunk(tp)[rank], v.chunk(tp)[rank]])


def convert(preset: ModelPreset, tp: int, state: dict[str, torch.Tensor] | None = None) -> list[dict[str, torch.Tensor]]:
    return megatron_to_trtllm(state if state is not None else make_state(preset)[0], preset, tp, dtype=torch.float32)


CASES = [(8, 4, 1), (8, 4, 2), (8, 4, 4), (8, 8, 2), (8, 8, 4), (8, 2, 4), (8, 2, 8), (8, 1, 4)]


@pytest.mark.parametrize("heads,groups,tp", CASES)
def test_qkv_rows_of_every_rank(heads: int, groups: int, tp: int) -> None:
    preset = shape(heads, groups)
    state, parts = make_state(preset)
    ranks = convert(preset, tp, state)
    assert len(ranks) == tp
    d = preset.kv_channels
    for rank, weights in enumerate(ranks):
        for i in range(preset.num_layers):
            qkv = weights[f"transformer.layers.{i}.attention.qkv.weight"]
            assert torch.equal(qkv, expected_qkv(parts[i], tp, rank)), (heads, groups, tp, rank, i)
            assert qkv.shape == ((heads // tp + 2 * max(groups // tp, 1)) * d, preset.hidden_size)


@pytest.mark.parametrize("groups,tp", [(2, 4), (2, 8), (1, 4)])
def test_kv_heads_replicated_when_ranks_outnumber_them(groups: int, tp: int) -> None:
    """Rank r holds KV head r // (tp / kv): each head on tp / kv consecutive ranks, beside its own query heads."""
    preset = shape(8, groups)
    state, parts = make_state(preset)
    d, per_rank = preset.kv_channels, 8 // tp
    for rank, weights in enumerate(convert(preset, tp, state)):
        qkv = weights["transformer.layers.0.attention.qkv.weight"]
        q, k, v = qkv[: per_rank * d], qkv[per_rank * d: (per_rank + 1) * d], qkv[(per_rank + 1) * d:]
        head = rank // (tp // groups)
        assert torch.equal(k, parts[0]["k"][head]) and torch.equal(v, parts[0]["v"][head])
        first_query = rank * per_rank
        assert first_query // (8 // groups) == head  # the query heads of this rank belong to that KV head
        assert torch.equal(q, torch.cat(parts[0]["q"][first_query: first_query + per_rank]))


def test_tp1_qkv_is_all_queries_then_keys_then_values() -> None:
    """TRT-LLM's layout, unlike megatron's per-group interleaving, puts every query head first."""
    state, parts = make_state(BASE)
    qkv = convert(BASE, 1, state)[0]["transformer.layers.1.attention.qkv.weight"]
    p = parts[1]
    assert torch.equal(qkv, torch.cat([*p["q"], *p["k"], *p["v"]]))
    assert not torch.equal(qkv, state["decoder.layers.1.self_attention.linear_qkv.weight"])


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_mlp_fc_is_gate_and_gate_is_up_and_row_parallel_splits(tp: int) -> None:
    state, parts = make_state(BASE)
    for rank, weights in enumerate(convert(BASE, tp, state)):
        for i in range(BASE.num_layers):
            dst, src = f"transformer.layers.{i}.", f"decoder.layers.{i}."
            assert torch.equal(weights[dst + "mlp.fc.weight"], parts[i]["gate"].chunk(tp)[rank])
            assert torch.equal(weights[dst + "mlp.gate.weight"], parts[i]["up"].chunk(tp)[rank])
            assert torch.equal(weights[dst + "mlp.proj.weight"], state[src + "mlp.linear_fc2.weight"].chunk(tp, 1)[rank])
            assert torch.equal(weights[dst + "attention.dense.weight"],
                               state[src + "self_attention.linear_proj.weight"].chunk(tp, 1)[rank])
            assert torch.equal(weights[dst + "input_layernorm.weight"], state[src + "input_layernorm.weight"])
            assert torch.equal(weights[dst + "post_layernorm.weight"], state[src + "pre_mlp_layernorm.weight"])


def test_names_are_the_trtllm_llama_checkpoint_names() -> None:
    layer = ["input_layernorm", "attention.qkv", "attention.dense", "post_layernorm", "mlp.fc", "mlp.gate", "mlp.proj"]
    expected = {"transformer.vocab_embedding.weight", "transformer.ln_f.weight", "lm_head.weight"}
    expected |= {f"transformer.layers.{i}.{name}.weight" for i in range(BASE.num_layers) for name in layer}
    for weights in megatron_to_trtllm(make_state(BASE)[0], BASE, 2):
        assert set(weights) == expected
        assert all(t.dtype == torch.bfloat16 for t in weights.values())  # the default engine dtype


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_lm_head_padded_to_a_multiple_of_tp(tp: int) -> None:
    preset = dataclasses.replace(BASE, vocab_size=509)
    state, _ = make_state(preset)
    padded = torch.cat([state["output_layer.weight"], torch.zeros(-509 % tp, preset.hidden_size)])
    for rank, weights in enumerate(convert(preset, tp, state)):
        assert torch.equal(weights["lm_head.weight"], padded.chunk(tp)[rank])
        assert weights["lm_head.weight"].shape[0] == -(-509 // tp)
        assert torch.equal(weights["transformer.vocab_embedding.weight"], state["embedding.word_embeddings.weight"])
        assert torch.equal(weights["transformer.ln_f.weight"], state["decoder.final_layernorm.weight"])
    if tp == 4:
        assert torch.count_nonzero(weights["lm_head.weight"][-3:]) == 0


def test_tied_embeddings_give_lm_head_from_the_embedding() -> None:
    preset = dataclasses.replace(BASE, tie_embeddings=True, vocab_size=510)
    state, _ = make_state(preset)
    assert "output_layer.weight" not in state
    embedding = state["embedding.word_embeddings.weight"]
    padded = torch.cat([embedding, torch.zeros(2, preset.hidden_size)])
    for rank, weights in enumerate(convert(preset, 4, state)):
        assert torch.equal(weights["lm_head.weight"], padded.chunk(4)[rank])
        assert torch.equal(weights["transformer.vocab_embedding.weight"], embedding)
        assert weights["lm_head.weight"].data_ptr() != weights["transformer.vocab_embedding.weight"].data_ptr()


def test_zero_centred_gamma_is_shifted_to_gamma() -> None:
    preset = dataclasses.replace(BASE, zero_centered_gamma=True)
    state, _ = make_state(preset)
    weights = convert(preset, 2, state)[1]
    assert torch.allclose(weights["transformer.ln_f.weight"], state["decoder.final_layernorm.weight"] + 1)
    assert torch.allclose(weights["transformer.layers.1.post_layernorm.weight"],
                          state["decoder.layers.1.pre_mlp_layernorm.weight"] + 1)


def test_te_spec_names_and_extra_state_are_accepted() -> None:
    state, _ = make_state(BASE)
    te_state = dict(state)
    for i in range(BASE.num_layers):
        src = f"decoder.layers.{i}."
        te_state[src + "self_attention.linear_qkv.layer_norm_weight"] = te_state.pop(src + "input_layernorm.weight")
        te_state[src + "mlp.linear_fc1.layer_norm_weight"] = te_state.pop(src + "pre_mlp_layernorm.weight")
        te_state[src + "self_attention.core_attention._extra_state"] = torch.zeros(1)
    for ours, theirs in zip(convert(BASE, 2, state), convert(BASE, 2, te_state), strict=True):
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_missing_or_unknown_weights_are_named() -> None:
    state, _ = make_state(BASE)
    del state["decoder.layers.1.mlp.linear_fc2.weight"]
    state["decoder.layers.1.mlp.linear_fc3.weight"] = torch.zeros(1)
    with pytest.raises(ConfigError, match=r"missing \['decoder.layers.1.mlp.linear_fc2.weight'\].*linear_fc3"):
        convert(BASE, 1, state)


@pytest.mark.parametrize("preset,tp,message", [
    (shape(8, 4), 3, "num_attention_heads=8 is not divisible by tensor_parallel_size=3"),
    (shape(6, 3, hidden_size=48, ffn_hidden_size=192), 2, "num_query_groups=3 is not divisible"),
    (shape(6, 2, hidden_size=48, ffn_hidden_size=192), 3, "not a multiple of num_query_groups=2"),
    (shape(8, 4, ffn_hidden_size=170), 4, "ffn_hidden_size=170 is not divisible"),
    (shape(8, 4), 0, "must be >= 1"),
    (shape(8, 4, add_bias_linear=True), 1, "linear biases"),
    (shape(8, 4, activation="gelu"), 1, "need swiglu, RMSNorm"),
    (shape(8, 4, rope_scaling_factor=8.0), 1, "rope_scaling_factor=8.0 .*not written for TensorRT-LLM"),
    (PRESETS["tiny-nemotron"], 1, "Nemotron-shaped.*native generation backend"),
    (PRESETS["nemotron4-15b"], 8, "Nemotron-shaped"),
])
def test_unsupported_shapes_are_refused(preset: ModelPreset, tp: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        trtllm_checkpoint_config(preset, tp)


def test_config_json_fields() -> None:
    config = trtllm_checkpoint_config(PRESETS["llama3-8b"], 8)
    assert config["architecture"] == "LlamaForCausalLM" and config["dtype"] == "bfloat16"
    assert {k: config[k] for k in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size",
                                    "intermediate_size", "vocab_size", "max_position_embeddings", "head_size")} == {
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096,
        "intermediate_size": 14336, "vocab_size": 128256, "max_position_embeddings": 8192, "head_size": 128}
    assert config["rotary_base"] == 500000.0 and config["norm_epsilon"] == 1e-5
    assert config["hidden_act"] == "silu" and config["position_embedding_type"] == "rope_gpt_neox"
    assert config["mapping"] == {"world_size": 8, "tp_size": 8, "pp_size": 1}
    assert config["tie_word_embeddings"] is False
    assert trtllm_checkpoint_config(PRESETS["smollm2-135m"], 3, "float32")["tie_word_embeddings"] is True
    with pytest.raises(ConfigError, match="dtype='fp8'"):
        trtllm_checkpoint_config(PRESETS["llama3-8b"], 8, "fp8")


def test_checkpoint_directory_round_trip(tmp_path: Path) -> None:
    preset = dataclasses.replace(BASE, tie_embeddings=True)
    ranks = megatron_to_trtllm(make_state(preset)[0], preset, 2)
    path = write_trtllm_checkpoint(tmp_path / "ckpt", trtllm_checkpoint_config(preset, 2), ranks)
    assert json.loads((path / "config.json").read_text())["mapping"]["tp_size"] == 2
    for rank, weights in enumerate(ranks):
        loaded = load_file(str(path / f"rank{rank}.safetensors"))
        assert loaded.keys() == weights.keys() and all(torch.equal(loaded[k], weights[k]) for k in weights)


def test_dockerfile_pins_the_targeted_version() -> None:
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert re.search(r"^ARG TRTLLM_TAG=(\S+)$", dockerfile, re.M).group(1) == TRTLLM_VERSION  # type: ignore[union-attr]


def test_registry_and_module_import_do_not_import_tensorrt_llm() -> None:
    code = ("import sys, engine.generation.base as base, engine.generation.trtllm; "
            "assert base.backend_class('trtllm').__name__ == 'TRTLLMBackend'; "
            "assert 'tensorrt_llm' not in sys.modules, 'tensorrt_llm was imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_selecting_trtllm_without_tensorrt_llm_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)  # importing it now fails, installed or not
    with pytest.raises(ConfigError, match=rf"TensorRT-LLM {TRTLLM_VERSION}.*KEEL_FLAVOR=trtllm.*'native'"):
        backend_class("trtllm")(PRESETS["tiny-llama"])
    with pytest.raises(ConfigError, match="Nemotron-shaped"):  # the shape is checked before the import
        backend_class("trtllm")(PRESETS["tiny-nemotron"])


def test_options_are_validated() -> None:
    with pytest.raises(ConfigError, match="dtype='int4'.*max_batch_size=0.*kv_cache_fraction=1.5"):
        TRTLLMOptions(dtype="int4", max_batch_size=0, kv_cache_fraction=1.5)


class _Recorder:
    """Stands in for tensorrt_llm.bindings.executor: each class records its keyword arguments."""

    def __getattr__(self, name: str) -> Any:
        return lambda **kwargs: SimpleNamespace(kind=name, **kwargs)


def _backend(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> TRTLLMBackend:
    monkeypatch.setattr(trtllm, "import_tensorrt_llm", lambda: SimpleNamespace())
    return TRTLLMBackend(PRESETS["tiny-llama"], TRTLLMOptions(workdir=str(tmp_path)))


def test_requests_seed_each_row_and_map_greedy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Plumbing only (fake executor API): what would be sent to TensorRT-LLM for each row."""
    backend = _backend(monkeypatch, tmp_path)
    sampled = SamplingParams(max_new_tokens=300, temperature=0.7, top_k=5, top_p=0.9, seed=11, stop_token_ids=(2, 3))
    request = backend._request(_Recorder(), [5] * 10, sampled, row=4)
    assert request.input_token_ids == [5] * 10 and request.stop_words == [[2], [3]]
    assert request.max_tokens == 256 - 10  # capped by the preset's context of 256
    config = request.sampling_config
    assert (config.seed, config.top_k, config.top_p, config.temperature) == (15, 5, 0.9, 0.7)
    assert request.output_config.return_log_probs and request.output_config.exclude_input_from_output
    greedy = backend._request(_Recorder(), [1, 2], SamplingParams(max_new_tokens=8, max_length=6), row=0)
    assert (greedy.sampling_config.top_k, greedy.sampling_config.temperature, greedy.max_tokens) == (1, None, 4)
    assert greedy.stop_words is None


def test_results_become_rollouts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Plumbing only (fake results): new tokens, their log-probs, finish reasons, the raw-log-prob flag."""
    backend = _backend(monkeypatch, tmp_path)

    def result(tokens: list[int]) -> SimpleNamespace:
        return SimpleNamespace(output_token_ids=[tokens], log_probs=[[-0.5] * len(tokens)])

    rollouts = backend._rollouts([[1], [2]], SamplingParams(temperature=1.0, stop_token_ids=(9,)),
                                 [result([4, 9]), result([4, 5, 6])])
    assert rollouts.tokens == [[4, 9], [4, 5, 6]] and rollouts.finish_reasons == ["stop", "length"]
    assert rollouts.logprobs == [[-0.5, -0.5], [-0.5] * 3] and rollouts.stats["logprobs_raw"] == 1.0
    assert backend._rollouts([[1]], SamplingParams(), [result([3])]).stats["logprobs_raw"] == 0.0
