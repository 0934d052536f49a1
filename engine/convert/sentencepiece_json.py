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
* control pieces (``<s>``, ``</s>``) are special tokens. A model with user-defined pieces is refused:
  sentencepiece matches them inside its normalised text, which added tokens cannot reproduce.

:func:`mismatches` compares the two on texts, which the export runs before it writes anything.
"""

from __future__ import annotations

from typing import Any, Optional

SPACE = "\u2581"  # ▁
UNIGRAM, BPE = 1, 2  # sentencepiece's ModelProto.TrainerSpec.ModelType
NORMAL, UNKNOWN, CONTROL, USER_DEFINED = 1, 2, 3, 4  # ModelProto.SentencePiece.Type


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
    defined = [p for p, _, t in pieces if t == USER_DEFINED]
    if defined:  # sentencepiece matches them inside its normalised text, which added tokens cannot copy
        raise ValueError(f"the model has user-defined pieces ({', '.join(defined[:3])}), which have no tokenizers "
                         "form that gives its ids")
    tokenizer = Tokenizer(_unigram(proto, pieces) if kind == UNIGRAM else _bpe(proto, pieces))
    spec = proto.normalizer_spec
    tokenizer.normalizer = _normalizer(spec)
    unk = proto.trainer_spec.unk_id
    tokenizer.decoder = _decoder(spec.add_dummy_prefix, pieces[unk][0] if unk >= 0 else None,
                                 proto.trainer_spec.unk_surface)
    tokenizer.add_special_tokens([AddedToken(p, special=True, normalized=False) for p, _, t in pieces if t == CONTROL])
    return tokenizer


def probes(serialized: bytes) -> tuple[str, ...]:
    """:data:`PROBES` and texts around the model's own control and unknown pieces (spelt out in a text, they
    are text: a Unigram model whose characters do not cover their spelling matches them whole, and is refused)."""
    from engine.data.tokenizer_types import sentencepiece_proto_module

    proto = sentencepiece_proto_module().ModelProto()
    proto.ParseFromString(serialized)
    named = [p.piece for p in proto.pieces if p.type in (CONTROL, UNKNOWN)]
    return PROBES + tuple(text for piece in named for text in (f"a {piece} b", f"x{piece}y", f"{piece} "))


def _unigram(proto: Any, pieces: list[tuple[str, float, int]]) -> Any:
    from tokenizers import models

    unk = proto.trainer_spec.unk_id
    # only normal and user-defined pieces stand for text: '<0x41>' or '<unk>' in a text is spelt out, as
    # sentencepiece does, not read as the byte or unknown piece (whose score of 0 would win the lattice)
    scores = [(p, float(s) if t == NORMAL else -1e10) for p, s, t in pieces]
    return models.Unigram(scores, unk_id=unk if unk >= 0 else None, byte_fallback=bool(proto.trainer_spec.byte_fallback))


def _bpe(proto: Any, pieces: list[tuple[str, float, int]]) -> Any:
    """BPE over the model's vocabulary; a merge for each way a normal piece splits into two pieces, the
    highest-scoring piece's merges first."""
    from tokenizers import models

    vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
    mergeable = {p for p, _, t in pieces if t == NORMAL}
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
    if spec.remove_extra_whitespaces:  # spaces only (Strip would take tabs and newlines too)
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    steps.append(normalizers.Replace(" ", SPACE))
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPACE))
    return normalizers.Sequence(steps)


def _decoder(dummy_prefix: bool, unk_piece: Optional[str], unk_surface: str) -> Any:
    from tokenizers import decoders

    steps: list[Any] = [decoders.Replace(unk_piece, unk_surface)] if unk_piece and unk_surface else []  # ' ⁇ ' by default
    steps += [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    return decoders.Sequence(steps)


PROBES = ("Hello world", "What is 12 + 35? The answer is 47.", "  two  spaces and a tab\there ",
          "reverse the word 'lantern': nretnal", "Ünïcödé, 中文 and emoji 🙂", "line one\nline two",
          "<|im_start|>user\nHi<|im_end|>", "x" * 40, "", "a\r\nb", "answer\n", "\tapple", "\xa0a", "<0x41>",
          "ＦＵＬＬ width ①")


def mismatches(keel_tokenizer: Any, hf_tokenizer: Any, texts: Optional[tuple[str, ...]] = None) -> list[str]:
    """The texts whose ids (or decoded text) differ between a Keel sentencepiece tokenizer and its conversion.

    Control-token text (``<|im_start|>``) stays text on both sides here, as in Keel's data (transformers'
    chat templates rely on the converted tokenizer matching it, which it does by default)."""
    texts = probes(keel_tokenizer.serialized()) if texts is None else texts
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
