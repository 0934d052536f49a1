"""The tokenizer side of ``keel-to-hf`` and ``hf-to-keel``.

``keel-to-hf`` writes the checkpoint's tokenizer (its ``data.tokenizer``) beside the weights so that
transformers loads it: a HF ``tokenizer.json`` is copied, the byte-level BPE tokenizer built from a GGUF
file's metadata is saved as one, and ``tokenizer_config.json`` names the BOS/EOS/pad tokens Keel uses and
carries the chat template. The special ids go into ``config.json`` and ``generation_config.json`` for any
tokenizer, so ``generate`` stops at EOS. Byte and sentencepiece tokenizers have no ``tokenizer.json``
form here: a log line says that none is written.

``hf-to-keel`` records the tokenizer a converted checkpoint is used with, as an absolute path.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Optional

from engine.config import ConfigError

logger = logging.getLogger(__name__)

BUILTIN_TOKENIZERS = ("byte", "builtin-sp")


def special_ids(tokenizer: Any) -> dict[str, int]:
    """``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` of a Keel tokenizer, as HF configs name them."""
    return {"bos_token_id": int(tokenizer.bos_id), "eos_token_id": int(tokenizer.eos_id),
            "pad_token_id": int(tokenizer.pad_id)}


def export_tokenizer(spec: Optional[str], out_dir: Path) -> Optional[dict[str, int]]:
    """Write tokenizer ``spec`` (a checkpoint's ``data.tokenizer``) into ``out_dir`` for transformers where it
    has a HF form; the special ids for ``config.json``, or None when the tokenizer cannot be loaded here."""
    from engine.data.tokenizers import HFTokenizer, load_tokenizer

    spec = spec or "byte"
    try:
        tokenizer = load_tokenizer(spec)
    except ConfigError as exc:
        logger.warning("no tokenizer written to %s and no special token ids in config.json: the checkpoint's "
                       "tokenizer does not load here (%s); copy its tokenizer files beside the weights", out_dir, exc)
        return None
    if isinstance(tokenizer, HFTokenizer):
        _write_hf_tokenizer(spec, tokenizer, out_dir)
    else:
        logger.warning("data.tokenizer=%s has no Hugging Face tokenizer.json form: no tokenizer is written to %s "
                       "(config.json and generation_config.json carry its BOS/EOS/pad ids)", spec, out_dir)
    return special_ids(tokenizer)


def _write_hf_tokenizer(spec: str, tokenizer: Any, out_dir: Path) -> None:
    """``tokenizer.json`` and ``tokenizer_config.json`` of an :class:`~engine.data.tokenizers.HFTokenizer`."""
    import json

    from engine.data.tokenizer_types import _tokenizer_config
    from engine.data.tokenizers import tokenizer_file
    from engine.files import write_text_atomic

    source = tokenizer_file(spec)
    raw = tokenizer._tok  # the tokenizers.Tokenizer it wraps
    config: dict[str, Any] = {}
    out_dir.mkdir(parents=True, exist_ok=True)
    if source is not None and source.endswith(".json"):
        shutil.copyfile(source, out_dir / "tokenizer.json")
        config = _tokenizer_config(str(Path(source).resolve().parent))
    else:  # built from a GGUF file's metadata
        write_text_atomic(out_dir / "tokenizer.json", _with_bos_template(raw, tokenizer).to_str(pretty=True))
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    config.update({"bos_token": raw.id_to_token(tokenizer.bos_id), "eos_token": raw.id_to_token(tokenizer.eos_id),
                   "pad_token": raw.id_to_token(tokenizer.pad_id), "add_bos_token": bool(tokenizer.add_bos),
                   "clean_up_tokenization_spaces": bool(config.get("clean_up_tokenization_spaces", False))})
    if tokenizer.chat_template:
        config["chat_template"] = tokenizer.chat_template
    write_text_atomic(out_dir / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    logger.info("wrote the tokenizer of data.tokenizer=%s to %s", spec, out_dir)


def _with_bos_template(raw: Any, tokenizer: Any) -> Any:
    """A copy of ``raw`` that starts each sequence with BOS when the tokenizer adds one (as llama.cpp does for
    a GGUF file with ``add_bos_token``); ``raw`` itself when it does not."""
    if not tokenizer.add_bos:
        return raw
    from tokenizers import Tokenizer, processors

    bos = raw.id_to_token(tokenizer.bos_id)
    copy = Tokenizer.from_str(raw.to_str())
    copy.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                        special_tokens=[(bos, tokenizer.bos_id)])
    return copy


def tokenizer_override(overrides: list[str], default: Optional[str]) -> list[str]:
    """``overrides`` with ``data.tokenizer`` as an absolute path (a relative one would name another file once
    the checkpoint is used from elsewhere), or ``data.tokenizer=default`` when they set none and ``default``
    is given. A path that holds no tokenizer is refused."""
    from engine.data.tokenizers import tokenizer_file

    key = "data.tokenizer"
    given = [i for i, item in enumerate(overrides) if item.split("=", 1)[0].strip() == key]
    if not given:
        return [*overrides, f"{key}={Path(default).resolve()}"] if default else list(overrides)
    out = list(overrides)
    for index in given:
        spec = out[index].split("=", 1)[1].strip()
        if spec in BUILTIN_TOKENIZERS:
            continue
        if tokenizer_file(spec) is None:
            raise ConfigError(f"{key}={spec}: no such tokenizer file or directory (give a tokenizer.json, "
                              "tokenizer .model, .gguf file or a directory holding one, or byte / builtin-sp)")
        out[index] = f"{key}={Path(spec).resolve()}"
    return out
