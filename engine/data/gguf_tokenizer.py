"""The tokenizer embedded in a GGUF file, read from the file's header (:func:`gguf_header`).

GGUF stores the vocabulary as metadata: ``tokenizer.ggml.model`` (``gpt2`` for
byte-level BPE, ``llama`` for sentencepiece), ``tokens``, ``token_type``, ``merges``
(BPE) or ``scores`` (sentencepiece), the BOS/EOS/pad/unknown ids, and ``pre`` (which
pre-tokenizer regex a BPE vocabulary was trained with).

* ``gpt2`` → a ``tokenizers`` byte-level BPE with the pre-tokenizer ``pre`` names
  (digits split one by one for ``smollm``/``starcoder``-style vocabularies, the Llama-3
  regex for ``llama-bpe``, GPT-2's otherwise); control and user-defined tokens become
  special added tokens.
* ``llama`` → a sentencepiece BPE model rebuilt from pieces, scores and types (identity
  normalisation, ``add_space_prefix`` as stored), i.e. the original ``tokenizer.model``.

Either way the tokenizer's ``chat_template`` is ``tokenizer.chat_template`` when the file
has one (rendered by ``data.chat_template=auto``, :mod:`engine.data.model_template`).
"""

from __future__ import annotations

import logging
import struct
from typing import Any, Optional

import numpy as np

from engine.data.tokenizer_types import HFTokenizer, SentencePieceTokenizer, sentencepiece_proto_module
from engine.errors import ConfigError

logger = logging.getLogger(__name__)

CONTROL, USER_DEFINED, BYTE = 3, 4, 6
_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")


# GGUF value types (the format's spec): fixed-size scalars by struct code; 8 is a string, 9 an array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def gguf_header(path: str) -> dict[str, Any]:
    """Every key-value pair of a GGUF file's header, as plain Python values (arrays as lists).

    Read directly: the ``gguf`` package's reader maps each element of every array and the whole tensor
    table first, which took 6 s of every SmolLM2 run's start for the tokenizer alone.
    """
    with open(path, "rb") as fh:
        def unpack(code: str) -> Any:
            size = struct.calcsize(code)
            raw = fh.read(size)
            if len(raw) != size:
                raise ConfigError(f"{path}: the GGUF header ends early")
            return struct.unpack("<" + code, raw)[0]

        def string() -> str:
            return fh.read(unpack("Q")).decode("utf-8", errors="replace")

        def value(kind: int) -> Any:
            if kind in _SCALARS:
                return unpack(_SCALARS[kind])
            if kind == _STRING:
                return string()
            if kind != _ARRAY:
                raise ConfigError(f"{path}: unknown GGUF value type {kind}")
            item, count = unpack("I"), unpack("Q")
            if item in _SCALARS:  # one read for the whole array
                return np.frombuffer(fh.read(count * struct.calcsize(_SCALARS[item])), "<" + _SCALARS[item]).tolist()
            return [value(item) for _ in range(count)]

        if fh.read(4) != b"GGUF":
            raise ConfigError(f"{path}: not a GGUF file (no GGUF magic number)")
        version = unpack("I")
        if version < 2:
            raise ConfigError(f"{path}: GGUF version {version} is too old (2 or later is read)")
        unpack("Q")  # the number of tensors
        return {string(): value(unpack("I")) for _ in range(unpack("Q"))}


def read_gguf_metadata(path: str) -> dict[str, Any]:
    """The ``tokenizer.ggml.*`` metadata of a GGUF file as plain Python values, plus
    ``chat_template`` (``tokenizer.chat_template``) when the file has one."""
    header = gguf_header(path)
    prefix = "tokenizer.ggml."
    meta = {key[len(prefix):]: value for key, value in header.items() if key.startswith(prefix)}
    if "tokenizer.chat_template" in header:
        meta["chat_template"] = header["tokenizer.chat_template"]
    if "tokens" not in meta:
        raise ConfigError(f"{path}: the GGUF file has no embedded tokenizer (no tokenizer.ggml.tokens)")
    return meta


def _pre_tokenizer(pre: str) -> Any:
    from tokenizers import Regex, pre_tokenizers

    if pre in ("llama-bpe", "llama3"):
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLIT_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre not in ("default", "gpt2", "gpt-2"):
        logger.warning("GGUF pre-tokenizer %r is not known here; using GPT-2's regex", pre)
    return byte_level


def _token(tokens: list[str], meta: dict[str, Any], key: str) -> Optional[str]:
    index = meta.get(key)
    return tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None


def _bpe_tokenizer(meta: dict[str, Any], path: str) -> HFTokenizer:
    from tokenizers import AddedToken, Tokenizer, decoders, models

    tokens: list[str] = list(meta["tokens"])
    types: list[int] = list(meta.get("token_type") or [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in meta.get("merges") or []]
    pre = str(meta.get("pre", "default"))
    model = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                       ignore_merges=pre in ("llama-bpe", "llama3"))
    raw = Tokenizer(model)
    raw.pre_tokenizer = _pre_tokenizer(pre)
    raw.decoder = decoders.ByteLevel()
    added = [AddedToken(t, special=(k == CONTROL), normalized=False) for t, k in zip(tokens, types, strict=False)
             if k in (CONTROL, USER_DEFINED)]
    raw.add_special_tokens([a for a in added if a.special])
    raw.add_tokens([a for a in added if not a.special])
    add_bos = meta.get("add_bos_token")
    return HFTokenizer(raw, name=path, bos_token=_token(tokens, meta, "bos_token_id"),
                       eos_token=_token(tokens, meta, "eos_token_id"), pad_token=_token(tokens, meta, "padding_token_id"),
                       add_bos=None if add_bos is None else bool(add_bos), chat_template=meta.get("chat_template"))


def _spm_tokenizer(meta: dict[str, Any], path: str) -> SentencePieceTokenizer:
    model_pb2 = sentencepiece_proto_module()
    tokens: list[str] = list(meta["tokens"])
    scores = list(meta.get("scores") or [0.0] * len(tokens))
    types = list(meta.get("token_type") or [1] * len(tokens))
    proto = model_pb2.ModelProto()
    for piece, score, kind in zip(tokens, scores, types, strict=False):
        entry = proto.pieces.add()
        entry.piece, entry.score, entry.type = piece, float(score), int(kind)
    spec = proto.trainer_spec
    spec.model_type = model_pb2.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = BYTE in types
    for name, key in (("unk_id", "unknown_token_id"), ("bos_id", "bos_token_id"), ("eos_id", "eos_token_id"),
                      ("pad_id", "padding_token_id")):
        setattr(spec, name, int(meta[key]) if meta.get(key) is not None else -1)
    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = bool(meta.get("add_space_prefix", True))
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    tokenizer = SentencePieceTokenizer(proto.SerializeToString(), name=path)
    if meta.get("add_bos_token") is not None:
        tokenizer.add_bos = tokenizer.add_bos and bool(meta["add_bos_token"])
    tokenizer.chat_template = meta.get("chat_template")
    return tokenizer


def load_gguf_tokenizer(path: str) -> HFTokenizer | SentencePieceTokenizer:
    """The tokenizer embedded in GGUF file ``path`` (see the module docstring)."""
    meta = read_gguf_metadata(path)
    kind = meta.get("model")
    if kind == "gpt2":
        return _bpe_tokenizer(meta, path)
    if kind == "llama":
        return _spm_tokenizer(meta, path)
    raise ConfigError(f"{path}: GGUF tokenizer model {kind!r} is not supported; supported: gpt2 (byte-level BPE), "
                      "llama (sentencepiece)")


def write_gguf_tokenizer(path: str, model: str, tokens: list[str], types: list[int], *,
                         merges: Optional[list[str]] = None, scores: Optional[list[float]] = None,
                         bos_id: Optional[int] = None, eos_id: Optional[int] = None, pad_id: Optional[int] = None,
                         unk_id: Optional[int] = None, pre: Optional[str] = None,
                         add_bos: Optional[bool] = None, chat_template: Optional[str] = None) -> None:
    """Write a GGUF file holding only tokenizer metadata (for tests and tools)."""
    from gguf import GGUFWriter

    writer = GGUFWriter(path, arch="llama")
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if merges is not None:
        writer.add_token_merges(merges)
    if scores is not None:
        writer.add_token_scores(scores)
    for value, add in ((bos_id, writer.add_bos_token_id), (eos_id, writer.add_eos_token_id),
                       (pad_id, writer.add_pad_token_id), (unk_id, writer.add_unk_token_id)):
        if value is not None:
            add(value)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
