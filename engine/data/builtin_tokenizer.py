"""The built-in sentencepiece tokenizer (``data.tokenizer=builtin-sp``).

A 512-piece BPE model trained at first use on :func:`engine.data.synthetic.tokenizer_corpus`
with one thread and no input shuffling, so the model bytes are identical on every
machine. It is cached as ``<cache>/builtin-sp-<hash>.model`` where ``<cache>`` is
``$KEEL_CACHE_DIR``, else ``$XDG_CACHE_HOME/keel``, else ``~/.cache/keel``; the hash
covers the training options and corpus, so a change to either trains a new file.

Ids: 0 pad, 1 unk, 2 bos, 3 eos. Template markers (``<extra_id_0..2>``, the Llama-3
header/eot tokens, ChatML's ``<|im_start|>``/``<|im_end|>``) are control pieces: single
ids that plain text never produces. Byte fallback keeps any text encodable; text is not
normalised (newlines and repeated spaces survive ``decode(encode(text))``).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
from typing import Any

from engine.data.tokenizer_types import SentencePieceTokenizer
from engine.files import atomic_open

logger = logging.getLogger(__name__)

VERSION = 1
CONTROL_SYMBOLS = ["<extra_id_0>", "<extra_id_1>", "<extra_id_2>", "<|begin_of_text|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>"]
TRAINER_OPTIONS: dict[str, Any] = {
    "model_type": "bpe", "vocab_size": 512, "character_coverage": 1.0, "byte_fallback": True,
    "normalization_rule_name": "identity", "remove_extra_whitespaces": False, "add_dummy_prefix": False,
    "split_digits": True, "allow_whitespace_only_pieces": True, "pad_id": 0, "unk_id": 1, "bos_id": 2,
    "eos_id": 3, "num_threads": 1, "shuffle_input_sentence": False, "max_sentence_length": 100000,
    "control_symbols": CONTROL_SYMBOLS,
}


def cache_dir() -> str:
    """Where built artefacts are cached (see the module docstring)."""
    if os.environ.get("KEEL_CACHE_DIR"):
        return os.environ["KEEL_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "keel")


def _corpus() -> list[str]:
    from engine.data.synthetic import tokenizer_corpus

    return tokenizer_corpus(seed=0, num=600)


def _fingerprint(corpus: list[str]) -> str:
    digest = hashlib.sha256(json.dumps([VERSION, TRAINER_OPTIONS], sort_keys=True).encode())
    for line in corpus:
        digest.update(line.encode("utf-8") + b"\0")
    return digest.hexdigest()[:16]


def train_builtin_model(corpus: list[str]) -> bytes:
    """Train the built-in model on ``corpus``; returns the serialized model (deterministic)."""
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=buffer, minloglevel=2,
                                   **TRAINER_OPTIONS)
    return buffer.getvalue()


def builtin_model_path() -> str:
    """Path of the cached built-in model, training and caching it on first use."""
    corpus = _corpus()
    path = os.path.join(cache_dir(), f"builtin-sp-{_fingerprint(corpus)}.model")
    if os.path.isfile(path):
        return path
    model = train_builtin_model(corpus)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_open(path, "wb") as fh:  # concurrent ranks may race, all write the same bytes
        fh.write(model)
    logger.info("trained the built-in sentencepiece tokenizer: %s", path)
    return path


@functools.lru_cache(maxsize=1)
def builtin_sentencepiece() -> SentencePieceTokenizer:
    """The built-in tokenizer (trained and cached on first use)."""
    try:
        return SentencePieceTokenizer(builtin_model_path(), name="builtin-sp")
    except OSError as exc:  # read-only cache: train in memory instead
        logger.warning("cannot cache the built-in tokenizer under %s (%s); training it in memory", cache_dir(), exc)
        return SentencePieceTokenizer(train_builtin_model(_corpus()), name="builtin-sp")
