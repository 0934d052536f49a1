"""A run that starts from ``checkpoint.load`` takes the model and tokenizer the checkpoint was made with.

A checkpoint's ``keel.json`` stores the resolved config of the run (or conversion) that wrote
it. Fine-tuning a converted SmolLM2 with ``checkpoint.load=...`` alone used to build the
default preset (a shape error) or, with ``model.preset`` given, train the pretrained weights
on the default byte tokenizer: a loss of 14 instead of 2, and nothing said. Now every
architecture field (``model.preset`` and its shape overrides) and ``data.tokenizer`` /
``data.chat_template`` that the user did not set, in the YAML or on the command line, come
from the checkpoint, and the run says which (``config.inherited``). What the user sets wins:
setting any architecture field keeps the model's shape the user's; the RoPE and norm settings
(:data:`ENCODING`) are taken one by one unless the user sets them, since a shape the user names
does not say how positions are encoded.
"""

from __future__ import annotations

import filecmp
from pathlib import Path
from typing import Any, Optional

from engine.errors import ConfigError

ARCHITECTURE = ("preset", "num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                "ffn_hidden_size", "vocab_size", "max_sequence_length", "tie_embeddings")
# how positions and norms are computed: each taken on its own unless the user sets it, also under a named preset
# (model.preset=llama3-70b with a converted Llama-3.1-70B kept the shape and lost its RoPE scaling)
ENCODING = ("rotary_base", "layernorm_epsilon", "rope_scaling_factor")
DATA_KEYS = ("tokenizer", "chat_template")


def checkpoint_config(load: str) -> dict[str, Any]:
    """The config stored with checkpoint ``load`` (a step directory, a run's checkpoint directory or a
    ``latest``/``best`` pointer); empty when it is not a complete checkpoint (the trainer says so later)."""
    from engine.checkpoint import dist as ckpt

    path = ckpt.resolve(load)
    if not ckpt.is_complete(path):
        path = ckpt.find_latest(str(path)) or path
    if not ckpt.is_complete(path):
        return {}
    try:
        return dict(ckpt.read_meta(path).get("config") or {})
    except ckpt.CheckpointError:
        return {}


def inherit_from_checkpoint(cls: type, data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``data`` (the user's config tree) completed from its ``checkpoint.load``; and what was taken.

    Only configs with ``checkpoint``, ``model`` and ``data`` sections take part.
    """
    fields = getattr(cls, "__dataclass_fields__", {})
    load = (data.get("checkpoint") or {}).get("load")
    if not load or not all(name in fields for name in ("checkpoint", "model", "data")):
        return data, {}
    saved = checkpoint_config(str(load))
    if not saved:
        return data, {}
    taken: dict[str, Any] = {}
    user_model = dict(data.get("model") or {})
    saved_model = saved.get("model") or {}
    if not any(key in user_model for key in ARCHITECTURE):
        for key in ARCHITECTURE:
            if saved_model.get(key) is not None:
                user_model[key] = taken[f"model.{key}"] = saved_model[key]
    for key in ENCODING:
        if key not in user_model and saved_model.get(key) is not None:
            user_model[key] = taken[f"model.{key}"] = saved_model[key]
    user_data = dict(data.get("data") or {})
    for key in DATA_KEYS:
        value = (saved.get("data") or {}).get(key)
        if key not in user_data and value is not None:
            user_data[key] = taken[f"data.{key}"] = value
    refuse_other_tokenizer(str(load), user_data.get("tokenizer"), (saved.get("data") or {}).get("tokenizer"))
    if not taken:
        return data, {}
    return dict(data, model=user_model, data=user_data), taken


def fine_tuning_lr(cls: type, data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``data`` with ``optimizer.lr`` set to ``cls.FINE_TUNE_LR`` when it starts from ``checkpoint.load`` and
    sets no rate of its own; and what was set. The field's default (3e-3) trains tiny models from scratch:
    on a converted SmolLM2 it took the SFT loss from 1.0 to 5.3 in three steps."""
    lr = getattr(cls, "FINE_TUNE_LR", None)
    optimizer = dict(data.get("optimizer") or {})
    if lr is None or not (data.get("checkpoint") or {}).get("load") or "lr" in optimizer:
        return data, {}
    optimizer["lr"] = lr
    return dict(data, optimizer=optimizer), {"optimizer.lr": lr}


def refuse_other_tokenizer(load: str, mine: Optional[str], theirs: Optional[str],
                           setting: str = "checkpoint.load") -> None:
    """A ``data.tokenizer`` the user set that is not the one ``checkpoint.load`` was trained with is refused:
    its ids would stand for other tokens, and the run would train on, with a loss that only looks high.
    The same file under another path or name counts as the same; a checkpoint whose tokenizer file is not
    on this machine (moved with the weights to another place) cannot be compared and is let through.
    ``setting`` names the option that names the checkpoint: a run that resumes takes nothing from it."""
    if mine is None or theirs is None or mine == theirs:
        return
    from engine.data.tokenizers import tokenizer_file

    mine_file, theirs_file = tokenizer_file(mine), tokenizer_file(theirs)
    if theirs_file is None and theirs not in ("byte", "builtin-sp"):
        return
    if mine_file is not None and theirs_file is not None and filecmp.cmp(mine_file, theirs_file, shallow=False):
        return
    remedy = "Leave data.tokenizer unset to take the checkpoint's" if setting == "checkpoint.load" else \
        f"Set data.tokenizer={theirs}"
    raise ConfigError(f"data.tokenizer={mine} is not the tokenizer {setting}={load} was trained with "
                      f"({theirs}): its token ids would mean other tokens. {remedy}")


def describe_inherited(load: str, taken: dict[str, Any]) -> str:
    """One log line: what a run took from its ``checkpoint.load``."""
    pairs = ", ".join(f"{key}={value}" for key, value in taken.items() if key != "optimizer.lr")
    line = f"from checkpoint.load={Path(load)}: {pairs} (set them to override)" if pairs else ""
    if "optimizer.lr" in taken:
        line += "; " if line else ""
        from engine.config import OptimizerConfig

        line += (f"optimizer.lr={taken['optimizer.lr']:g}, the default for fine-tuning a checkpoint (not "
                 f"{OptimizerConfig().lr:g}, which trains from scratch; set optimizer.lr to choose)")
    return line
