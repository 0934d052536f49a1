"""Memory planner: which tensor × pipeline × data layouts fit a model on a GPU count.

``plan(...)`` estimates, per GPU of the busiest pipeline stage, the bytes of

* **weights** — this rank's parameter shard (TP-split linears and vocabulary, replicated
  norms, the stage's share of layers, embedding on the first stage, output layer and
  final norm on the last); with FP8, Transformer Engine's cached FP8 weight and its
  transpose (2 bytes per linear weight);
* **gradients** — megatron DDP's contiguous gradient buffer (fp32 when gradients are
  reduced in fp32, else the parameter dtype), never sharded;
* **optimizer** — Adam's two moments plus fp32 master weights under bf16 (12 bytes per
  parameter; 8 under fp32), divided by the data-parallel size with the distributed
  optimizer (ZeRO-1);
* **activations** — what autograd keeps for the backward pass, counted tensor by tensor
  for the layer spec (Korthikanti et al. 2022 style), times the micro-batches in flight
  on the stage under 1F1B (pipeline size on the first stage), plus the last stage's
  logits; with ``recompute="full"`` only each layer's input plus one layer being
  recomputed; with ``"selective"`` the core-attention internals are dropped.

Generation (the rollout engine) needs the weights (FP8 linears with ``fp8``) plus the
KV cache: ``2 · layers · KV heads per rank · head_dim · tokens · bytes``.

A layout *fits* when its total is at most ``(1 - reserve) ×`` the GPU memory; the
reserve (default 10 %) covers the CUDA context, NCCL buffers and allocator slack.
Parameter counts come from the preset's analytic formula, which a test checks against
the real megatron model built on the meta device (:func:`count_parameters_on_meta`).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from engine.errors import ConfigError
from engine.models.presets import PRESETS, ModelPreset

GIB = 1024**3
ADAM_BYTES = {"bf16": 12, "fp32": 8}  # per parameter: (fp32 master +) exp_avg + exp_avg_sq
PARAM_BYTES = {"bf16": 2, "fp32": 4}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU of one training layout (its busiest pipeline stage)."""

    tensor: int
    pipeline: int
    data: int
    stage: int  # the pipeline stage these numbers are for
    parameters: int  # parameters held by one rank of that stage
    weights: int
    gradients: int
    optimizer: int
    activations: int
    activations_no_recompute: int
    activations_full_recompute: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def describe(self) -> str:
        return f"TP{self.tensor}×PP{self.pipeline}×DP{self.data}"


@dataclass(frozen=True)
class GenerationEstimate:
    """Bytes per GPU of one generation instance at tensor-parallel size ``tensor``."""

    tensor: int
    instances: int
    weights: int
    kv_cache: int
    logits: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.logits


@dataclass
class Plan:
    """Estimates for every candidate layout, and which ones fit."""

    preset: ModelPreset
    gpus: int
    gpu_memory_bytes: int
    reserve: float
    training: list[MemoryEstimate] = field(default_factory=list)
    generation: list[GenerationEstimate] = field(default_factory=list)

    @property
    def usable_bytes(self) -> int:
        return int(self.gpu_memory_bytes * (1.0 - self.reserve))

    def fits(self, estimate: Any) -> bool:
        return bool(estimate.total <= self.usable_bytes)

    @property
    def training_fits(self) -> list[MemoryEstimate]:
        return [e for e in self.training if self.fits(e)]

    @property
    def generation_fits(self) -> list[GenerationEstimate]:
        return [e for e in self.generation if self.fits(e)]

    def format(self) -> str:
        """A table for the terminal (``keel plan``)."""
        gib = lambda n: f"{n / GIB:8.2f}"  # noqa: E731
        lines = [
            f"{self.preset.name}: {self.preset.parameter_label()} parameters on {self.gpus} GPU(s) of "
            f"{self.gpu_memory_bytes / GIB:.1f} GiB ({self.usable_bytes / GIB:.1f} GiB usable, {self.reserve:.0%} reserve)",
            "",
            "training (GiB per GPU, busiest stage)",
            f"{'layout':16s} {'weights':>8s} {'grads':>8s} {'optim':>8s} {'activ':>8s} {'act(full rc)':>12s} "
            f"{'total':>8s}  fits",
        ]
        for e in self.training:
            lines.append(
                f"{e.describe():16s} {gib(e.weights)} {gib(e.gradients)} {gib(e.optimizer)} {gib(e.activations)} "
                f"{gib(e.activations_full_recompute):>12s} {gib(e.total)}  {'yes' if self.fits(e) else 'no'}"
            )
        lines += ["", "generation (GiB per GPU)", f"{'layout':16s} {'weights':>8s} {'kv cache':>8s} {'total':>8s}  fits"]
        for g in self.generation:
            lines.append(
                f"{f'TP{g.tensor} x{g.instances}':16s} {gib(g.weights)} {gib(g.kv_cache)} {gib(g.total)}  "
                f"{'yes' if self.fits(g) else 'no'}"
            )
        return "\n".join(lines)


# ---------------------------------------------------------------------- parameters
def _layer_parameters(preset: ModelPreset, tp: int) -> tuple[int, int]:
    """(parameters of one transformer layer on one TP rank, of which in linear weights)."""
    h, f = preset.hidden_size, preset.ffn_hidden_size
    head = preset.kv_channels
    qkv_out = (preset.num_attention_heads + 2 * preset.num_query_groups) * head
    fc1_out = f * (2 if preset.gated else 1)
    linear = (h * qkv_out + preset.num_attention_heads * head * h + h * fc1_out + f * h) // tp
    norm = h if preset.normalization == "RMSNorm" else 2 * h
    bias = (qkv_out + fc1_out) // tp + 2 * h if preset.add_bias_linear else 0  # row-parallel biases replicate
    return linear + 2 * norm + bias, linear


def stage_parameters(preset: ModelPreset, tp: int, pp: int, stage: int) -> tuple[int, int]:
    """(parameters on one rank of ``stage``, of which in transformer linear weights)."""
    per_layer, linear = _layer_parameters(preset, tp)
    layers = preset.num_layers // pp
    total, linear_total = layers * per_layer, layers * linear
    embedding = preset.vocab_size * preset.hidden_size // tp
    norm = preset.hidden_size if preset.normalization == "RMSNorm" else 2 * preset.hidden_size
    if stage == 0:
        total += embedding
    if stage == pp - 1:
        total += norm
        if not preset.tie_embeddings or pp > 1:  # tied + PP>1: the last stage holds a copy
            total += embedding
    return total, linear_total


# ---------------------------------------------------------------------- activations
def layer_activation_bytes(
    preset: ModelPreset, tokens: int, tp: int, sequence_parallel: bool, dtype_bytes: int,
    recompute: str = "none", fp8: bool = False, layer_spec: str = "te",
) -> int:
    """Bytes autograd keeps for one transformer layer and ``tokens`` = micro_batch × seq_len."""
    h, f = preset.hidden_size, preset.ffn_hidden_size
    heads, groups, head = preset.num_attention_heads, preset.num_query_groups, preset.kv_channels
    e = dtype_bytes
    gemm_in = 1 if fp8 else e  # TE keeps FP8 copies of GEMM inputs for the backward pass
    split = tp if sequence_parallel else 1
    if recompute == "full":
        return tokens * h * e // split  # the layer's input; the rest is recomputed
    # Replicated across TP ranks unless sequence parallel: the two norm inputs and the
    # inputs of the QKV and FC1 GEMMs (the norm outputs).
    shared = tokens * (2 * h * e + 2 * h * gemm_in) // split
    kv_width = 2 * max(groups // tp, 1) * head
    q_width = heads * head // tp
    if layer_spec == "te":
        # Fused attention keeps q, k, v (grouped), its output (= the projection's input) and
        # the softmax statistics; selective recompute saves nothing more with it.
        attention = tokens * ((q_width + kv_width) * e + q_width * gemm_in + 4 * heads // tp)
        gated = 2 * f if preset.gated else f
        mlp = tokens * (gated * e + f * gemm_in) // tp  # FC1 output (activation input), FC2 input
    else:
        # Local spec (torch SDPA with grouped k and v): q, k, v, the attention output, and the
        # output reshaped into a new tensor for the projection.
        if recompute == "selective":  # the checkpoint keeps only the inputs of core attention
            attention = tokens * (q_width + kv_width + q_width) * e
        else:
            attention = tokens * (q_width + kv_width + 2 * q_width) * e + tokens * 4 * heads // tp
        # swiglu: the FC1 output (gate and up), the silu output, the product; squared ReLU: relu output, its square
        mlp = tokens * (4 * f if preset.gated else 2 * f) * e // tp
    return shared + attention + mlp


def _logits_bytes(preset: ModelPreset, tokens: int, tp: int, dtype_bytes: int) -> int:
    """Last stage at the start of the backward pass: the output layer's input, the logits, the
    fp32 softmax kept by the cross-entropy and the logits' gradient, plus the output weight's
    gradient before it is added into the gradient buffer (the largest such temporary)."""
    vocab = preset.vocab_size // tp
    kept = tokens * (preset.hidden_size * dtype_bytes * 2 + vocab * (dtype_bytes + 4))
    workspace = tokens * vocab * 4 + vocab * preset.hidden_size * dtype_bytes
    return kept + workspace


def activation_bytes(
    preset: ModelPreset, tp: int, pp: int, stage: int, micro_batch: int, seq_len: int, recompute: str,
    sequence_parallel: bool, dtype_bytes: int, fp8: bool, layer_spec: str,
) -> int:
    """Activations held by one rank of ``stage`` at its peak under the 1F1B schedule."""
    tokens = micro_batch * seq_len
    layers = preset.num_layers // pp
    in_flight = pp - stage  # 1F1B: stage i runs pp - i forward passes before its first backward
    kept = layer_activation_bytes(preset, tokens, tp, sequence_parallel, dtype_bytes, recompute, fp8, layer_spec)
    total = in_flight * layers * kept
    if recompute == "full":  # one layer is recomputed (full activations) during its backward
        total += layer_activation_bytes(preset, tokens, tp, sequence_parallel, dtype_bytes, "none", fp8, layer_spec)
    if stage == pp - 1:
        total += _logits_bytes(preset, tokens, tp, dtype_bytes)
    return total


# ---------------------------------------------------------------------- estimates
def estimate_training(
    preset: ModelPreset, tp: int, pp: int, dp: int, *, micro_batch: int = 1, seq_len: Optional[int] = None,
    recompute: str = "none", fp8: bool = False, distributed_optimizer: bool = True,
    sequence_parallel: Optional[bool] = None, dtype: str = "bf16", grad_reduce_in_fp32: bool = True,
    layer_spec: str = "te",
) -> MemoryEstimate:
    """Per-GPU bytes of one layout, for its busiest pipeline stage."""
    if recompute not in ("none", "selective", "full"):
        raise ValueError(f"recompute={recompute!r} is not 'none', 'selective' or 'full'")
    seq_len = seq_len or preset.max_sequence_length
    sp = tp > 1 if sequence_parallel is None else sequence_parallel
    e = PARAM_BYTES[dtype]
    best: Optional[MemoryEstimate] = None
    for stage in range(pp):
        params, linear = stage_parameters(preset, tp, pp, stage)
        optimizer = params * ADAM_BYTES[dtype]
        act = {
            mode: activation_bytes(preset, tp, pp, stage, micro_batch, seq_len, mode, sp, e, fp8, layer_spec)
            for mode in {"none", "full", recompute}
        }
        estimate = MemoryEstimate(
            tensor=tp, pipeline=pp, data=dp, stage=stage, parameters=params,
            weights=params * e + (2 * linear if fp8 else 0),
            gradients=params * (4 if grad_reduce_in_fp32 else e),
            optimizer=math.ceil(optimizer / dp) if distributed_optimizer else optimizer,
            activations=act[recompute], activations_no_recompute=act["none"], activations_full_recompute=act["full"],
        )
        if best is None or estimate.total > best.total:
            best = estimate
    assert best is not None
    return best


def estimate_generation(
    preset: ModelPreset, tp: int, gpus: int, *, batch: int = 64, seq_len: Optional[int] = None, fp8: bool = False,
    dtype: str = "bf16",
) -> GenerationEstimate:
    """Per-GPU bytes of a generation instance: weights + KV cache for ``batch`` sequences of ``seq_len``, in
    ``dtype`` (FP8 linears and an FP8 cache with ``fp8``)."""
    seq_len = seq_len or preset.max_sequence_length
    e = PARAM_BYTES[dtype]
    params, linear = stage_parameters(preset, tp, 1, 0)
    weights = params * e - (linear * (e - 1) if fp8 else 0)
    kv_heads = max(preset.num_query_groups // tp, 1)  # KV heads replicate when tp > groups
    kv_cache = 2 * preset.num_layers * kv_heads * preset.kv_channels * seq_len * batch * (1 if fp8 else e)
    logits = batch * preset.vocab_size // tp * 4
    return GenerationEstimate(tensor=tp, instances=gpus // tp, weights=weights, kv_cache=kv_cache, logits=logits)


def _valid_tp(preset: ModelPreset, tp: int) -> bool:
    return all(n % tp == 0 for n in (preset.num_attention_heads, preset.ffn_hidden_size, preset.vocab_size)) and (
        preset.num_query_groups % tp == 0 or tp % preset.num_query_groups == 0
    )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def plan(
    preset: ModelPreset | str, gpus: int, gpu_memory_gb: float, tp: Optional[int] = None, pp: Optional[int] = None,
    dp: Optional[int] = None, fp8: bool = False, recompute: str = "none", micro_batch: int = 1,
    seq_len: Optional[int] = None, distributed_optimizer: bool = True, *, gpus_per_node: int = 8,
    dtype: str = "bf16", generation_batch: int = 64, reserve: float = 0.1, layer_spec: str = "te",
) -> Plan:
    """Estimate every layout of ``gpus`` GPUs (or only the given tp/pp/dp) for training and generation.

    ``gpu_memory_gb`` is in GiB (80 GB H100 ≈ 79.1 GiB as reported by the driver). Tensor
    parallelism stays within a node (``gpus_per_node``); sequence parallelism is on
    whenever tp > 1, as Keel's GPU configs do.
    """
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        preset = PRESETS[preset]
    result = Plan(preset=preset, gpus=gpus, gpu_memory_bytes=int(gpu_memory_gb * GIB), reserve=reserve)
    for t in _divisors(gpus):
        if t > gpus_per_node or not _valid_tp(preset, t) or preset.num_query_groups % t or (tp and t != tp):
            continue
        for p in _divisors(gpus // t):
            d = gpus // (t * p)
            if preset.num_layers % p or (pp and p != pp) or (dp and d != dp):
                continue
            result.training.append(estimate_training(
                preset, t, p, d, micro_batch=micro_batch, seq_len=seq_len, recompute=recompute, fp8=fp8,
                distributed_optimizer=distributed_optimizer, dtype=dtype, layer_spec=layer_spec,
            ))
    for t in _divisors(min(gpus, gpus_per_node)):
        if _valid_tp(preset, t):
            result.generation.append(
                estimate_generation(preset, t, gpus, batch=generation_batch, seq_len=seq_len, fp8=fp8, dtype=dtype)
            )
    result.training.sort(key=lambda e: (not result.fits(e), e.tensor * e.pipeline, e.tensor, e.total))
    return result


# ---------------------------------------------------------------------- real model on the meta device
def count_parameters_on_meta(preset: ModelPreset) -> int:
    """Parameters of the real megatron GPTModel (TP1/PP1), built on the meta device (no memory).

    Needs megatron's parallel state; a 1-rank gloo world is created (and torn down) when none exists.
    """
    import torch

    from engine.models.builder import build_gpt_chunks, meta_transformer_config
    from engine.parallel.layout import ParallelLayout, single_process_parallel

    layout = ParallelLayout(1, 1, 1)
    with single_process_parallel():
        config = meta_transformer_config(preset, layout)
        with torch.device("meta"):
            chunks = build_gpt_chunks(preset, config, use_te=False, virtual_pipeline=None)
        return sum(p.numel() for chunk in chunks for p in chunk.parameters())


# ---------------------------------------------------------------------- command line
def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``plan`` to an argparse sub-parser set (mounted as ``keel plan``)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "plan", help="estimate per-GPU memory of training/generation layouts and list those that fit",
        description="Estimate per-GPU memory (weights, gradients, optimizer, activations; generation weights + "
        "KV cache) of every tensor x pipeline x data layout of a model on N GPUs.",
    )
    parser.add_argument("--model", dest="preset", required=True, choices=sorted(PRESETS), help="model preset")
    parser.add_argument("--gpus", type=int, required=True, help="number of GPUs in the job")
    parser.add_argument("--gpu-memory", "--gpu-memory-gb", dest="gpu_memory_gb", type=float, default=80.0, help="memory per GPU in GiB (default 80)")
    parser.add_argument("--gpus-per-node", type=int, default=8,
                        help="tensor parallelism stays within a node (default: %(default)s)")
    parser.add_argument("--tp", type=int, help="only this tensor-parallel size")
    parser.add_argument("--pp", type=int, help="only this pipeline-parallel size")
    parser.add_argument("--dp", type=int, help="only this data-parallel size")
    parser.add_argument("--fp8", action="store_true", help="FP8 training/generation (Transformer Engine)")
    parser.add_argument("--recompute", choices=("none", "selective", "full"), default="none",
                        help="activation recomputation: none keeps every activation, selective drops core "
                        "attention's internals, full keeps only each layer's input (default: %(default)s)")
    parser.add_argument("--micro-batch", type=int, default=1,
                        help="micro-batch size in sequences (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, help="sequence length (default: the preset's maximum)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                        help="weights and activations dtype (default: %(default)s)")
    parser.add_argument("--no-distributed-optimizer", action="store_true", help="replicate optimizer state")
    parser.add_argument("--generation-batch", type=int, default=64,
                        help="sequences per generation instance, for its KV cache (default: %(default)s)")
    parser.add_argument("--reserve", type=float, default=0.1, help="fraction of GPU memory kept free (default 0.1)")
    parser.add_argument("--all", action="store_true", help="also list layouts that do not fit")
    parser.set_defaults(func=_run)
    return parser


def _check_sizes(args: argparse.Namespace) -> None:
    """Option values that cannot describe any job, each refused naming its option."""
    positive = [("--gpus", args.gpus), ("--gpus-per-node", args.gpus_per_node), ("--micro-batch", args.micro_batch),
                ("--generation-batch", args.generation_batch), ("--tp", args.tp), ("--pp", args.pp),
                ("--dp", args.dp), ("--seq-len", args.seq_len)]
    for option, value in positive:
        if value is not None and value < 1:
            raise ConfigError(f"{option} {value}: must be at least 1")
    if not (math.isfinite(args.gpu_memory_gb) and args.gpu_memory_gb > 0):
        raise ConfigError(f"--gpu-memory {args.gpu_memory_gb}: must be a positive number of GiB")
    if not 0 <= args.reserve < 1:
        raise ConfigError(f"--reserve {args.reserve}: must be a fraction in [0, 1)")


def check_args(args: argparse.Namespace) -> None:
    """Refuse ``keel plan`` options that no layout can satisfy (a :class:`ConfigError` naming the option),
    so an empty table is never mistaken for "does not fit in memory"."""
    _check_sizes(args)
    preset, gpus = PRESETS[args.preset], args.gpus
    if args.seq_len and args.seq_len > preset.max_sequence_length:
        raise ConfigError(f"--seq-len {args.seq_len} is beyond {preset.name}'s context of "
                          f"{preset.max_sequence_length} tokens (training refuses a data.seq_length above it)")
    given = [(option, value) for option, value in (("--tp", args.tp), ("--pp", args.pp), ("--dp", args.dp)) if value]
    for option, value in given:
        if gpus % value:
            raise ConfigError(f"{option} {value} does not divide --gpus {gpus}")
    product = math.prod(value for _, value in given)
    named = " x ".join(f"{option} {value}" for option, value in given)
    if len(given) == 3 and product != gpus:
        raise ConfigError(f"{named} = {product} GPUs, but --gpus is {gpus}")
    if len(given) == 2 and gpus % product:
        raise ConfigError(f"{named} = {product} does not divide --gpus {gpus}")
    if args.tp and args.tp > args.gpus_per_node:
        raise ConfigError(f"--tp {args.tp} exceeds --gpus-per-node {args.gpus_per_node} (tensor parallelism "
                          "stays within a node)")
    if args.tp and (not _valid_tp(preset, args.tp) or preset.num_query_groups % args.tp):
        raise ConfigError(f"--tp {args.tp} must divide each of {preset.name}'s attention heads "
                          f"({preset.num_attention_heads}), KV heads ({preset.num_query_groups}), FFN size "
                          f"({preset.ffn_hidden_size}) and vocabulary ({preset.vocab_size})")
    if args.pp and preset.num_layers % args.pp:
        raise ConfigError(f"--pp {args.pp} does not divide {preset.name}'s {preset.num_layers} layers")


def _run(args: argparse.Namespace) -> int:
    check_args(args)
    result = plan(
        args.preset, args.gpus, args.gpu_memory_gb, tp=args.tp, pp=args.pp, dp=args.dp, fp8=args.fp8,
        recompute=args.recompute, micro_batch=args.micro_batch, seq_len=args.seq_len,
        distributed_optimizer=not args.no_distributed_optimizer, gpus_per_node=args.gpus_per_node,
        dtype=args.dtype, generation_batch=args.generation_batch, reserve=args.reserve,
    )
    if not result.training:
        given = ", ".join(f"--{name} {getattr(args, name)}" for name in ("tp", "pp", "dp") if getattr(args, name))
        raise ConfigError(f"no tensor x pipeline x data split of --gpus {args.gpus} suits {result.preset.name}"
                          f"{' with ' + given if given else ''} (TP within --gpus-per-node {args.gpus_per_node}, "
                          "dividing its heads and KV heads; PP dividing its layers)")
    if not args.all:
        result.training = result.training_fits or result.training[:3]
    print(result.format())
    if not result.training_fits:
        print(f"\nno training layout fits; try {_what_to_try(args)}")
        return 1
    return 0


def _what_to_try(args: argparse.Namespace) -> str:
    """The memory savers not yet used, then more GPUs (a hint that suggested what was already given)."""
    untried = [flag for flag, used in (
        ("--recompute full", args.recompute == "full"), ("--fp8", args.fp8), ("a smaller --micro-batch", args.micro_batch <= 1),
        ("the distributed optimizer (drop --no-distributed-optimizer)", not args.no_distributed_optimizer),
        ("a shorter --seq-len", False)) if not used]
    return ", ".join(untried) + f", or more GPUs or GPU memory than {args.gpus} x {args.gpu_memory_gb:g} GiB"
