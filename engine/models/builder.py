"""Build megatron-core GPT models from presets.

preset (shape) + precision + layout → ``TransformerConfig`` → layer spec (TE on GPU,
local elsewhere) → one ``GPTModel`` per virtual-pipeline chunk. The builder holds no
parallel logic of its own: megatron's modules read the layout from ``parallel_state``.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from typing import Any, Optional

import torch
import torch.nn.functional as F

from engine.errors import ConfigError
from engine.models.presets import ModelPreset

logger = logging.getLogger(__name__)


def transformer_engine_available() -> bool:
    """True when Transformer Engine is installed and CUDA is present (TE needs both)."""
    if not torch.cuda.is_available() or importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the GPU image
        logger.warning("transformer_engine is installed but failed to import: %s", exc)
        return False
    return True


def use_transformer_engine(layer_spec: str) -> bool:
    """Resolve ``model.layer_spec`` ('auto' | 'te' | 'local') on this machine."""
    if layer_spec == "local":
        return False
    available = transformer_engine_available()
    if layer_spec == "te" and not available:
        raise ConfigError(
            "model.layer_spec=te needs the transformer-engine package and a CUDA GPU; install the [gpu] "
            "extra (or use the Docker image) or set model.layer_spec=local"
        )
    return available


def check_fp8(precision: Any, use_te: bool) -> None:
    """FP8 is never dropped silently: fail before any work when it cannot run."""
    if precision.fp8 is None:
        return
    if not use_te:
        raise ConfigError(
            f"precision.fp8={precision.fp8} needs Transformer Engine on a CUDA GPU (the TE layer spec); "
            "it is not available here. Remove precision.fp8 or run in the GPU image."
        )
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        raise ConfigError(
            f"precision.fp8={precision.fp8} needs an FP8-capable GPU (compute capability >= 8.9, e.g. H100); "
            f"this GPU is {major}.{minor}"
        )


def check_packing(pack: bool, use_te: bool) -> None:
    """Packed samples are never trained with attention across documents: refuse them on the TE spec.

    Packed SFT rows hold several documents and a block-diagonal mask (``engine.data.packing``).
    The local spec's attention applies that mask. The TE spec is built with a causal mask type,
    and TE then ignores ``attention_mask``, so every document would attend to the ones before
    it in the row. Passing packed rows to TE needs megatron's ``PackedSeqParams`` (``thd``
    layout with ``cu_seqlens``), which Keel does not build yet.
    """
    if pack and use_te:
        raise ConfigError(
            "data.pack=true cannot run on the Transformer Engine layer spec: its attention is causal over "
            "the whole row and ignores the block-diagonal mask, so packed documents would attend to each "
            "other. Set data.pack=false (with data.group_by_length=true micro-batches are cut to their "
            "longest row, which recovers most of packing's saving), or model.layer_spec=local to keep "
            "packing on the slower local spec."
        )


def _activation(preset: ModelPreset) -> Any:
    if preset.activation == "swiglu":
        return F.silu
    if preset.activation == "squared_relu":
        from megatron.core.activations import squared_relu

        return squared_relu
    if preset.activation == "gelu":
        return F.gelu
    raise ConfigError(f"unknown activation {preset.activation!r} in preset {preset.name}")


@functools.lru_cache(maxsize=1)
def _note_tf32() -> None:
    """Say once per process (the cache) that fp32 on the TE spec multiplies in TF32 (measured on an H200:
    rollout and trainer log-probs then differ by up to 2.2e-5 instead of 1e-6), and how to turn that off."""
    if os.environ.get("NVIDIA_TF32_OVERRIDE") != "0":
        logger.info("precision.dtype=fp32 on the Transformer Engine spec: TE runs fp32 GEMMs in TF32; "
                    "set NVIDIA_TF32_OVERRIDE=0 for full fp32 products")


def meta_transformer_config(preset: ModelPreset, layout: Any) -> Any:
    """The config of a model to build under ``torch.device("meta")`` (shapes only, fp32, local spec): no
    initialisation, and CPU placement, since megatron's explicit CUDA device would override "meta"."""
    from engine.config import PrecisionConfig

    config = transformer_config(preset, layout, PrecisionConfig(), use_te=False)
    config.perform_initialization = False
    config.use_cpu_initialization = True
    return config


def transformer_config(
    preset: ModelPreset,
    layout: Any,
    precision: Any,
    use_te: bool,
    recompute: str = "none",
    recompute_num_layers: int = 1,
    init_std: float = 0.02,
) -> Any:
    """megatron ``TransformerConfig`` for ``preset`` under ``layout`` and ``precision``."""
    from megatron.core.transformer import TransformerConfig

    dtype = precision.torch_dtype
    on_gpu = torch.cuda.is_available()
    if use_te and dtype == torch.float32:
        _note_tf32()
    kwargs: dict[str, Any] = dict(
        num_layers=preset.num_layers,
        hidden_size=preset.hidden_size,
        num_attention_heads=preset.num_attention_heads,
        num_query_groups=preset.num_query_groups,
        ffn_hidden_size=preset.ffn_hidden_size,
        kv_channels=preset.kv_channels,
        normalization=preset.normalization,
        layernorm_epsilon=preset.layernorm_epsilon,
        layernorm_zero_centered_gamma=preset.zero_centered_gamma,
        gated_linear_unit=preset.gated,
        activation_func=_activation(preset),
        add_bias_linear=preset.add_bias_linear,
        add_qkv_bias=preset.add_bias_linear,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=init_std,
        tensor_model_parallel_size=layout.tensor,
        pipeline_model_parallel_size=layout.pipeline,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline,
        sequence_parallel=layout.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        autocast_dtype=dtype,
        use_cpu_initialization=not on_gpu,
        perform_initialization=True,
        calculate_per_token_loss=True,
        # Fusions that need apex / TE kernels are only on where those exist.
        gradient_accumulation_fusion=use_te and importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None,
        apply_rope_fusion=use_te,
        bias_activation_fusion=use_te and preset.add_bias_linear,
        masked_softmax_fusion=use_te,
        bias_dropout_fusion=use_te,
        persist_layer_norm=False,
        deallocate_pipeline_outputs=True,
        # Batched p2p posts send-to-prev before send-to-next. With two stages prev == next, and gloo
        # matches same-tag messages in posting order, so the interleaved schedule's activation and
        # gradient (same shape) would be swapped. Unbatched p2p orders by rank parity and is exact.
        batch_p2p_comm=on_gpu,
        cuda_graph_scope=[],  # the whole layer, as megatron's deprecated default "full" (which warns on every build)
    )
    kwargs.update(_recompute_and_fp8(recompute, recompute_num_layers, precision))
    return TransformerConfig(**kwargs)


def _recompute_and_fp8(recompute: str, recompute_num_layers: int, precision: Any) -> dict[str, Any]:
    """The ``TransformerConfig`` fields of activation recomputation and FP8."""
    kwargs: dict[str, Any] = {}
    if recompute == "selective":
        kwargs.update(recompute_granularity="selective")
    elif recompute == "full":
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=recompute_num_layers)
    if precision.fp8 is not None:
        kwargs.update(fp8=precision.fp8, fp8_recipe="delayed", fp8_amax_history_len=precision.fp8_amax_history_len,
                      fp8_amax_compute_algo=precision.fp8_amax_compute_algo, fp8_margin=precision.fp8_margin)
    return kwargs


def layer_spec(preset: ModelPreset, use_te: bool, tp_group: Any = None) -> Any:
    """TE layer spec, or the local spec with Keel's CPU attention, MLP and sequence-parallel norm.

    ``tp_group`` is the tensor-parallel group of a model built outside megatron's global layout (the
    generation model); megatron passes it to its own MLP classes, Keel's local MLP takes it here.
    """
    from megatron.core.models.gpt import gpt_layer_specs

    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    from engine.models.attention import SDPACoreAttention
    from engine.models.mlp import LocalMLPSpec
    from engine.models.norm import LocalNorm
    from engine.models.rotary import install as install_rotary

    install_rotary()
    spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization=preset.normalization)
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    mlp_params = dict(spec.submodules.mlp.params)
    if tp_group is not None:
        mlp_params["tp_group"] = tp_group
    spec.submodules.mlp = LocalMLPSpec(spec.submodules.mlp.submodules, params=mlp_params)
    spec.submodules.input_layernorm = LocalNorm
    spec.submodules.pre_mlp_layernorm = LocalNorm
    return spec


def _block_spec(spec: Any, config: Any, use_te: bool, vp_stage: Optional[int], pp_rank: Optional[int] = None) -> Any:
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm

        norm: Any = TENorm
    else:
        from engine.models.norm import LocalNorm

        norm = LocalNorm
    count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[spec] * count, layer_norm=norm)


def rope_scaling(preset: ModelPreset) -> dict[str, Any]:
    """``GPTModel``'s arguments for Llama 3.x RoPE scaling (megatron's: low and high frequency factors 1 and 4
    over 8192 original positions, the values of every Llama 3.1 and 3.2 model), empty without it."""
    if preset.rope_scaling_factor is None:
        return {}
    return {"rope_scaling": True, "rope_scaling_factor": float(preset.rope_scaling_factor)}


def build_gpt_chunks(
    preset: ModelPreset, config: Any, use_te: bool, virtual_pipeline: Optional[int],
    model_cls: Optional[type] = None, model_kwargs: Optional[dict[str, Any]] = None,
    process_groups: Any = None,
) -> list[Any]:
    """One ``GPTModel`` (or ``model_cls``, a subclass) per virtual-pipeline chunk of this rank.

    ``process_groups`` (a megatron ``ProcessGroupCollection``) builds a whole, unpipelined model on
    those groups instead of megatron's global training layout: the generation model.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    model_cls = model_cls or GPTModel
    if process_groups is not None:
        spec = layer_spec(preset, use_te, tp_group=process_groups.tp)
        return [model_cls(
            config=config, transformer_layer_spec=_block_spec(spec, config, use_te, None, pp_rank=0),
            vocab_size=preset.vocab_size, max_sequence_length=preset.max_sequence_length,
            pre_process=True, post_process=True, share_embeddings_and_output_weights=preset.tie_embeddings,
            position_embedding_type="rope", rotary_base=preset.rotary_base, rotary_percent=preset.rotary_percent,
            pg_collection=process_groups, **rope_scaling(preset), **(model_kwargs or {}),
        )]
    spec = layer_spec(preset, use_te)
    chunks = []
    for vp_stage in range(virtual_pipeline or 1):
        stage = vp_stage if virtual_pipeline else None
        chunks.append(
            model_cls(
                config=config,
                transformer_layer_spec=_block_spec(spec, config, use_te, stage),
                vocab_size=preset.vocab_size,
                max_sequence_length=preset.max_sequence_length,
                pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=stage is None, vp_stage=stage),
                post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=stage is None, vp_stage=stage),
                share_embeddings_and_output_weights=preset.tie_embeddings,
                position_embedding_type="rope",
                rotary_base=preset.rotary_base,
                rotary_percent=preset.rotary_percent,
                vp_stage=stage,
                **rope_scaling(preset),
                **(model_kwargs or {}),
            )
        )
    return chunks
