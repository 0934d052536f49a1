"""``hf-to-keel`` and ``keel-to-hf`` for Llama-family and Nemotron models (the preset picks the family).

Both run in one process (a 1-rank world, TP1/PP1) and move through the full model:
HF ``config.json`` + ``*.safetensors`` -> megatron GPTModel -> Keel checkpoint
(``<out>/step_0000000``, reshardable: it loads at any tensor × pipeline layout), and back.
They need the ``__main__`` guard of the calling script (dist_checkpointing starts a
helper process); ``python -m engine.convert`` and ``keel convert`` have it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

import torch

from engine.config import ConfigError
from engine.convert.hf_reward import (
    REWARD_OVERRIDES,
    SCORE,
    exported_outputs,
    reward_head,
    sequence_classification_config,
    sequence_classification_state,
    with_reward_head,
)
from engine.convert.hf_tokenizer import export_tokenizer, tokenizer_override
from engine.convert.llama import (
    check_hf_config,
    hf_config_for,
    hf_model_overrides,
    hf_to_megatron_unread,
    megatron_to_hf,
)
from engine.files import write_text_atomic
from engine.models.presets import ModelPreset, resolve_preset

logger = logging.getLogger(__name__)


def read_hf_state(model_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``config.json`` and every tensor of the ``*.safetensors`` files in ``model_dir``."""
    from safetensors.torch import load_file

    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{model_dir}: no config.json; pass a Hugging Face model directory")
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{model_dir}: no *.safetensors weights (PyTorch .bin files are not read; re-save with "
                          "save_pretrained(safe_serialization=True))")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    if "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]  # tied checkpoints omit it
    return read_hf_config(config_path), state


ARCHITECTURE_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size")


def read_hf_config(path: Path) -> dict[str, Any]:
    """A model directory's ``config.json``, refused in one line when it is not JSON, not an object, or not a
    model's config (none of the architecture fields a Llama-family config has)."""
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read it: {exc}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object of model settings, got a {type(config).__name__}")
    missing = [key for key in ARCHITECTURE_KEYS if key not in config]
    if missing:
        raise ConfigError(f"{path}: no {', '.join(missing)}: not the config.json of a Hugging Face Llama-family or "
                          "Nemotron model (save the model with save_pretrained)")
    return config


def write_hf_state(out_dir: Path, preset: ModelPreset, state: dict[str, torch.Tensor],
                   token_ids: Optional[dict[str, int]] = None, extra: Optional[dict[str, Any]] = None) -> None:
    """``config.json`` (with the tokenizer's special ``token_ids`` when given, and then a
    ``generation_config.json`` that stops at EOS, and ``extra`` keys) and ``model.safetensors``."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    config = {**hf_config_for(preset), **(token_ids or {}), **(extra or {})}
    write_text_atomic(out_dir / "config.json", json.dumps(config, indent=2))
    if token_ids:
        write_text_atomic(out_dir / "generation_config.json", json.dumps(token_ids, indent=2))
    weights = out_dir / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights), metadata={"format": "pt"})
    weights.chmod(default_file_mode())  # safetensors creates its file 0600


def default_file_mode() -> int:
    """The mode ``open`` gives a new file: 0666 less the process's umask."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _single_rank_model(overrides: list[str], reward_outputs: int = 0) -> tuple[Any, Any, Any, Any]:
    """(config, parallel state, [GPTModel], preset) of a 1-rank TP1/PP1 world, fp32, uninitialised weights
    (every tensor is overwritten by the conversion); with ``reward_outputs``, a reward model's config and model
    of that many outputs."""
    from engine.algorithms.reward import RewardTrainConfig
    from engine.config import TrainConfig, load_config
    from engine.models.builder import build_gpt_chunks, transformer_config
    from engine.models.heads import RewardGPTModel
    from engine.parallel.layout import ParallelState

    cls = RewardTrainConfig if reward_outputs else TrainConfig
    config = load_config(cls, None, [*overrides, "model.layer_spec=local", "precision.dtype=fp32"])
    preset = resolve_preset(config.model)
    parallel = ParallelState.initialize_single_process()
    tconfig = transformer_config(preset, parallel.layout, config.precision, use_te=False)
    tconfig.perform_initialization = False
    chunks = build_gpt_chunks(preset, tconfig, use_te=False, virtual_pipeline=None,
                              model_cls=RewardGPTModel if reward_outputs else None,
                              model_kwargs={"num_outputs": reward_outputs} if reward_outputs else None)
    return config, parallel, chunks, preset


def _teardown(parallel: Any) -> None:
    parallel.shutdown()


def hf_to_keel(model_dir: str | Path, out_dir: str | Path, overrides: Optional[list[str]] = None) -> Path:
    """Convert a HF Llama or Nemotron directory into a Keel checkpoint under ``out_dir``; returns its path."""
    from engine.config import TrainConfig, load_config
    from engine.data.tokenizers import tokenizer_file

    # runs from this checkpoint tokenize as the model was trained (engine.checkpoint.inherit)
    overrides = tokenizer_override(list(overrides or []), tokenizer_file(str(model_dir)))
    hf_config, hf_state = read_hf_state(Path(model_dir))
    template = hf_config.get(BUILTIN_TEMPLATE_KEY)  # exported by keel-to-hf from a built-in template's model
    if isinstance(template, str) and not any(item.startswith("data.chat_template=") for item in overrides):
        overrides.append(f"data.chat_template={template}")
    head = reward_head(hf_config, hf_state, str(model_dir))  # a reward model's score layer, or None
    if not any(item.startswith("model.") for item in overrides):
        overrides += model_overrides_of(hf_config, str(model_dir))
    check_hf_config(hf_config, resolve_preset(load_config(TrainConfig, None, overrides).model))
    if head is None:
        return write_keel_checkpoint(hf_state, out_dir, overrides, source=str(model_dir))
    logger.info("%s: a one-label sequence-classification model: a Bradley-Terry reward model", model_dir)
    return write_keel_checkpoint(hf_state, out_dir, [*overrides, *REWARD_OVERRIDES], source=str(model_dir),
                                 head=head)


def model_overrides_of(hf_config: dict[str, Any], source: str) -> list[str]:
    """The ``model.*`` settings of ``config.json``: the preset of its shape where one matches, else its family's
    preset with every setting taken from the file (said in the log)."""
    preset = matching_hf_preset(hf_config)
    if preset is not None:
        logger.info("%s: config.json has the shape of model preset %s", source, preset)
        return [f"model.preset={preset}"]
    overrides = hf_model_overrides(hf_config)
    logger.info("%s: config.json matches no model preset; it is built from its own settings: %s", source,
                " ".join(overrides))
    return overrides


def matching_hf_preset(hf_config: dict[str, Any]) -> Optional[str]:
    """The first model preset that ``config.json`` describes (used when no model.* override is given), if any."""
    from engine.models.presets import PRESETS

    for name, preset in PRESETS.items():
        try:
            check_hf_config(hf_config, preset)
        except ConfigError:
            continue
        return name
    return None


def write_keel_checkpoint(hf_state: dict[str, torch.Tensor], out_dir: str | Path, overrides: list[str],
                          source: str, head: Optional[torch.Tensor] = None) -> Path:
    """Load a HF-named Llama/Nemotron state dict into the Keel model of ``overrides`` and save it (step 0); with
    a reward model's ``head`` (:mod:`engine.convert.hf_reward`), as a reward-model checkpoint."""
    from engine.checkpoint import dist as ckpt

    config, parallel, chunks, preset = _single_rank_model(overrides, 0 if head is None else head.shape[0])
    try:
        trunk, unread = hf_to_megatron_unread(hf_state, preset)
        unread = [name for name in unread if head is None or name != SCORE]
        if unread:
            raise ConfigError(f"{source}: weights Keel's {preset.name}-shaped model has no place for: "
                              f"{', '.join(unread[:4])}{' ...' if len(unread) > 4 else ''}; converted without them, "
                              "the model would compute another function")
        state = with_reward_head(trunk, head)
        missing, unexpected = chunks[0].load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise ConfigError(f"conversion mismatch: missing {missing}, unexpected {unexpected}")
        extra = {"model_signature": ckpt.model_signature(preset), "config": config.to_dict(), "source": source,
                 "algorithm": "convert" if head is None else "rm", "converted": True}
        path = ckpt.save(str(out_dir), 0, chunks, None, parallel, extra, keep_last=0)
    finally:
        _teardown(parallel)
    logger.info("wrote %s", path)
    return Path(path)


def keel_to_hf(checkpoint: str | Path, out_dir: str | Path, overrides: Optional[list[str]] = None) -> Path:
    """Convert a Keel checkpoint (any layout it was saved at) into a HF Llama or Nemotron directory (by the
    preset's family), with the checkpoint's tokenizer where it has a HF form."""
    from engine.checkpoint import dist as ckpt

    path = ckpt.locate(checkpoint)
    meta = ckpt.read_meta(path)
    outputs = exported_outputs(path, meta)  # 1: a Bradley-Terry reward model, as a sequence-classification model
    saved = meta.get("config", {})
    if not overrides:
        overrides = [f"model.{k}={v}" for k, v in saved.get("model", {}).items() if v is not None and k != "layer_spec"]
    config, parallel, chunks, preset = _single_rank_model([*overrides, *(REWARD_OVERRIDES if outputs else ())],
                                                          outputs)
    try:
        ckpt.load(path, chunks, None, parallel, ckpt.model_signature(preset), load_optimizer=False)
        state = dict(chunks[0].state_dict())
        score, bias = state.pop("reward_head.weight", None), state.pop("reward_head.bias", None)
        state = megatron_to_hf(state, preset)
    finally:
        _teardown(parallel)
    out = Path(out_dir)
    extra = _builtin_template(saved.get("data", {}).get("chat_template"), out)
    if score is not None:
        state = sequence_classification_state(state, score, bias, path)
        extra.update(sequence_classification_config(hf_config_for(preset)["architectures"][0]))
    token_ids = export_tokenizer(saved.get("data", {}).get("tokenizer"), out)
    write_hf_state(out, preset, state, token_ids, extra)
    logger.info("wrote %s", out_dir)
    return out


BUILTIN_TEMPLATE_KEY = "keel_chat_template"  # config.json: the Keel template a model was trained with


def _builtin_template(template: Optional[str], out: Path) -> dict[str, str]:
    """A model trained with one of Keel's own templates (``data.chat_template`` chatml, llama3, nemotron, plain,
    rendered by Keel, with no Jinja form written): said in a warning, and kept in ``config.json`` so that
    ``hf-to-keel`` gives the checkpoint the same template back (it would read ``auto``)."""
    if not template or template == "auto":
        return {}
    logger.warning("%s: the model was trained with Keel's built-in %r chat template, which is not written as a "
                   "Jinja chat_template (transformers' apply_chat_template does not render it; a chat_template in "
                   "tokenizer_config.json is the tokenizer's own): format prompts as Keel does; config.json keeps "
                   "it as %s, which hf-to-keel reads back", out, template, BUILTIN_TEMPLATE_KEY)
    return {BUILTIN_TEMPLATE_KEY: template}
