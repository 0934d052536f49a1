"""Tokenizers: byte, built-in sentencepiece, sentencepiece files, tokenizer.json and GGUF."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from engine.data.builtin_tokenizer import _corpus, builtin_model_path, train_builtin_model
from engine.data.gguf_tokenizer import write_gguf_tokenizer
from engine.data.tokenizers import ByteTokenizer, HFTokenizer, SentencePieceTokenizer, load_tokenizer
from tests.helpers import train_bpe_tokenizer

TEXTS = ["What is 12 + 30?", "Adding 12 and 30 gives 42.\n\nSo the answer is 42.", "  spaced   out\ttabs",
         "Ünïcode ☃ and <|im_end|> as plain text", "Spell 'garden' backwards."]


def test_byte_tokenizer_round_trips_and_has_no_named_specials() -> None:
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer) and (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 259)
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text and min(ids) >= 3
    assert tok.special_tokens == {}


def test_builtin_sentencepiece_is_deterministic_and_cached() -> None:
    tok = load_tokenizer("builtin-sp")
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id, tok.add_bos) == (512, 0, 2, 3, True)
    path = builtin_model_path()
    assert path.startswith(os.environ["KEEL_CACHE_DIR"]) and os.path.isfile(path)
    retrained = train_builtin_model(_corpus())
    assert retrained == Path(path).read_bytes() == tok.serialized()
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    # the synthetic vocabulary compresses well
    assert len(tok.encode("Spell 'garden' backwards.")) <= 10 and len(tok.encode("Assistant\n")) == 2


def test_builtin_markers_are_control_ids_never_produced_by_text() -> None:
    tok = load_tokenizer("builtin-sp")
    marker = tok.special_tokens["<extra_id_1>"]
    assert tok.special_tokens["<|eot_id|>"] != marker
    assert marker not in tok.encode("<extra_id_1>User\n") and tok.eos_id not in tok.encode("</s>")


def test_sentencepiece_model_file(tmp_path: Path) -> None:
    path = tmp_path / "tok.model"
    path.write_bytes(load_tokenizer("builtin-sp").serialized())  # type: ignore[attr-defined]
    tok = load_tokenizer(str(path))
    assert isinstance(tok, SentencePieceTokenizer) and tok.encode(TEXTS[0]) == load_tokenizer("builtin-sp").encode(TEXTS[0])


def test_hf_tokenizer_json_with_config(tmp_path: Path) -> None:
    train_bpe_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|im_end|>"},
                                                                "add_bos_token": False}))
    tok = load_tokenizer(str(tmp_path))  # a directory resolves to its tokenizer.json
    assert isinstance(tok, HFTokenizer)
    assert tok.eos_id == tok.special_tokens["<|im_end|>"] == 2 and not tok.add_bos and tok.pad_id == tok.eos_id
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text and 2 not in ids  # "<|im_end|>" inside text stays text


def test_hf_tokenizer_json_without_config_uses_known_names(tmp_path: Path) -> None:
    tok = load_tokenizer(str(train_bpe_tokenizer(tmp_path)))
    assert tok.eos_id == 0 and not tok.add_bos  # <|endoftext|>, and no BOS token in the vocabulary


def _bpe_merges(path: Path) -> list[str]:
    merges = json.loads(path.read_text())["model"]["merges"]
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def test_gguf_byte_level_bpe_matches_tokenizer_json(tmp_path: Path) -> None:
    path = train_bpe_tokenizer(tmp_path)
    reference = HFTokenizer.from_file(str(path))
    vocab = json.loads(path.read_text())["model"]["vocab"]
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    types = [3 if token in reference.special_tokens else 1 for token in tokens]
    gguf_path = str(tmp_path / "tiny.gguf")
    write_gguf_tokenizer(gguf_path, "gpt2", tokens, types, merges=_bpe_merges(path), bos_id=1, eos_id=2,
                         pad_id=0, pre="gpt2", add_bos=False)
    tok = load_tokenizer(gguf_path)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (len(tokens), 1, 2, 0, False)
    assert tok.special_tokens == reference.special_tokens
    for text in TEXTS + [" ".join(_corpus()[:50])]:
        assert tok.encode(text) == reference.encode(text)
        assert tok.decode(tok.encode(text)) == text


def test_gguf_sentencepiece_matches_the_original_model(tmp_path: Path) -> None:
    import io

    import sentencepiece as spm

    from engine.data.tokenizers import sentencepiece_proto_module

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_corpus()), model_writer=buffer, model_type="bpe",
                                   vocab_size=400, byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, num_threads=1, minloglevel=2,
                                   control_symbols=["<extra_id_1>"])
    original = SentencePieceTokenizer(buffer.getvalue())
    proto: Any = sentencepiece_proto_module().ModelProto()
    proto.ParseFromString(buffer.getvalue())
    gguf_path = str(tmp_path / "spm.gguf")
    write_gguf_tokenizer(gguf_path, "llama", [p.piece for p in proto.pieces], [p.type for p in proto.pieces],
                         scores=[p.score for p in proto.pieces], unk_id=0, bos_id=1, eos_id=2)
    tok = load_tokenizer(gguf_path)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, True) and "<extra_id_1>" in tok.special_tokens
    for text in TEXTS:
        assert tok.encode(text) == original.encode(text)


def test_load_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="expected 'byte', 'builtin-sp' or an existing"):
        load_tokenizer("gpt-5")
    odd = tmp_path / "vocab.txt"
    odd.write_text("a")
    with pytest.raises(ValueError, match="unknown tokenizer file type"):
        load_tokenizer(str(odd))
    with pytest.raises(ValueError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(str(tmp_path))
    gguf_path = str(tmp_path / "no-eos.gguf")
    write_gguf_tokenizer(gguf_path, "rwkv", ["a", "b"], [1, 1])
    with pytest.raises(ValueError, match="'rwkv' is not supported"):
        load_tokenizer(gguf_path)


def test_a_bad_tokenizer_spec_is_a_configuration_error(tmp_path: Path) -> None:
    """``keel train sft data.tokenizer=/nope.model`` printed a ValueError traceback: the CLI prints a
    ConfigError as one line (on each rank), so every bad spec is one."""
    from engine.errors import ConfigError

    odd = tmp_path / "vocab.txt"
    odd.write_text("a")
    for spec, message in (("/nope.model", "data.tokenizer='/nope.model': expected 'byte', 'builtin-sp' or an existing"),
                          (str(odd), "unknown tokenizer file type"), (str(tmp_path), "no tokenizer.json")):
        with pytest.raises(ConfigError, match=message):
            load_tokenizer(spec)


def test_the_gguf_header_reads_as_the_gguf_package_reads_it(tmp_path: Path) -> None:
    """The header is read directly (the package's reader took 6 s of each SmolLM2 start): every value type,
    arrays of numbers, strings and booleans, a tensor after the header, and a file that is not GGUF."""
    import numpy as np
    from gguf import GGUFReader, GGUFWriter

    from engine.config import ConfigError
    from engine.data.gguf_tokenizer import gguf_header

    path = tmp_path / "kinds.gguf"
    writer = GGUFWriter(str(path), arch="llama")
    for add, key, value in ((writer.add_uint8, "u8", 200), (writer.add_int8, "i8", -7), (writer.add_uint16, "u16", 60000),
                            (writer.add_int16, "i16", -300), (writer.add_uint32, "u32", 4_000_000_000),
                            (writer.add_int32, "i32", -5), (writer.add_float32, "f32", 0.25),
                            (writer.add_uint64, "u64", 2**40), (writer.add_int64, "i64", -(2**40)),
                            (writer.add_float64, "f64", 1e-300), (writer.add_bool, "yes", True),
                            (writer.add_string, "text", "héllo <|im_end|>"), (writer.add_array, "ints", [3, -1, 7]),
                            (writer.add_array, "floats", [0.5, -2.0]), (writer.add_array, "words", ["a", "", "ü b"]),
                            (writer.add_array, "flags", [True, False])):
        add(f"test.{key}", value)  # type: ignore[operator]
    writer.add_tensor("w", np.arange(6, dtype=np.float32).reshape(2, 3))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    expected = {key: field.contents() for key, field in GGUFReader(str(path)).fields.items()
                if not key.startswith("GGUF.")}
    header = gguf_header(str(path))
    assert header == expected and header["test.text"] == "héllo <|im_end|>" and header["test.flags"] == [True, False]
    (tmp_path / "not.gguf").write_bytes(b"GGML" + bytes(20))
    with pytest.raises(ConfigError, match="not.gguf: not a GGUF file"):
        gguf_header(str(tmp_path / "not.gguf"))
    (tmp_path / "cut.gguf").write_bytes(path.read_bytes()[:60])
    with pytest.raises(ConfigError, match="cut.gguf: the GGUF header ends early"):
        gguf_header(str(tmp_path / "cut.gguf"))
