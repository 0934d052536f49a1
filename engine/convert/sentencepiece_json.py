"""A sentencepiece model as a Hugging Face ``tokenizers`` tokenizer that gives the same ids.

``keel convert keel-to-hf`` writes a checkpoint's tokenizer beside the weights as ``tokenizer.json``.
transformers' own conversion of a Llama ``tokenizer.model`` always prepends a space piece, so for a
model trained without sentencepiece's dummy prefix (``builtin-sp``) its ids differ from the ones the
checkpoint was trained on. This module reads the model's own settings instead:

* the normaliser: the model's precompiled character map (when it has one), sentencepiece's removal of
  extra whitespace, its dummy prefix only when ``add_dummy_prefix`` is set, spaces as ``▁``;
* the model: Unigram with the pieces' scores, or BPE whose merges are every split of a piece into two
  pieces, ranked by the piece's score (sentencepiece's BPE merges the adjacent pair whose result scores
  highest); byte fallback as the model has it;
* no pre-tokeniser: sentencepiece segments the whole normalised text (its pieces hold no inner ``▁``);
* control pieces (``<s>``, ``</s>``) are special tokens, user-defined pieces are matched in the text as
  sentencepiece matches them.

:func:`mismatches` compares the two on texts, which the export runs before it writes anything.
"""

from __future__ import annotations

from typing import Any

SPACE = "\u2581"  # ▁
UNIGRAM, BPE = 1, 2  # sentencepiece's ModelProto.TrainerSpec.ModelType
NORMAL, CONTROL, USER_DEFINED, BYTE = 1, 3, 4, 6  # ModelProto.SentencePiece.Type


def to_hf_tokenizer(serialized: bytes) -> Any:
    """A ``tokenizers.Tokenizer`` equivalent to the serialized sentencepiece model (Unigram or BPE);
    ``ValueError`` for another model type."""
    from tokenizers import AddedToken, Tokenizer

    from engine.data.tokenizer_types import sentencepiece_proto_module

    proto = sentencepiece_proto_module().ModelProto()
    proto.ParseFromString(serialized)
    kind = proto.trainer_spec.model_type
    if kind not in (UNIGRAM, BPE):
        raise ValueError(f"sentencepiece model type {kind} (only Unigram and BPE have a tokenizers form)")
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    tokenizer = Tokenizer(_unigram(proto, pieces) if kind == UNIGRAM else _bpe(proto, pieces))
    spec = proto.normalizer_spec
    tokenizer.normalizer = _normalizer(spec)
    tokenizer.decoder = _decoder(spec.add_dummy_prefix)
    tokenizer.add_special_tokens([AddedToken(p, special=True, normalized=False) for p, _, t in pieces if t == CONTROL])
    tokenizer.add_tokens([AddedToken(p, special=False, normalized=False) for p, _, t in pieces if t == USER_DEFINED])
    return tokenizer


def _unigram(proto: Any, pieces: list[tuple[str, float, int]]) -> Any:
    from tokenizers import models

    unk = proto.trainer_spec.unk_id
    return models.Unigram([(p, float(s)) for p, s, _ in pieces], unk_id=unk if unk >= 0 else None,
                          byte_fallback=bool(proto.trainer_spec.byte_fallback))


def _bpe(proto: Any, pieces: list[tuple[str, float, int]]) -> Any:
    """BPE over the model's vocabulary; a merge for each way a normal piece splits into two pieces, the
    highest-scoring piece's merges first."""
    from tokenizers import models

    vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
    mergeable = {p for p, _, t in pieces if t in (NORMAL, USER_DEFINED)}
    ranked = []
    for index, (piece, score, kind) in enumerate(pieces):
        if kind != NORMAL or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-score, index, vocab[left], vocab[right], left, right))
    merges = [(left, right) for *_, left, right in sorted(ranked)]
    unk = proto.trainer_spec.unk_id
    return models.BPE(vocab, merges, unk_token=pieces[unk][0] if unk >= 0 else None,
                      byte_fallback=bool(proto.trainer_spec.byte_fallback), fuse_unk=True)


def _normalizer(spec: Any) -> Any:
    from tokenizers import Regex, normalizers

    steps: list[Any] = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    steps.append(normalizers.Replace(" ", SPACE))
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPACE))
    return normalizers.Sequence(steps)


def _decoder(dummy_prefix: bool) -> Any:
    from tokenizers import decoders

    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    return decoders.Sequence(steps)


PROBES = ("Hello world", "What is 12 + 35? The answer is 47.", "  two  spaces and a tab\there ",
          "reverse the word 'lantern': nretnal", "Ünïcödé, 中文 and emoji 🙂", "line one\nline two",
          "<|im_start|>user\nHi<|im_end|>", "x" * 40, "")


def mismatches(keel_tokenizer: Any, hf_tokenizer: Any, texts: tuple[str, ...] = PROBES) -> list[str]:
    """The texts whose ids (or decoded text) differ between a Keel sentencepiece tokenizer and its conversion.

    Control-token text (``<|im_start|>``) stays text on both sides here, as in Keel's data (transformers'
    chat templates rely on the converted tokenizer matching it, which it does by default)."""
    matched = hf_tokenizer.encode_special_tokens
    hf_tokenizer.encode_special_tokens = True
    try:
        wrong = []
        for text in texts:
            ids = keel_tokenizer.encode(text)
            theirs = hf_tokenizer.encode(text, add_special_tokens=False).ids
            if ids != theirs or keel_tokenizer.decode(ids) != hf_tokenizer.decode(theirs, skip_special_tokens=False):
                wrong.append(text)
        return wrong
    finally:
        hf_tokenizer.encode_special_tokens = matched
