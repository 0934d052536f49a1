"""Tokenizers behind one small interface.

``ByteTokenizer`` is the default: UTF-8 bytes shifted past three special ids, so it
needs no file and round-trips any text. :func:`load_tokenizer` dispatches on the spec:

=====================  ===============================================================
``byte``               :class:`ByteTokenizer`
``builtin-sp``         a 512-piece sentencepiece model trained on the synthetic data
                       (:mod:`engine.data.builtin_tokenizer`), cached after first use
``*.model``            a sentencepiece model (:class:`SentencePieceTokenizer`)
``*.json``             a HF ``tokenizer.json`` (:class:`HFTokenizer`), special tokens
                       from a ``tokenizer_config.json`` beside it when present
``*.gguf``             the tokenizer embedded in a GGUF file (:mod:`engine.data.gguf_tokenizer`)
a directory            its ``tokenizer.json``, else its ``tokenizer.model``
=====================  ===============================================================

Special tokens are explicit. ``encode`` never adds BOS/EOS and treats its text as
plain text: a string such as ``"<|eot_id|>"`` inside user content is *not* turned into
the special token (no prompt injection through data). Chat templates insert specials by
id through :func:`special_token_id`. Every tokenizer here also has ``special_tokens``
(text → id), ``add_bos`` (whether sequences start with ``bos_id``) and ``chat_template``
(the model's own Jinja chat template, or None): from ``chat_template`` in a
``tokenizer_config.json`` or a ``chat_template.jinja`` beside the tokenizer file, or from
``tokenizer.chat_template`` in a GGUF file.
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Protocol

# The file-backed tokenizers live in engine.data.tokenizer_types (so builtin_tokenizer and
# gguf_tokenizer, imported by load_tokenizer, need not import this module back);
# re-exported here, where callers import them from.
from engine.data.tokenizer_types import HFTokenizer as HFTokenizer
from engine.data.tokenizer_types import SentencePieceTokenizer as SentencePieceTokenizer
from engine.data.tokenizer_types import _chat_template, _tokenizer_config
from engine.data.tokenizer_types import sentencepiece_proto_module as sentencepiece_proto_module
from engine.errors import ConfigError

logger = logging.getLogger(__name__)


class Tokenizer(Protocol):
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


def special_token_id(tokenizer: Tokenizer, text: str) -> Optional[int]:
    """Id of special token ``text`` if ``tokenizer`` defines it, else None."""
    specials: dict[str, int] = getattr(tokenizer, "special_tokens", {}) or {}
    return specials.get(text)


def adds_bos(tokenizer: Tokenizer) -> bool:
    """Whether sequences for ``tokenizer`` start with its BOS id (default True)."""
    return bool(getattr(tokenizer, "add_bos", True))


class ByteTokenizer:
    """UTF-8 bytes as tokens: id = byte + 3; 0 = pad, 1 = bos, 2 = eos. No other specials."""

    pad_id = 0
    bos_id = 1
    eos_id = 2
    _offset = 3
    vocab_size = 256 + 3
    add_bos = True
    special_tokens: dict[str, int] = {}
    chat_template: Optional[str] = None

    def encode(self, text: str) -> list[int]:
        return [b + self._offset for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        data = bytes(i - self._offset for i in ids if self._offset <= i < self._offset + 256)
        return data.decode("utf-8", errors="replace")


def warn_if_foreign(tokenizer: Tokenizer, spec: str, model_name: str, model_vocab: int) -> None:
    """Warn when a model's vocabulary is far larger than its tokenizer's: a pretrained model (say a
    converted SmolLM2, 49,152 ids) run with the default byte tokenizer trains and generates garbage."""
    if model_vocab > 4 * tokenizer.vocab_size and model_vocab - tokenizer.vocab_size > 1024:
        logger.warning("data.tokenizer=%s has %d tokens but model %s has %d: a pretrained model needs its own "
                       "tokenizer (its .gguf file, tokenizer.json or directory)", spec, tokenizer.vocab_size,
                       model_name, model_vocab)


def tokenizer_file(spec: str) -> Optional[str]:
    """The file a tokenizer spec names: the file itself, or a directory's tokenizer.json (else tokenizer.model);
    None for a built-in name or a path that holds no tokenizer here."""
    if os.path.isdir(spec):
        return next((os.path.join(spec, name) for name in ("tokenizer.json", "tokenizer.model")
                     if os.path.isfile(os.path.join(spec, name))), None)
    return spec if os.path.isfile(spec) else None


def _resolve_directory(spec: str) -> str:
    found = tokenizer_file(spec)
    if found is None:
        raise ConfigError(f"data.tokenizer={spec!r}: the directory has no tokenizer.json or tokenizer.model")
    return found


def load_tokenizer(spec: str) -> Tokenizer:
    """``'byte'``, ``'builtin-sp'``, or a tokenizer file / directory (see the module docstring).

    A spec naming no tokenizer is a :class:`~engine.errors.ConfigError` (one line from the CLI, on each rank).
    """
    if spec == "byte":
        return ByteTokenizer()
    if spec == "builtin-sp":
        from engine.data.builtin_tokenizer import builtin_sentencepiece

        return builtin_sentencepiece()
    if os.path.isdir(spec):
        spec = _resolve_directory(spec)
    if not os.path.isfile(spec):
        raise ConfigError(f"data.tokenizer={spec!r}: expected 'byte', 'builtin-sp' or an existing .model, "
                          "tokenizer .json or .gguf file")
    if spec.endswith(".model"):
        tokenizer = SentencePieceTokenizer(spec)
        directory = os.path.dirname(os.path.abspath(spec))
        tokenizer.chat_template = _chat_template(directory, _tokenizer_config(directory))
        return tokenizer
    if spec.endswith(".json"):
        return HFTokenizer.from_file(spec)
    if spec.endswith(".gguf"):
        from engine.data.gguf_tokenizer import load_gguf_tokenizer

        return load_gguf_tokenizer(spec)
    raise ConfigError(f"data.tokenizer={spec!r}: unknown tokenizer file type; use a sentencepiece .model, "
                      "a tokenizer.json or a .gguf file")
