"""Run configuration: nested dataclasses, loaded from YAML, overridden by ``key=value``.

Every field carries its documentation in ``metadata["doc"]``; ``keel config show``
prints them. Validation happens in ``__post_init__`` (per section) and in
:meth:`TrainConfig.validate` (across sections), before any process group exists, and
every message says which field is wrong and what to do.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional, Union, cast, get_args, get_origin, get_type_hints

import yaml

# Defined in engine.errors (so modules imported below in validate() need not import
# this one back); re-exported here, where every existing caller imports it from.
from engine.config_hints import FOREIGN_KEYS as FOREIGN_KEYS
from engine.errors import ConfigError as ConfigError
from engine.errors import UnknownKeyError


def doc(text: str, default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A dataclass field with its documentation attached."""
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"doc": text}, **kwargs)
    return field(default=default, metadata={"doc": text}, **kwargs)


def _choice(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(repr, allowed))}")


def _positive(name: str, value: Optional[float], allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name}={value} must be {'>= 0' if allow_zero else '> 0'}")


@dataclass
class RunConfig:
    output_dir: str = doc("Directory of this run: config, metrics, TensorBoard events, checkpoints.", "runs/sft-demo")
    seed: int = doc("Seed for weight initialisation, data order and dropout.", 1234)
    train_steps: int = doc("Number of optimizer steps (global batches) to train for.", 30)
    eval_interval: int = doc("Run validation every N steps (0 = never).", 0)
    eval_batches: int = doc("Number of global batches used per validation.", 2)
    eval_at_start: bool = doc("Also validate before the first step of a fresh run (logged as step 0).", False)

    def __post_init__(self) -> None:
        _positive("run.train_steps", self.train_steps)
        _positive("run.eval_interval", self.eval_interval, allow_zero=True)
        _positive("run.eval_batches", self.eval_batches)


@dataclass
class ModelConfig:
    preset: str = doc("Model preset name (see `keel config presets`).", "tiny-llama")
    num_layers: Optional[int] = doc("Override the preset's number of transformer layers.", None)
    hidden_size: Optional[int] = doc("Override the preset's hidden size.", None)
    num_attention_heads: Optional[int] = doc("Override the preset's attention heads.", None)
    num_query_groups: Optional[int] = doc("Override the preset's KV heads (GQA groups).", None)
    ffn_hidden_size: Optional[int] = doc("Override the preset's MLP hidden size.", None)
    vocab_size: Optional[int] = doc("Override the preset's vocabulary size (must cover the tokenizer).", None)
    max_sequence_length: Optional[int] = doc("Override the preset's maximum sequence length.", None)
    rotary_base: Optional[float] = doc("Override the preset's RoPE base (transformers' rope_theta).", None)
    layernorm_epsilon: Optional[float] = doc(
        "Override the preset's norm epsilon (transformers' rms_norm_eps, or norm_eps for Nemotron).", None)
    tie_embeddings: Optional[bool] = doc(
        "Override whether the output layer shares the input embedding's weights (tie_word_embeddings).", None)
    rope_scaling_factor: Optional[float] = doc(
        "Llama 3.x RoPE scaling (transformers' rope_type 'llama3' with low/high frequency factors 1 and 4 over "
        "8192 original positions): its factor, 8 for Llama-3.1, 32 for Llama-3.2; None: no scaling.", None)
    init: str = doc(
        "Weight initialisation: 'layout_invariant' draws every full tensor from a per-name seed so any "
        "TP/PP layout starts from identical weights; 'megatron' uses megatron-core's own initialisers.",
        "layout_invariant",
    )
    init_std: float = doc("Standard deviation of the normal weight initialisation.", 0.02)
    layer_spec: str = doc("Layer implementation: 'auto' (TE on GPU when installed, else local), 'te' or 'local'.", "auto")
    recompute: str = doc("Activation recomputation: 'none', 'selective' (attention core) or 'full'.", "none")
    recompute_num_layers: int = doc("With recompute=full: number of layers per recomputed block.", 1)

    def __post_init__(self) -> None:
        _choice("model.init", self.init, ("layout_invariant", "megatron"))
        _choice("model.layer_spec", self.layer_spec, ("auto", "te", "local"))
        _choice("model.recompute", self.recompute, ("none", "selective", "full"))
        for name in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                     "vocab_size", "max_sequence_length", "rotary_base", "layernorm_epsilon"):
            _positive(f"model.{name}", getattr(self, name))
        if self.rope_scaling_factor is not None and not self.rope_scaling_factor > 1:
            raise ConfigError(f"model.rope_scaling_factor={self.rope_scaling_factor} must be above 1 (None: no scaling)")


@dataclass
class ParallelConfig:
    tensor: int = doc("Tensor-parallel size (splits attention heads, MLP and vocabulary).", 1)
    pipeline: int = doc("Pipeline-parallel size (splits layers into stages).", 1)
    virtual_pipeline: Optional[int] = doc("Model chunks per pipeline stage for the interleaved schedule (None = off).", None)
    data: Optional[int] = doc("Data-parallel size; None derives it as world_size / (tensor * pipeline).", None)
    sequence_parallel: bool = doc("Shard LayerNorm/dropout activations along the sequence (needs tensor > 1).", False)
    distributed_optimizer: bool = doc("Shard optimizer state over data-parallel ranks (ZeRO-1, megatron).", False)
    backend: str = doc("torch.distributed backend: 'auto' (nccl with CUDA, else gloo), 'nccl' or 'gloo'.", "auto")
    timeout_minutes: float = doc(
        "Longest wait, in minutes, of the rendezvous and of any collective on any process group (the world's "
        "and megatron's): a rank waiting this long on a dead or hung rank stops with one line naming the "
        "failure. Raise it for very slow checkpoint writes or first-step compilation.", 30.0)

    def __post_init__(self) -> None:
        _positive("parallel.tensor", self.tensor)
        _positive("parallel.timeout_minutes", self.timeout_minutes)
        _positive("parallel.pipeline", self.pipeline)
        _positive("parallel.virtual_pipeline", self.virtual_pipeline)
        _positive("parallel.data", self.data)
        _choice("parallel.backend", self.backend, ("auto", "nccl", "gloo"))
        if self.sequence_parallel and self.tensor == 1:
            raise ConfigError("parallel.sequence_parallel=true needs parallel.tensor > 1")
        if self.virtual_pipeline is not None and self.pipeline == 1:
            raise ConfigError("parallel.virtual_pipeline needs parallel.pipeline > 1")


@dataclass
class OptimizerConfig:
    lr: float = doc("Peak learning rate.", 3e-3)
    min_lr: float = doc("Final learning rate of the cosine schedule.", 0.0)
    weight_decay: float = doc("Decoupled weight decay (AdamW).", 0.0)
    beta1: float = doc("Adam beta1.", 0.9)
    beta2: float = doc("Adam beta2.", 0.95)
    eps: float = doc("Adam epsilon.", 1e-8)
    clip_grad: float = doc("Clip the global gradient norm to this value (0 = no clipping).", 1.0)

    def __post_init__(self) -> None:
        _positive("optimizer.lr", self.lr)
        _positive("optimizer.min_lr", self.min_lr, allow_zero=True)
        _positive("optimizer.weight_decay", self.weight_decay, allow_zero=True)
        _positive("optimizer.clip_grad", self.clip_grad, allow_zero=True)
        if self.min_lr > self.lr:
            raise ConfigError(f"optimizer.min_lr={self.min_lr} exceeds optimizer.lr={self.lr}; lower optimizer.min_lr "
                              "(the cosine schedule decays from lr down to min_lr)")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"optimizer.{name}={getattr(self, name)} must be in [0, 1)")


@dataclass
class SchedulerConfig:
    type: str = doc("Learning-rate schedule after warm-up: 'constant' or 'cosine'.", "cosine")
    warmup_steps: int = doc("Linear warm-up steps from 0 to optimizer.lr.", 3)
    decay_steps: Optional[int] = doc(
        "Steps over which the cosine decays to min_lr (None = run.train_steps + 1: the last step still trains).", None)

    def __post_init__(self) -> None:
        _choice("scheduler.type", self.type, ("constant", "cosine"))
        _positive("scheduler.warmup_steps", self.warmup_steps, allow_zero=True)
        _positive("scheduler.decay_steps", self.decay_steps)


DATA_FORMATS = ("chat", "text", "attributes", "helpsteer2_preference", "pairs", "prompts")


@dataclass
class DataConfig:
    source: str = doc(
        "Training data: 'builtin:<name>' (synthetic, generated: sft, helpsteer, ...; 'builtin:<name>:validation' "
        "or ':eval' asks about words and numbers the train split never uses), a .jsonl/.json/.parquet "
        "file, or 'hf:<org>/<name>[:<split>]' for a Hugging Face data set.", "builtin:sft")
    validation_source: Optional[str] = doc(
        "Validation data (same forms as source); None = from data.source: a held-out data.validation_fraction of "
        "its rows (reward models hold out whole prompts, and draw fresh rows from a builtin generator).", None)
    format: str = doc(
        "Row format: 'chat' (messages), 'text', 'attributes' (HelpSteer ratings), 'helpsteer2_preference', "
        "'pairs' (prompt/chosen/rejected) or 'prompts'.", "chat")
    tokenizer: str = doc(
        "Tokenizer: 'byte' (built-in byte-level), 'builtin-sp' (sentencepiece trained on the synthetic data), "
        "or a sentencepiece .model, a tokenizer.json, a directory holding one, or a .gguf file.", "byte")
    chat_template: str = doc(
        "Chat template for chat rows: 'auto' (the model's own template when the tokenizer carries one: "
        "tokenizer_config.json chat_template or GGUF tokenizer.chat_template, rendered in a Jinja sandbox; "
        "else 'plain'), 'plain', 'llama3', 'nemotron' or 'chatml'.", "auto")
    pack: bool = doc("Pack several SFT documents per sample (block-diagonal attention, per-document positions).", False)
    group_by_length: bool = doc(
        "Order each step's rows by length before cutting them into micro-batches, and cut every micro-batch "
        "to its longest row (unpacked data; exact: no position after a row's end is computed or used; "
        "with pipeline stages all micro-batches of a step share the step's longest row).", True)
    seq_length: int = doc("Tokens per sample after padding/truncation.", 128)
    micro_batch_size: int = doc("Samples per micro-batch on one data-parallel rank.", 2)
    global_batch_size: int = doc("Samples per optimizer step over all data-parallel ranks.", 8)
    loss_on: str = doc("Which tokens carry the SFT loss: 'assistant' (responses only) or 'all'.", "assistant")
    num_samples: int = doc("Number of rows generated for builtin sources.", 512)
    validation_fraction: float = doc("Fraction of rows held out for validation when no validation_source.", 0.05)
    on_error: str = doc("Bad rows: 'raise' stops with the file, row and field; 'skip' drops and counts them.", "raise")
    overlong: str = doc(
        "Rows longer than seq_length: 'truncate' (cut the end; SFT), 'drop', or 'cut_prompt' (reward models' "
        "default: keep the response whole, cut the prompt from the left keeping the template's structure, and "
        "drop the row only when the response alone does not fit). Counts are logged per source.", "truncate")

    def __post_init__(self) -> None:
        _choice("data.format", self.format, DATA_FORMATS)
        _choice("data.loss_on", self.loss_on, ("assistant", "all"))
        _choice("data.on_error", self.on_error, ("raise", "skip"))
        _choice("data.overlong", self.overlong, ("truncate", "drop", "cut_prompt"))
        _choice("data.chat_template", self.chat_template, ("auto", "plain", "llama3", "nemotron", "chatml"))
        _positive("data.seq_length", self.seq_length)
        _positive("data.micro_batch_size", self.micro_batch_size)
        _positive("data.global_batch_size", self.global_batch_size)
        _positive("data.num_samples", self.num_samples)
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ConfigError(f"data.validation_fraction={self.validation_fraction} must be in [0, 1)")


@dataclass
class CheckpointConfig:
    dir: Optional[str] = doc("Checkpoint directory (None = <run.output_dir>/checkpoints).", None)
    save_interval: int = doc("Save every N steps (0 = only at the end and on SIGTERM); a validation that improves on "
                             "the best so far is saved too, to be marked best.", 10)
    resume: str = doc("'auto' continues from the newest complete checkpoint, 'none' starts fresh, or a checkpoint path.", "auto")
    load: Optional[str] = doc("Initialise model weights (only) from this checkpoint, e.g. an SFT run for a reward model.", None)
    keep_last: int = doc("Keep the newest N checkpoints (0 = keep all).", 3)
    save_optimizer: bool = doc("Include optimizer state (needed to resume exactly).", True)

    def __post_init__(self) -> None:
        _positive("checkpoint.save_interval", self.save_interval, allow_zero=True)
        _positive("checkpoint.keep_last", self.keep_last, allow_zero=True)


@dataclass
class LoggingConfig:
    log_interval: int = doc("Write metrics every N steps.", 1)
    tensorboard: bool = doc("Write TensorBoard events to <run.output_dir>/tensorboard.", True)
    progress: bool = doc("Show a progress bar on rank 0.", True)
    level: str = doc("Python logging level.", "INFO")

    def __post_init__(self) -> None:
        _positive("logging.log_interval", self.log_interval)
        _choice("logging.level", self.level.upper(), ("DEBUG", "INFO", "WARNING", "ERROR"))


@dataclass
class PrecisionConfig:
    dtype: str = doc("Parameter/compute dtype: 'fp32' or 'bf16' (bf16 keeps fp32 master weights in the optimizer).", "fp32")
    fp8: Optional[str] = doc("FP8 format via Transformer Engine: None, 'e4m3' or 'hybrid' (e4m3 fwd, e5m2 bwd).", None)
    fp8_amax_history_len: int = doc("FP8 delayed scaling: amax history length.", 1024)
    fp8_amax_compute_algo: str = doc("FP8 delayed scaling: 'max' or 'most_recent'.", "max")
    fp8_margin: int = doc("FP8 delayed scaling: margin for the scaling factor.", 0)
    grad_reduce_in_fp32: bool = doc("Accumulate and all-reduce gradients in fp32 (False = in the parameter dtype).", True)

    def __post_init__(self) -> None:
        _choice("precision.dtype", self.dtype, ("fp32", "bf16"))
        _choice("precision.fp8", self.fp8, (None, "e4m3", "hybrid"))
        _choice("precision.fp8_amax_compute_algo", self.fp8_amax_compute_algo, ("max", "most_recent"))
        _positive("precision.fp8_amax_history_len", self.fp8_amax_history_len)
        if self.fp8 is not None and self.dtype != "bf16":
            raise ConfigError("precision.fp8 needs precision.dtype=bf16")

    @property
    def torch_dtype(self) -> Any:
        import torch

        return torch.bfloat16 if self.dtype == "bf16" else torch.float32


@dataclass
class TrainConfig:
    """Everything one training run needs. Algorithms extend this with their own section."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)

    # data.overlong values this algorithm accepts (reward models never cut a response)
    OVERLONG: ClassVar[tuple[str, ...]] = ("truncate", "drop")
    # data.format values this algorithm trains on (see data_formats)
    FORMATS: ClassVar[tuple[str, ...]] = DATA_FORMATS
    UNREAD: ClassVar[dict[str, str]] = {}  # fields this run does not read: the field that does their work instead
    # fields this run has no use for: why (a value other than the default is refused, not silently dropped)
    IGNORED: ClassVar[dict[str, str]] = {}
    # optimizer.lr of a run that starts from checkpoint.load without one (the field's default trains from scratch;
    # it wrecks a pretrained model); None keeps the default (engine.checkpoint.inherit.fine_tuning_lr)
    FINE_TUNE_LR: ClassVar[Optional[float]] = None
    # fields taken from checkpoint.load's stored config (engine.checkpoint.inherit), set by load_config
    inherited: ClassVar[dict[str, Any]] = {}

    def __post_init__(self) -> None:
        if self.data.overlong not in self.OVERLONG:
            raise ConfigError(f"data.overlong={self.data.overlong!r} is not one of "
                              f"{', '.join(map(repr, self.OVERLONG))} for this algorithm")
        if self.checkpoint.dir is None:
            self.checkpoint.dir = os.path.join(self.run.output_dir, "checkpoints")
        self.refuse_ignored()

    def check_checkpoints(self) -> None:
        """Checks of the checkpoints this run names besides ``checkpoint.load`` (a reference, a reward model),
        run by the trainer before any model is built: :meth:`validate` reads no file."""

    def check_fresh_start(self) -> None:
        """Checks of what only a run that starts afresh reads (not one that resumes), before any model is built."""

    def check_named_code(self) -> None:
        """Checks of the code this run names (reward functions: imported, and their signature and kwargs fitting
        the call the run makes), for ``keel config show`` and ``keel data validate --config``; the trainer makes
        them on one rank before any model is built."""

    def set_otherwise(self, names: Iterable[str]) -> Iterator[tuple[str, Any]]:
        """(name, value) of each ``section.field`` of ``names`` this config sets otherwise than its algorithm's
        default (the section's own default factory)."""
        fields = type(self).__dataclass_fields__
        for name in names:
            section, key = name.split(".", 1)
            defaults = fields[section].default_factory()  # type: ignore[misc,operator]
            value = getattr(getattr(self, section), key)
            if value != getattr(defaults, key):
                yield name, value

    def refuse_ignored(self) -> None:
        """A setting of :attr:`IGNORED` given another value than this algorithm's default is a one-line error:
        ``data.pack=true`` on a reward model or DPO run was accepted and did nothing."""
        for name, value in self.set_otherwise(self.IGNORED):
            value = str(value).lower() if isinstance(value, bool) else value
            raise ConfigError(f"{name}={value} does nothing in this run: {self.IGNORED[name]}; leave {name} unset")

    def data_formats(self) -> tuple[str, ...]:
        """The data.format values this run trains on; a row's format hint names no other."""
        return self.FORMATS

    def validate(self, world_size: int) -> None:
        """Cross-section checks: layout vs. world size and model shape, batch sizes, packing vs. layer spec."""
        from engine.models.builder import check_packing, use_transformer_engine
        from engine.models.presets import resolve_preset
        from engine.parallel.layout import ParallelLayout

        check_packing(self.data.pack, use_transformer_engine(self.model.layer_spec))
        preset = resolve_preset(self.model)
        layout = ParallelLayout.from_config(self.parallel, world_size)
        layout.check_model(preset)
        layout.check_batches(self.data.micro_batch_size, self.data.global_batch_size, self.data.seq_length)
        if self.data.seq_length > preset.max_sequence_length:
            raise ConfigError(
                f"data.seq_length={self.data.seq_length} exceeds the model's max_sequence_length="
                f"{preset.max_sequence_length}; lower data.seq_length or set model.max_sequence_length"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- loading / overrides


def _is_optional(tp: Any) -> tuple[bool, Any]:
    if get_origin(tp) is Union:
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def _coerce(value: Any, tp: Any, where: str) -> Any:
    optional, inner = _is_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: null is not allowed (expected {getattr(inner, '__name__', inner)})")
    if inner is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if inner is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if inner is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if inner is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if get_origin(inner) in (list, dict) or inner in (list, dict):
        expected = get_origin(inner) or inner
        if isinstance(value, expected):
            return value
        raise ConfigError(f"{where}: expected a {expected.__name__}, got {value!r}")
    return value


def from_dict(cls: type, data: dict[str, Any], source: str = "<dict>", prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict; unknown keys are errors naming the key and file (and Keel's
    name of a well-known setting of another framework, :data:`FOREIGN_KEYS`)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            close = [k for k in known if k.startswith(str(key)[:3])]
            hint = f" (did you mean {', '.join(prefix + c for c in close)}?)" if close else ""
            if f"{prefix}{key}" in FOREIGN_KEYS:  # exact, where the guess above may mislead
                whose, ours, note = FOREIGN_KEYS[f"{prefix}{key}"]
                said = f"is {ours} here" if ours else "has no setting here"
                hint = f" ({whose}'{'' if whose.endswith('s') else 's'} {key} {said}{': ' + note if note else ''})"
            raise UnknownKeyError(f"{source}: unknown config key '{prefix}{key}'{hint}", f"{prefix}{key}")
        tp = hints[key]
        where = f"{source}: {prefix}{key}"
        if is_dataclass(tp):
            # Start from this field's own default (an algorithm may customise a section's defaults).
            factory = known[key].default_factory
            base = dataclasses.asdict(factory()) if factory is not dataclasses.MISSING else {}  # type: ignore[misc]
            if not isinstance(value or {}, dict):
                raise ConfigError(f"{source}: section '{prefix}{key}' must be a mapping, got {value!r}")
            kwargs[key] = from_dict(cast(type, tp), merge_dicts(base, value or {}), source, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, where)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def checked_overrides(cls: type, overrides: list[str]) -> dict[str, Any]:
    """:func:`parse_overrides`, checked against ``cls``'s schema on their own: an unknown key or a bad value is
    named as the command line's, not as that of the file or checkpoint they are merged into."""
    tree = parse_overrides(overrides)
    from_dict(cls, merge_dicts(_defaults_as_dict(cls), tree), "command-line overrides")
    return tree


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=x"]`` into a nested dict, values parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override '{item}': value is not valid YAML ({exc})") from None
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with an earlier override of '{part}'")
        node[parts[-1]] = value
    return tree


def merge_dicts(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = value
    return out


def load_config(cls: type, path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Any:
    """Load ``cls`` from an optional YAML file plus ``key=value`` overrides (overrides win), then take the
    model and tokenizer fields neither sets from ``checkpoint.load`` (:mod:`engine.checkpoint.inherit`)."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    if overrides:
        override_tree = checked_overrides(cls, overrides)
        data = merge_dicts(data, override_tree)
        source = f"{source} + command-line overrides" if path else "command-line overrides"
    from engine.checkpoint.inherit import fine_tuning_lr, inherit_from_checkpoint

    data, taken = inherit_from_checkpoint(cls, data)
    data, tuned = fine_tuning_lr(cls, data)
    taken.update(tuned)
    if taken:
        source = f"{source} + the config of checkpoint.load ({', '.join(taken)})"
    config = from_dict(cls, data, source)
    if taken:
        config.inherited = taken
    return config


def _defaults_as_dict(cls: type) -> dict[str, Any]:
    return dataclasses.asdict(cls())


def save_config(config: Any, path: str) -> None:
    """Write the resolved config as YAML (atomically)."""
    from engine.files import atomic_open

    with atomic_open(path) as fh:
        yaml.safe_dump(dataclasses.asdict(config), fh, sort_keys=False)


def iter_fields(cls: type, prefix: str = "", instance: Any = None) -> Iterator[tuple[str, str, Any, str]]:
    """Yield (dotted name, type name, default, doc) for every leaf field of ``cls``.

    Defaults are those of a default-constructed ``cls``, so a section whose owner sets its own
    defaults (``steerlm2``'s ``iterative.iterations=2``) is listed with those, not the section's own.
    """
    hints = get_type_hints(cls)
    instance = cls() if instance is None else instance
    for f in fields(cls):
        tp = hints[f.name]
        value = getattr(instance, f.name)
        if is_dataclass(tp):
            yield from iter_fields(cast(type, tp), f"{prefix}{f.name}.", value)
            continue
        optional, inner = _is_optional(tp)
        tname = getattr(inner, "__name__", str(inner)) + (" | None" if optional else "")
        yield f"{prefix}{f.name}", tname, value, f.metadata.get("doc", "")


def _defaults_by_algorithm(classes: dict[str, type]) -> dict[str, str]:
    """For each field whose default differs among ``classes`` (algorithm name -> config class): the defaults,
    e.g. ``"sft 'runs/sft-demo', rm 'runs/rm-demo'"`` (algorithms of one default grouped)."""
    values: dict[str, dict[str, list[str]]] = {}
    for algorithm, cls in classes.items():
        for name, _, default, _ in iter_fields(cls):
            values.setdefault(name, {}).setdefault(repr(default), []).append(algorithm)
    return {name: "; ".join(f"{', '.join(names)} {value}" for value, names in by_value.items())
            for name, by_value in values.items() if len(by_value) > 1}


def describe(cls: type, algorithms: Optional[dict[str, type]] = None) -> str:
    """Human-readable listing of every field, its type, default and documentation; with ``algorithms``
    (name -> config class), a field whose default differs among them lists each one's."""
    lines = []
    section = None
    unread, fine_tune = getattr(cls, "UNREAD", {}), getattr(cls, "FINE_TUNE_LR", None)
    differ = _defaults_by_algorithm(algorithms) if algorithms else {}
    for name, tname, default, text in iter_fields(cls):
        head = name.split(".")[0]
        if head != section:
            section = head
            lines.append(f"\n[{section}]")
        if name in unread:
            text = f"Not read by this algorithm: set {unread[name]}."
        elif name in getattr(cls, "IGNORED", {}):
            text = f"Not read by this algorithm: {cls.IGNORED[name]}."  # type: ignore[attr-defined]
        if name == "optimizer.lr" and fine_tune is not None:
            text += f" With checkpoint.load and no optimizer.lr: {fine_tune:g} (fine-tuning a model)."
        shown = f"defaults: {differ[name]}" if name in differ else f"default {default!r}"
        lines.append(f"  {name} ({tname}, {shown})\n      {text}")
    return "\n".join(lines).lstrip("\n")
