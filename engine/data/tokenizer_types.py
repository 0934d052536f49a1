"""The file-backed tokenizers: sentencepiece models and HF ``tokenizers`` files.

:mod:`engine.data.tokenizers` re-exports everything public here and dispatches to it
from :func:`engine.data.tokenizers.load_tokenizer`. These classes live apart from that
module so that :mod:`engine.data.builtin_tokenizer` and :mod:`engine.data.gguf_tokenizer`,
which ``load_tokenizer`` imports, can build on them without importing
``engine.data.tokenizers`` back: that would be an import cycle.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from engine.errors import ConfigError


def sentencepiece_proto_module() -> Any:
    """sentencepiece's generated protobuf module (``ModelProto``, ``TrainerSpec``)."""
    from sentencepiece import sentencepiece_model_pb2

    return sentencepiece_model_pb2


class SentencePieceTokenizer:
    """A sentencepiece model (``.model`` file or serialized proto bytes).

    Specials are the model's control and user-defined pieces. Without a pad piece, pad
    is the unknown id (else EOS); without a BOS piece, ``add_bos`` is False.
    """

    def __init__(self, model: str | bytes, name: Optional[str] = None):
        import sentencepiece as spm

        model_pb2 = sentencepiece_proto_module()
        self.name = name or (model if isinstance(model, str) else "<sentencepiece>")
        self._sp = spm.SentencePieceProcessor()
        if isinstance(model, bytes):
            self._sp.LoadFromSerializedProto(model)
        else:
            self._sp.Load(model)
        self.vocab_size = int(self._sp.GetPieceSize())
        if self._sp.eos_id() < 0:
            raise ConfigError(f"tokenizer {self.name}: the sentencepiece model has no EOS piece; "
                              "retrain it with eos_id set")
        self.eos_id = int(self._sp.eos_id())
        self.add_bos = self._sp.bos_id() >= 0
        self.bos_id = int(self._sp.bos_id()) if self.add_bos else self.eos_id
        fallback_pad = self._sp.unk_id() if self._sp.unk_id() >= 0 else self.eos_id
        self.pad_id = int(self._sp.pad_id()) if self._sp.pad_id() >= 0 else int(fallback_pad)
        proto = model_pb2.ModelProto()
        proto.ParseFromString(self._sp.serialized_model_proto())
        special_types = (model_pb2.ModelProto.SentencePiece.CONTROL, model_pb2.ModelProto.SentencePiece.USER_DEFINED)
        self.special_tokens = {p.piece: i for i, p in enumerate(proto.pieces) if p.type in special_types}
        self.chat_template: Optional[str] = None

    def encode(self, text: str) -> list[int]:
        return list(self._sp.EncodeAsIds(text))

    def decode(self, ids: list[int]) -> str:
        return str(self._sp.DecodeIds([int(i) for i in ids]))

    def serialized(self) -> bytes:
        return bytes(self._sp.serialized_model_proto())


_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
_EOS_NAMES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "<|im_end|>", "<|eot_id|>")
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")


def _first_present(vocab: dict[str, int], names: tuple[str, ...]) -> Optional[str]:
    return next((name for name in names if name in vocab), None)


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` with explicit BOS/EOS/pad.

    ``bos_token``/``eos_token``/``pad_token`` name tokens of the vocabulary; None picks
    well-known names (``</s>``, ``<|end_of_text|>``, ``<|endoftext|>`` ...). A missing EOS is
    an error; a missing BOS sets ``add_bos=False``; a missing pad uses EOS.
    """

    def __init__(self, tokenizer: Any, name: str = "<tokenizer>", bos_token: Optional[str] = None,
                 eos_token: Optional[str] = None, pad_token: Optional[str] = None, add_bos: Optional[bool] = None,
                 chat_template: Optional[str] = None):
        self.name = name
        self.chat_template = chat_template
        self._tok = tokenizer
        self._tok.encode_special_tokens = True  # special-token text in data stays text
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))
        eos_token = eos_token or _first_present(vocab, _EOS_NAMES)
        if eos_token is None or eos_token not in vocab:
            raise ConfigError(f"tokenizer {name}: no EOS token found (looked for {eos_token or _EOS_NAMES}); "
                              "put a tokenizer_config.json with eos_token beside it")
        self.eos_id = int(vocab[eos_token])
        bos_token = bos_token or _first_present(vocab, _BOS_NAMES)
        has_bos = bos_token is not None and bos_token in vocab
        self.bos_id = int(vocab[bos_token]) if has_bos and bos_token else self.eos_id
        self.add_bos = has_bos if add_bos is None else (add_bos and has_bos)
        pad_token = pad_token or _first_present(vocab, _PAD_NAMES)
        self.pad_id = int(vocab[pad_token]) if pad_token and pad_token in vocab else self.eos_id
        self.special_tokens = {t.content: int(i) for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}

    @classmethod
    def from_file(cls, path: str) -> HFTokenizer:
        from tokenizers import Tokenizer as RawTokenizer

        directory = os.path.dirname(os.path.abspath(path))
        config = _tokenizer_config(directory)
        return cls(RawTokenizer.from_file(path), name=path, bos_token=_token_text(config.get("bos_token")),
                   eos_token=_token_text(config.get("eos_token")), pad_token=_token_text(config.get("pad_token")),
                   add_bos=config.get("add_bos_token"), chat_template=_chat_template(directory, config))

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self._tok.decode([int(i) for i in ids], skip_special_tokens=False))


def _tokenizer_config(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as fh:
        config = json.load(fh)
    return config if isinstance(config, dict) else {}


def _chat_template(directory: str, config: dict[str, Any]) -> Optional[str]:
    """The chat template of a tokenizer directory: ``chat_template.jinja``, else the config's
    ``chat_template`` (a string, or a list of named templates: the one named ``default``)."""
    path = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _token_text(value: Any) -> Optional[str]:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None
