"""The tokenizer side of ``keel-to-hf`` and ``hf-to-keel``.

``keel-to-hf`` writes the checkpoint's tokenizer (its ``data.tokenizer``) beside the weights so that
transformers loads it: a HF ``tokenizer.json`` is copied, the byte-level BPE tokenizer built from a GGUF
file's metadata is saved as one, and ``tokenizer_config.json`` names the BOS/EOS/pad tokens Keel uses and
carries the chat template. The special ids go into ``config.json`` and ``generation_config.json`` for any
tokenizer, so ``generate`` stops at EOS. A sentencepiece model (``builtin-sp``, a ``.model`` file) is written
as the ``tokenizer.json`` of :mod:`engine.convert.sentencepiece_json`, checked to give the model's ids first.
The byte tokenizer has no ``tokenizer.json`` form: a log line says that none is written.

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
    from engine.data.tokenizer_types import SentencePieceTokenizer
    from engine.data.tokenizers import HFTokenizer, load_tokenizer

    spec = spec or "byte"
    _remove_earlier_tokenizer(out_dir)
    try:
        tokenizer = load_tokenizer(spec)
    except ConfigError as exc:
        logger.warning("no tokenizer written to %s and no special token ids in config.json: the checkpoint's "
                       "tokenizer does not load here (%s); copy its tokenizer files beside the weights", out_dir, exc)
        return None
    if isinstance(tokenizer, HFTokenizer):
        _write_hf_tokenizer(spec, tokenizer, out_dir)
    elif isinstance(tokenizer, SentencePieceTokenizer):
        _write_sentencepiece(spec, tokenizer, out_dir)
    else:
        logger.warning("data.tokenizer=%s has no Hugging Face tokenizer.json form: no tokenizer is written to %s "
                       "(config.json and generation_config.json carry its BOS/EOS/pad ids)", spec, out_dir)
    return special_ids(tokenizer)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "chat_template.jinja")


def _remove_earlier_tokenizer(out_dir: Path) -> None:
    """An earlier export's tokenizer files in ``out_dir`` go: beside other weights, with another tokenizer (or
    none) written now, transformers and ``hf-to-keel`` would read them as this model's."""
    stale = [out_dir / name for name in TOKENIZER_FILES if (out_dir / name).is_file()]
    for path in stale:
        path.unlink()
    if stale:
        logger.info("removed an earlier export's tokenizer files from %s: %s", out_dir, ", ".join(p.name for p in stale))


def _write_sentencepiece(spec: str, tokenizer: Any, out_dir: Path) -> None:
    """``tokenizer.json`` (see :mod:`engine.convert.sentencepiece_json`) and ``tokenizer_config.json`` of a
    sentencepiece tokenizer, written only when the conversion gives Keel's ids on the probe texts."""
    from engine.convert.sentencepiece_json import mismatches, to_hf_tokenizer

    try:
        raw = to_hf_tokenizer(tokenizer.serialized())
    except ValueError as exc:
        logger.warning("data.tokenizer=%s: no tokenizer is written to %s: %s", spec, out_dir, exc)
        return
    wrong = mismatches(tokenizer, raw)
    if wrong:
        logger.warning("data.tokenizer=%s: its tokenizers form gives other ids or text than the model on %r: no "
                       "tokenizer is written to %s (config.json carries its BOS/EOS/pad ids)", spec, wrong[0], out_dir)
        return
    _write_files(spec, tokenizer, raw, _with_bos_template(raw, tokenizer).to_str(pretty=True), {}, out_dir)


def _write_hf_tokenizer(spec: str, tokenizer: Any, out_dir: Path) -> None:
    """``tokenizer.json`` and ``tokenizer_config.json`` of an :class:`~engine.data.tokenizers.HFTokenizer`."""
    from engine.data.tokenizer_types import _tokenizer_config
    from engine.data.tokenizers import tokenizer_file

    source = tokenizer_file(spec)
    raw = tokenizer._tok  # the tokenizers.Tokenizer it wraps
    if source is not None and source.endswith(".json"):
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, out_dir / "tokenizer.json")
        _write_files(spec, tokenizer, raw, None, _tokenizer_config(str(Path(source).resolve().parent)), out_dir)
    else:  # built from a GGUF file's metadata
        _write_files(spec, tokenizer, raw, _with_bos_template(raw, tokenizer).to_str(pretty=True), {}, out_dir)


def _write_files(spec: str, tokenizer: Any, raw: Any, tokenizer_json: Optional[str], config: dict[str, Any],
                 out_dir: Path) -> None:
    """``tokenizer.json`` (unless None: already there) and ``tokenizer_config.json``: ``config`` with the special
    tokens Keel uses, whether it adds BOS, and the chat template."""
    import json

    from engine.files import write_text_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_json is not None:
        write_text_atomic(out_dir / "tokenizer.json", tokenizer_json)
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
