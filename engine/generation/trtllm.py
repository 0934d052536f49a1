"""TensorRT-LLM generation backend: Keel weights -> TRT-LLM checkpoint -> engine -> rollouts.

Two halves, with different standing:

* **The conversion** (:func:`megatron_to_trtllm`, :func:`trtllm_checkpoint_config`,
  :func:`write_trtllm_checkpoint`) is pure tensor code and is unit-tested on CPU
  (``tests/engine/generation/test_trtllm_convert.py``). It turns a full (unsharded, TP1,
  global-name) megatron ``GPTModel`` state dict of a Llama-shaped preset (SwiGLU, RMSNorm)
  into one dict of TRT-LLM checkpoint tensors per TRT-LLM tensor-parallel rank, plus the
  checkpoint's ``config.json``.
* **The engine side** (:class:`TRTLLMBackend`: build or refit an engine, generate, release)
  has NOT been run: these machines have no GPU and no ``tensorrt_llm``. It is written
  against the TensorRT-LLM sources named below and imports ``tensorrt_llm`` only when a
  backend is constructed, so importing this module never imports TensorRT-LLM.

Nemotron-shaped presets (squared-ReLU MLP, LayerNorm with zero-centred gamma) are refused:
TensorRT-LLM runs ``NemotronForCausalLM`` through its GPT model, not its Llama model, and
this adapter maps only the Llama model's names and layout.

Target: TensorRT-LLM :data:`TRTLLM_VERSION` (``docker/Dockerfile``'s ``TRTLLM_TAG``). The
layout rules were read from NVIDIA/TensorRT-LLM sources around that release (stored
snapshots of the main branch; ``tensorrt_llm/version.py`` at commit 000a01d reads
1.0.0rc4); each rule below names the file and commit it came from. Where the code says
"[name]", the source is:

* [llama-convert] tensorrt_llm/models/llama/convert.py @ 04a2cac (load_weights_from_hf_model,
  get_prefix_and_param_name_map, QkvWeightHelper, load_weights_from_hf_by_shard)
* [convert-utils] tensorrt_llm/models/convert_utils.py @ 0396172 (split, dup_kv_weight, split_qkv_tp)
* [mlp] tensorrt_llm/layers/mlp.py @ 04a2cac (GatedMLP.forward)
* [llama-model] tensorrt_llm/models/llama/model.py @ 027cd51 (module names, lm_head of padded vocab)
* [llama-config] tensorrt_llm/models/llama/config.py @ 04100fd (LLaMAConfig.from_hugging_face)
* [modeling-utils] tensorrt_llm/models/modeling_utils.py @ 01ea6d7 (PretrainedConfig, PretrainedModel.from_checkpoint)
* [utils] tensorrt_llm/_utils.py @ 000a01d (pad_vocab_size)
* [model-map] tensorrt_llm/models/__init__.py @ b57221b (MODEL_MAP)
* [builder] tensorrt_llm/builder.py @ 008b2b8 (BuildConfig.use_refit, build, Engine.save, EngineConfig)
* [refit] tensorrt_llm/commands/refit.py @ 548b5b7 (refit of engines on disk from a checkpoint)
* [runner] tensorrt_llm/runtime/model_runner_cpp.py @ 0383291 (ModelRunnerCpp.from_dir, executor
  Request / SamplingConfig / OutputConfig, await_responses)
* [logprobs] NVIDIA/TensorRT-LLM pull request 12514 (the TensorRT backend's output log-probs are of
  the temperature-adjusted distribution)
"""

from __future__ import annotations

import importlib
import json
import logging
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from engine.convert.llama import is_nemotron, split_qkv
from engine.errors import ConfigError
from engine.generation.base import Rollouts, SamplingParams, check_prompts
from engine.models.presets import ModelPreset

logger = logging.getLogger(__name__)

Tensor = torch.Tensor

TRTLLM_VERSION = "1.0.0"
"""The TensorRT-LLM release this adapter targets; docker/Dockerfile's TRTLLM_TAG must match."""

TRTLLM_IMAGE = f"tensorrt-llm/release:{TRTLLM_VERSION}"
"""The NGC TensorRT-LLM release image (repository and tag) Keel's ``trtllm`` flavour builds on."""

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# TE-spec names of the norms fused into the following linear layer -> local-spec names.
_TE_NORM_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


# --------------------------------------------------------------------------------------
# Shape checks


def check_trtllm_shape(preset: ModelPreset, tensor_parallel_size: int) -> None:
    """Refuse, with what to change, presets and TP sizes the TRT-LLM Llama layout cannot hold."""
    if is_nemotron(preset):
        raise ConfigError(
            f"preset {preset.name} is Nemotron-shaped (squared-ReLU MLP, LayerNorm with zero-centred gamma); the "
            "trtllm generation backend converts only Llama-shaped presets (SwiGLU, RMSNorm). TensorRT-LLM runs "
            "NemotronForCausalLM through its GPT model, whose names and layout this adapter does not map; use the "
            "native generation backend for this preset")
    problems = []
    if preset.activation != "swiglu" or preset.normalization != "RMSNorm":
        problems.append(f"activation={preset.activation}, normalization={preset.normalization} (need swiglu, RMSNorm)")
    if preset.add_bias_linear:
        problems.append("linear biases (add_bias_linear=True) are not mapped")
    if preset.rotary_percent != 1.0:
        problems.append(f"rotary_percent={preset.rotary_percent} (the Llama layout rotates whole heads)")
    if preset.rope_scaling_factor is not None:  # config.json's rotary_scaling is written None: not checked with one
        problems.append(f"rope_scaling_factor={preset.rope_scaling_factor} (Llama 3.x RoPE scaling is not written "
                        "for TensorRT-LLM; the native backend generates with it)")
    problems += _tensor_parallel_problems(preset, tensor_parallel_size)
    if problems:
        raise ConfigError(f"trtllm backend cannot convert preset {preset.name} at tensor_parallel_size="
                          f"{tensor_parallel_size}: " + "; ".join(problems))


def _tensor_parallel_problems(preset: ModelPreset, tp: int) -> list[str]:
    if tp < 1:
        return [f"tensor_parallel_size must be >= 1, not {tp}"]
    heads, groups, problems = preset.num_attention_heads, preset.num_query_groups, []
    # Query heads and the FFN are cut into tp equal row blocks ([convert-utils] split = torch.chunk).
    if heads % tp:
        problems.append(f"num_attention_heads={heads} is not divisible by tensor_parallel_size={tp}")
    if preset.ffn_hidden_size % tp:
        problems.append(f"ffn_hidden_size={preset.ffn_hidden_size} is not divisible by tensor_parallel_size={tp}")
    # KV heads: split evenly when there are at least tp of them; when fewer, each is copied to
    # tp / kv_heads consecutive ranks, which needs tp % kv_heads == 0 ([llama-convert]
    # load_weights_from_hf_model: "duplicate the KV heads up to tensor_parallel";
    # [convert-utils] dup_kv_weight asserts tp_size % num_head == 0).
    if groups >= tp and groups % tp:
        problems.append(f"num_query_groups={groups} is not divisible by tensor_parallel_size={tp}")
    if groups < tp and tp % groups:
        problems.append(f"tensor_parallel_size={tp} is not a multiple of num_query_groups={groups} "
                        "(KV heads are replicated only a whole number of times)")
    return problems


# --------------------------------------------------------------------------------------
# config.json


def trtllm_checkpoint_config(preset: ModelPreset, tensor_parallel_size: int = 1,
                             dtype: str = "bfloat16") -> dict[str, Any]:
    """The TRT-LLM checkpoint ``config.json`` for a Llama-shaped preset at ``tensor_parallel_size``.

    Fields as ``LLaMAConfig.from_hugging_face`` fills them for an HF Llama ([llama-config]) and as
    ``PretrainedConfig`` reads them back ([modeling-utils]); pipeline parallelism is 1.
    """
    check_trtllm_shape(preset, tensor_parallel_size)
    if dtype not in DTYPES:
        raise ConfigError(f"trtllm dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    tp = tensor_parallel_size
    return {
        "architecture": "LlamaForCausalLM",
        "dtype": dtype,
        "logits_dtype": "float32",
        "vocab_size": preset.vocab_size,
        "hidden_size": preset.hidden_size,
        "num_hidden_layers": preset.num_layers,
        "num_attention_heads": preset.num_attention_heads,
        "num_key_value_heads": preset.num_query_groups,
        "head_size": preset.kv_channels,
        "intermediate_size": preset.ffn_hidden_size,
        "hidden_act": "silu",
        "norm_epsilon": preset.layernorm_epsilon,
        # Keel, HF and TRT-LLM's Llama all rotate halves of each head ([llama-config]: rope_gpt_neox).
        "position_embedding_type": "rope_gpt_neox",
        "max_position_embeddings": preset.max_sequence_length,
        "rotary_base": float(preset.rotary_base),
        "rotary_scaling": None,
        "tie_word_embeddings": preset.tie_embeddings,
        "mlp_bias": False,
        "attn_bias": False,
        "use_parallel_embedding": False,
        "embedding_sharding_dim": 0,
        "mapping": {"world_size": tp, "tp_size": tp, "pp_size": 1},
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
    }


# --------------------------------------------------------------------------------------
# Weights


def megatron_names(preset: ModelPreset) -> list[str]:
    """The local-spec megatron names of a Llama-shaped preset's full state dict."""
    names = ["embedding.word_embeddings.weight", "decoder.final_layernorm.weight"]
    for i in range(preset.num_layers):
        names += [f"decoder.layers.{i}.{suffix}" for suffix in (
            "input_layernorm.weight", "self_attention.linear_qkv.weight", "self_attention.linear_proj.weight",
            "pre_mlp_layernorm.weight", "mlp.linear_fc1.weight", "mlp.linear_fc2.weight")]
    if not preset.tie_embeddings:
        names.append("output_layer.weight")
    return names


def local_spec_state(named_tensors: Iterable[tuple[str, Tensor]], preset: ModelPreset) -> dict[str, Tensor]:
    """Collect (name, full tensor) pairs under local-spec names; TE-spec norm names are accepted and
    ``_extra_state`` entries dropped. Missing or unknown names are an error."""
    state: dict[str, Tensor] = {}
    for name, tensor in named_tensors:
        if name.endswith("_extra_state"):
            continue
        for te_name, local_name in _TE_NORM_ALIASES.items():
            if name.endswith(te_name):
                name = name[: -len(te_name)] + local_name
        state[name] = tensor
    wanted = megatron_names(preset)
    missing = [n for n in wanted if n not in state]
    unknown = sorted(set(state) - set(wanted))
    if missing or unknown:
        raise ConfigError(
            f"weights for the trtllm backend do not match preset {preset.name}: missing {missing[:5] or 'none'}"
            f"{' ...' if len(missing) > 5 else ''}; unknown {unknown[:5] or 'none'}{' ...' if len(unknown) > 5 else ''}"
            " (it takes the full, unsharded megatron GPTModel state dict)")
    return state


def _rows(tensor: Tensor, parts: int, index: int, dim: int = 0) -> Tensor:
    """Block ``index`` of ``parts`` equal blocks along ``dim`` ([convert-utils] split: torch.chunk)."""
    return torch.chunk(tensor, parts, dim=dim)[index]


def _query_and_kv_heads(preset: ModelPreset, tp: int, rank: int) -> tuple[range, range]:
    """Query heads and KV heads that TRT-LLM rank ``rank`` holds.

    Query heads: the rank's contiguous block of heads / tp. KV heads: the rank's block of kv / tp
    when kv >= tp; otherwise head rank // (tp / kv), because dup_kv_weight repeats each head
    tp / kv times in place before the rows are cut into tp blocks ([convert-utils] dup_kv_weight,
    [llama-convert] load_weights_from_hf_model and QkvWeightHelper.split_qkv_weights).
    """
    heads, groups = preset.num_attention_heads, preset.num_query_groups
    per_rank = heads // tp
    queries = range(rank * per_rank, (rank + 1) * per_rank)
    if groups >= tp:
        kv_per_rank = groups // tp
        return queries, range(rank * kv_per_rank, (rank + 1) * kv_per_rank)
    head = rank // (tp // groups)
    return queries, range(head, head + 1)


def _qkv_for_rank(qkv: Tensor, preset: ModelPreset, tp: int, rank: int) -> Tensor:
    """megatron ``linear_qkv`` (rows grouped per KV head) -> TRT-LLM ``attention.qkv`` of one rank:
    [this rank's query heads; its key heads; its value heads] ([llama-convert]: concat(wq, wk, wv)
    of the per-rank splits; with as many KV heads as query heads split_qkv_tp gives the same rows)."""
    q, k, v = split_qkv(qkv, preset.num_attention_heads, preset.num_query_groups)
    d = preset.kv_channels
    queries, kv_heads = _query_and_kv_heads(preset, tp, rank)
    return torch.cat([q[queries.start * d: queries.stop * d], k[kv_heads.start * d: kv_heads.stop * d],
                      v[kv_heads.start * d: kv_heads.stop * d]])


def _gamma(weight: Tensor, preset: ModelPreset) -> Tensor:
    """TRT-LLM's RmsNorm multiplies by gamma; Keel stores gamma - 1 when the preset is zero-centred."""
    return (weight.float() + 1).to(weight.dtype) if preset.zero_centered_gamma else weight


def _padded_vocab_rows(weight: Tensor, vocab: int, tp: int, rank: int) -> Tensor:
    """lm_head: rows padded with zeros to a multiple of tp ([utils] pad_vocab_size = ceil(v / tp) * tp;
    [llama-convert] pads lm_head, and the embedding copied to it when tied), then cut in tp blocks."""
    padded = -(-vocab // tp) * tp
    if padded != vocab:
        weight = F.pad(weight, (0, 0, 0, padded - vocab))
    return _rows(weight, tp, rank)


def _layer_for_rank(state: Mapping[str, Tensor], preset: ModelPreset, tp: int, rank: int,
                    layer: int) -> dict[str, Tensor]:
    src, dst = f"decoder.layers.{layer}.", f"transformer.layers.{layer}."
    ffn = preset.ffn_hidden_size
    fc1 = state[src + "mlp.linear_fc1.weight"]  # megatron: [gate; up], SwiGLU = silu(gate) * up
    # TRT-LLM's GatedMLP computes act(fc(x)) * gate(x) ([mlp]), so its "fc" is the activated half
    # (HF gate_proj) and its "gate" the linear half (HF up_proj) ([llama-convert]
    # get_prefix_and_param_name_map: "mlp.fc" <- gate_proj, "mlp.gate" <- up_proj).
    return {
        dst + "input_layernorm.weight": _gamma(state[src + "input_layernorm.weight"], preset),
        dst + "attention.qkv.weight": _qkv_for_rank(state[src + "self_attention.linear_qkv.weight"], preset, tp, rank),
        # Row-parallel layers are cut along their input dimension ([llama-convert] split dim=1).
        dst + "attention.dense.weight": _rows(state[src + "self_attention.linear_proj.weight"], tp, rank, dim=1),
        dst + "post_layernorm.weight": _gamma(state[src + "pre_mlp_layernorm.weight"], preset),
        dst + "mlp.fc.weight": _rows(fc1[:ffn], tp, rank),
        dst + "mlp.gate.weight": _rows(fc1[ffn:], tp, rank),
        dst + "mlp.proj.weight": _rows(state[src + "mlp.linear_fc2.weight"], tp, rank, dim=1),
    }


def trtllm_rank_weights(state: Mapping[str, Tensor], preset: ModelPreset, tensor_parallel_size: int, rank: int,
                        dtype: torch.dtype = torch.bfloat16) -> dict[str, Tensor]:
    """TRT-LLM checkpoint tensors of one TP rank (``rank{rank}.safetensors``) from a full megatron state.

    Names as in [llama-model] / [llama-convert]: ``transformer.vocab_embedding`` (whole, on every
    rank: use_parallel_embedding is off), ``transformer.layers.N.{input_layernorm, attention.qkv,
    attention.dense, post_layernorm, mlp.fc, mlp.gate, mlp.proj}``, ``transformer.ln_f`` and
    ``lm_head`` (from the embedding when tied). Every tensor is a fresh copy in ``dtype``.
    """
    check_trtllm_shape(preset, tensor_parallel_size)
    if not 0 <= rank < tensor_parallel_size:
        raise ConfigError(f"rank={rank} is outside tensor_parallel_size={tensor_parallel_size}")
    tp = tensor_parallel_size
    embedding = state["embedding.word_embeddings.weight"]
    head = embedding if preset.tie_embeddings else state["output_layer.weight"]
    out = {
        "transformer.vocab_embedding.weight": embedding,
        "transformer.ln_f.weight": _gamma(state["decoder.final_layernorm.weight"], preset),
        "lm_head.weight": _padded_vocab_rows(head, preset.vocab_size, tp, rank),
    }
    for layer in range(preset.num_layers):
        out.update(_layer_for_rank(state, preset, tp, rank, layer))
    # Copies, so that no two tensors share storage (safetensors refuses shared tensors).
    return {name: t.detach().to(dtype=dtype, copy=True).contiguous() for name, t in out.items()}


def megatron_to_trtllm(state: Mapping[str, Tensor], preset: ModelPreset, tensor_parallel_size: int = 1,
                       dtype: torch.dtype = torch.bfloat16) -> list[dict[str, Tensor]]:
    """Full megatron GPTModel state dict -> one dict of TRT-LLM checkpoint tensors per TP rank."""
    state = local_spec_state(state.items(), preset)
    return [trtllm_rank_weights(state, preset, tensor_parallel_size, rank, dtype)
            for rank in range(tensor_parallel_size)]


def write_trtllm_checkpoint(directory: str | Path, config: dict[str, Any],
                            rank_weights: list[dict[str, Tensor]]) -> Path:
    """Write a TRT-LLM checkpoint directory: ``config.json`` and ``rank{r}.safetensors`` per rank
    (the files ``PretrainedModel.from_checkpoint`` reads, [modeling-utils])."""
    from safetensors.torch import save_file

    if len(rank_weights) != config["mapping"]["tp_size"]:
        raise ConfigError(f"{len(rank_weights)} rank files for tp_size={config['mapping']['tp_size']}")
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for rank, weights in enumerate(rank_weights):
        save_file({name: t.cpu() for name, t in weights.items()}, str(path / f"rank{rank}.safetensors"))
    return path


# --------------------------------------------------------------------------------------
# Backend (NOT RUN on these machines: no GPU, no tensorrt_llm)


def import_tensorrt_llm() -> Any:
    """``import tensorrt_llm``, or a ConfigError that says where to get it."""
    try:
        module = importlib.import_module("tensorrt_llm")
    except ImportError as error:
        raise ConfigError(
            f"generation backend 'trtllm' needs TensorRT-LLM {TRTLLM_VERSION}, which cannot be imported here "
            f"({error}). Run Keel in the NGC TensorRT-LLM image {TRTLLM_IMAGE}: docker build -f docker/Dockerfile "
            "--build-arg KEEL_FLAVOR=trtllm -t keel:trtllm . (see docs/cluster.md), or choose generation backend "
            "'native'") from error
    version = getattr(module, "__version__", "unknown")
    if version != TRTLLM_VERSION:
        logger.warning("TensorRT-LLM %s is installed; the trtllm backend was written for %s", version, TRTLLM_VERSION)
    return module


@dataclass(frozen=True)
class TRTLLMOptions:
    """How the TensorRT-LLM engine is built and run.

    ``tensor_parallel_size``: TRT-LLM TP size (GPUs of one engine; more than 1 runs the executor in
    orchestrator mode on devices 0..tp-1). ``dtype``: engine weights. ``max_batch_size``,
    ``max_input_len``, ``max_seq_len`` (prompt + new tokens; 0 = the preset's max_sequence_length):
    the engine's build limits. ``kv_cache_fraction``: share of free GPU memory for the KV cache.
    ``refit``: after the first build, refit the engine with new weights instead of rebuilding.
    ``workdir``: where checkpoints and engines go ("" = a new temporary directory).
    """

    tensor_parallel_size: int = 1
    dtype: str = "bfloat16"
    max_batch_size: int = 64
    max_input_len: int = 1024
    max_seq_len: int = 0
    kv_cache_fraction: float = 0.5
    refit: bool = True
    workdir: str = ""

    def __post_init__(self) -> None:
        problems = []
        if self.dtype not in DTYPES:
            problems.append(f"dtype={self.dtype!r} must be one of {', '.join(DTYPES)}")
        for name in ("tensor_parallel_size", "max_batch_size", "max_input_len"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.max_seq_len < 0:
            problems.append(f"max_seq_len={self.max_seq_len} must be >= 0 (0 = the model's context)")
        if not 0 < self.kv_cache_fraction < 1:
            problems.append(f"kv_cache_fraction={self.kv_cache_fraction} must be in (0, 1)")
        if problems:
            raise ConfigError("trtllm options: " + "; ".join(problems))


class TRTLLMBackend:
    """The ``trtllm`` generation backend. NOT RUN on these machines (no GPU, no TensorRT-LLM).

    ``update_weights`` takes the full (unsharded) megatron state as (global name, tensor) pairs,
    converts it for this backend's own TP size, writes a TRT-LLM checkpoint, and builds the engine
    (first call) or refits it in place of a rebuild (later calls, ``options.refit``). ``generate``
    loads the engine when needed and runs one executor request per prompt, so row ``i`` samples
    with seed ``params.seed + i``. ``release`` shuts the executor down (KV cache and engine memory);
    the engine stays on disk for the next ``generate``.

    Log-probs: TensorRT-LLM's TensorRT backend reports log-probs of the distribution it samples
    from, after temperature ([logprobs]), and greedy decoding here is top_k=1; they are the raw
    log-probs that :class:`~engine.generation.base.Rollouts` promises only at temperature 1 with
    top_k 0 and top_p 1. ``Rollouts.stats["logprobs_raw"]`` says which; the trainer recomputes
    log-probs in any case.
    """

    def __init__(self, preset: ModelPreset, options: Optional[TRTLLMOptions] = None) -> None:
        self.preset = preset
        self.options = options or TRTLLMOptions()
        check_trtllm_shape(preset, self.options.tensor_parallel_size)
        self._trtllm = import_tensorrt_llm()
        self._workdir = Path(self.options.workdir or tempfile.mkdtemp(prefix="keel-trtllm-"))
        self._engine_dir: Optional[Path] = None
        self._runner: Any = None
        self._updates = 0
        self._warned_logprobs = False

    @property
    def max_seq_len(self) -> int:
        return self.options.max_seq_len or self.preset.max_sequence_length

    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        state = local_spec_state(named_tensors, self.preset)
        tp, dtype = self.options.tensor_parallel_size, self.options.dtype
        ranks = [trtllm_rank_weights(state, self.preset, tp, rank, DTYPES[dtype]) for rank in range(tp)]
        del state
        self._updates += 1
        checkpoint = write_trtllm_checkpoint(self._workdir / f"checkpoint-{self._updates}",
                                             trtllm_checkpoint_config(self.preset, tp, dtype), ranks)
        del ranks
        self._drop_runner()
        if self._engine_dir is not None and self.options.refit:
            self._refit(checkpoint)
        else:
            self._build(checkpoint)
        shutil.rmtree(checkpoint, ignore_errors=True)

    def _build(self, checkpoint: Path) -> None:
        """Build one engine per TP rank from the checkpoint ([builder] build, Engine.save;
        [modeling-utils] from_checkpoint), refittable so later updates can refit it."""
        from tensorrt_llm.builder import BuildConfig, build
        from tensorrt_llm.models import LLaMAForCausalLM

        build_config = BuildConfig(max_batch_size=self.options.max_batch_size, max_input_len=self.options.max_input_len,
                                   max_seq_len=self.max_seq_len, use_refit=True)
        engine_dir = self._workdir / f"engine-{self._updates}"
        for rank in range(self.options.tensor_parallel_size):
            model = LLaMAForCausalLM.from_checkpoint(str(checkpoint), rank=rank)
            build(model, build_config).save(str(engine_dir))
        self._replace_engine(engine_dir)

    def _refit(self, checkpoint: Path) -> None:
        """Refit the engine files with the checkpoint's weights ([refit]: every refittable weight is
        set from the checkpoint; weights the model initialises itself are listed as fixed)."""
        from tensorrt_llm.builder import EngineConfig
        from tensorrt_llm.commands.refit import refit
        from tensorrt_llm.models import MODEL_MAP

        assert self._engine_dir is not None
        engine_config = EngineConfig.from_json_file(str(self._engine_dir / "config.json"))
        pretrained = engine_config.pretrained_config
        model = MODEL_MAP[pretrained.architecture].from_config(pretrained)
        fixed = [name for name, param in model.named_parameters() if param.is_inited()]
        engine_dir = self._workdir / f"engine-{self._updates}"
        refit(engine_dir=str(self._engine_dir), checkpoint_dir=str(checkpoint), engine_config=engine_config,
              output_dir=str(engine_dir), fixed_weights_names=fixed)
        self._replace_engine(engine_dir)

    def _replace_engine(self, engine_dir: Path) -> None:
        if self._engine_dir is not None and self._engine_dir != engine_dir:
            shutil.rmtree(self._engine_dir, ignore_errors=True)
        self._engine_dir = engine_dir

    def _load_runner(self) -> Any:
        if self._runner is None:
            if self._engine_dir is None:
                raise ConfigError("trtllm backend: call update_weights before generate (there is no engine yet)")
            from tensorrt_llm.runtime import ModelRunnerCpp

            tp = self.options.tensor_parallel_size
            self._runner = ModelRunnerCpp.from_dir(
                str(self._engine_dir), rank=0, max_batch_size=self.options.max_batch_size,
                max_input_len=self.options.max_input_len, kv_cache_free_gpu_memory_fraction=self.options.kv_cache_fraction,
                is_orchestrator_mode=tp > 1, device_ids=list(range(tp)) if tp > 1 else None)
        return self._runner

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> Rollouts:
        check_prompts(prompts, params, self.max_seq_len)
        too_long = [i for i, p in enumerate(prompts) if len(p) > self.options.max_input_len]
        if too_long:
            raise ConfigError(f"prompt {too_long[0]} has {len(prompts[too_long[0]])} tokens, more than the engine's "
                              f"max_input_len={self.options.max_input_len}; raise trtllm max_input_len (rebuilds)")
        executor = self._load_runner().executor
        api = self._trtllm.bindings.executor
        request_ids = executor.enqueue_requests(
            [self._request(api, prompt, params, row) for row, prompt in enumerate(prompts)])
        results = _await_final_results(executor, list(request_ids))
        return self._rollouts(prompts, params, [results[i] for i in request_ids])

    def _request(self, api: Any, prompt: list[int], params: SamplingParams, row: int) -> Any:
        """One executor request ([runner]: Request, SamplingConfig, OutputConfig keyword names)."""
        limit = min(params.max_length or self.max_seq_len, self.max_seq_len)
        budget = min(params.max_new_tokens, limit - len(prompt))
        greedy = params.temperature == 0
        sampling = api.SamplingConfig(
            beam_width=1, seed=params.seed + row,
            top_k=1 if greedy else (params.top_k or None),
            top_p=None if greedy or params.top_p >= 1 else params.top_p,
            temperature=None if greedy else params.temperature)
        output = api.OutputConfig(return_log_probs=True, exclude_input_from_output=True)
        stop_words = [[token] for token in params.stop_token_ids] or None
        return api.Request(input_token_ids=list(prompt), max_tokens=budget, sampling_config=sampling,
                           output_config=output, stop_words=stop_words)

    def _rollouts(self, prompts: list[list[int]], params: SamplingParams, results: list[Any]) -> Rollouts:
        stops = set(params.stop_token_ids)
        tokens, logprobs, reasons = [], [], []
        for result in results:
            new = [int(t) for t in result.output_token_ids[0]]
            tokens.append(new)
            logprobs.append([float(x) for x in result.log_probs[0]][: len(new)])
            reasons.append("stop" if new and new[-1] in stops else "length")
        raw = params.temperature == 1.0 and params.top_k == 0 and params.top_p == 1.0
        if not raw and not self._warned_logprobs:
            self._warned_logprobs = True
            logger.warning("trtllm: log-probs are of TensorRT-LLM's sampling distribution (temperature=%s, top_k=%s, "
                           "top_p=%s), not the raw model distribution", params.temperature, params.top_k, params.top_p)
        stats = {"logprobs_raw": float(raw), "new_tokens": float(sum(len(t) for t in tokens))}
        return Rollouts(prompts=[list(p) for p in prompts], tokens=tokens, logprobs=logprobs,
                        finish_reasons=reasons, stats=stats)

    def _drop_runner(self) -> None:
        if self._runner is not None:
            self._runner.executor.shutdown()
            self._runner = None

    def release(self) -> None:
        self._drop_runner()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _await_final_results(executor: Any, request_ids: list[int]) -> dict[int, Any]:
    """Wait until every request has its final (non-streaming: only) response ([runner])."""
    pending, results = set(request_ids), {}
    while pending:
        for response in executor.await_responses():
            if response.has_error():
                raise RuntimeError(f"TensorRT-LLM request {response.request_id} failed: {response.error_msg}")
            if response.result.is_final:
                results[response.request_id] = response.result
                pending.discard(response.request_id)
    return results
