"""What ``keel convert`` writes besides the weights, and what it refuses.

``keel-to-hf`` writes the checkpoint's tokenizer (a tokenizer.json copied, the one built from a GGUF
file or a sentencepiece model saved) so that transformers loads it and gives the same ids, and the special ids into config.json and generation_config.json
(without them HF ``generate`` ran past ``<|im_end|>``); it refuses reward models and critics, whose value
head it would have dropped. ``hf-to-keel`` records the tokenizer as an absolute path. Missing or non-GGUF
files are one-line errors. The weights file gets the usual permissions (safetensors creates it 0600).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.checkpoint.dist import CheckpointError
from engine.config import ConfigError
from engine.convert.hf_tokenizer import export_tokenizer
from engine.data.gguf_tokenizer import write_gguf_tokenizer
from engine.data.tokenizers import load_tokenizer
from engine.models.presets import PRESETS
from tests.helpers import launch, train_bpe_tokenizer

PRESET = PRESETS["tiny-llama"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
TEXTS = ["What is 12 + 30?", "Adding 12 and 30 gives 42.\n\nSo the answer is 42.", "  spaced   out\ttabs"]


def _train_bpe(directory: Path) -> Path:
    """A small byte-level BPE tokenizer.json with a tokenizer_config.json (EOS <|im_end|>, a chat template)."""
    path = train_bpe_tokenizer(directory)
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "bos_token": "<|im_start|>", "add_bos_token": False, "chat_template": TEMPLATE}))
    return path


def _hf_tokenizer(directory: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


def _fake_checkpoint(path: Path, algorithm: str) -> Path:
    path.mkdir(parents=True)
    (path / "keel.json").write_text(json.dumps({"algorithm": algorithm, "config": {"model": {"preset": "tiny-llama"}}}))
    (path / "metadata.json").write_text("{}")
    return path


@pytest.mark.parametrize("algorithm,kind", [("rm", "reward model"), ("critic", "PPO critic")])
def test_keel_to_hf_refuses_scorers(tmp_path: Path, algorithm: str, kind: str) -> None:
    from engine.convert.hf import keel_to_hf

    checkpoint = _fake_checkpoint(tmp_path / "step_0000010", algorithm)
    with pytest.raises(CheckpointError, match=f"is a {kind} checkpoint: it cannot be exported by keel-to-hf, which "
                       "writes policies \\(language models\\) and Bradley-Terry reward models"):
        keel_to_hf(checkpoint, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_weights_have_the_usual_mode_and_config_the_special_ids(tmp_path: Path) -> None:
    from engine.convert.hf import default_file_mode, write_hf_state

    ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    write_hf_state(tmp_path, PRESET, {"model.norm.weight": torch.ones(4)}, ids)
    assert default_file_mode() == 0o666 & ~_umask()
    for name in ("model.safetensors", "config.json", "generation_config.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == default_file_mode(), name
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["eos_token_id"] == 2
    assert json.loads((tmp_path / "generation_config.json").read_text()) == ids


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_tokenizer_json_export_loads_in_transformers(tmp_path: Path) -> None:
    source = _train_bpe(tmp_path / "src")
    keel = load_tokenizer(str(source))
    ids = export_tokenizer(str(source), tmp_path / "out")
    assert ids == {"bos_token_id": keel.bos_id, "eos_token_id": keel.eos_id, "pad_token_id": keel.pad_id}
    hf = _hf_tokenizer(tmp_path / "out")
    assert (hf.eos_token, hf.eos_token_id, hf.chat_template) == ("<|im_end|>", keel.eos_id, TEMPLATE)
    back = load_tokenizer(str(tmp_path / "out"))
    assert (back.eos_id, back.bos_id, back.add_bos, back.chat_template) == (keel.eos_id, keel.bos_id, False, TEMPLATE)
    for text in TEXTS:
        assert hf(text, add_special_tokens=False).input_ids == keel.encode(text) == back.encode(text)


def test_gguf_tokenizer_export_adds_bos_as_llama_cpp_does(tmp_path: Path) -> None:
    path = _train_bpe(tmp_path / "src")
    model = json.loads(path.read_text())["model"]
    tokens = [token for token, _ in sorted(model["vocab"].items(), key=lambda item: item[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    gguf_path = str(tmp_path / "tiny.gguf")
    write_gguf_tokenizer(gguf_path, "gpt2", tokens, [3 if i < 3 else 1 for i in range(len(tokens))], merges=merges,
                         bos_id=1, eos_id=2, pad_id=0, pre="gpt2", add_bos=True, chat_template=TEMPLATE)
    keel = load_tokenizer(gguf_path)
    assert export_tokenizer(gguf_path, tmp_path / "out") == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    hf = _hf_tokenizer(tmp_path / "out")
    assert (hf.eos_token, hf.bos_token, hf.pad_token, hf.chat_template) == ("<|im_end|>", "<|im_start|>",
                                                                          "<|endoftext|>", TEMPLATE)
    for text in TEXTS:
        assert hf(text).input_ids == [1, *keel.encode(text)]


def test_the_byte_tokenizer_has_no_hf_form_and_says_so(tmp_path: Path, caplog: Any) -> None:
    keel = load_tokenizer("byte")
    export_tokenizer("builtin-sp", tmp_path)  # an earlier export into the same directory: its files must go
    assert (tmp_path / "tokenizer.json").is_file()
    with caplog.at_level(logging.WARNING, logger="engine.convert.hf_tokenizer"):
        ids = export_tokenizer("byte", tmp_path)
    assert ids == {"bos_token_id": keel.bos_id, "eos_token_id": keel.eos_id, "pad_token_id": keel.pad_id}
    assert "data.tokenizer=byte has no Hugging Face tokenizer.json form" in caplog.text
    assert not list(tmp_path.iterdir())


def _sentencepiece_model(directory: Path, kind: str, **options: Any) -> Path:
    """A small sentencepiece model with the trainer's defaults (NFKC, dummy prefix, extra whitespace removed)."""
    import random

    import sentencepiece as spm

    draw = random.Random(0)
    words = ["lantern", "river", "seven", "twelve", "apple", "answer", "kite", "<b>x</b>", "bird", "count", "letters"]
    corpus = [" ".join(draw.choice(words) for _ in range(10)) + f" {draw.randint(0, 999)}?" for _ in range(2000)]
    directory.mkdir(parents=True)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=str(directory / "sp"), vocab_size=300,
                                   model_type=kind, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
                                   minloglevel=2, **options)
    return directory / "sp.model"


@pytest.mark.parametrize("kind", ["builtin-sp", "unigram", "bpe"])
def test_sentencepiece_export_gives_the_models_ids_in_transformers(tmp_path: Path, kind: str) -> None:
    """transformers' own conversion of a tokenizer.model prepends a space piece, which builtin-sp (trained
    without sentencepiece's dummy prefix) does not: the export writes a tokenizer.json from the model's settings."""
    spec = kind if kind == "builtin-sp" else str(_sentencepiece_model(tmp_path / "src", kind))
    keel = load_tokenizer(spec)
    assert export_tokenizer(spec, tmp_path / "out") == {"bos_token_id": keel.bos_id, "eos_token_id": keel.eos_id,
                                                        "pad_token_id": keel.pad_id}
    hf, back = _hf_tokenizer(tmp_path / "out"), load_tokenizer(str(tmp_path / "out"))
    texts = [*TEXTS, "  Leading and trailing  ", "ＦＵＬＬ width ① and 🙂 (bytes)", "reverse 'lantern': nretnal"]
    for text in texts:
        ids = keel.encode(text)
        assert hf(text).input_ids == [keel.bos_id, *ids] and back.encode(text) == ids, text
        assert hf.decode(ids) == keel.decode(ids)
    assert (hf.eos_token_id, back.eos_id, back.bos_id, back.add_bos) == (keel.eos_id, keel.eos_id, keel.bos_id, True)


@pytest.mark.parametrize("options, said", [
    ({"remove_extra_whitespaces": False}, "gives other ids or text than the model on 'a\\r\\nb'"),  # NFKC of CRLF
    ({"user_defined_symbols": ["<sep>"]}, "the model has user-defined pieces (<sep>)"),
])
def test_a_sentencepiece_model_without_an_exact_conversion_is_not_written(tmp_path: Path, caplog: Any,
                                                                         options: dict[str, Any], said: str) -> None:
    """Nothing is written rather than a tokenizer.json that gives other ids than the checkpoint was trained on."""
    model = str(_sentencepiece_model(tmp_path / "src", "bpe", **options))
    with caplog.at_level(logging.WARNING, logger="engine.convert.hf_tokenizer"):
        assert export_tokenizer(model, tmp_path / "out")["eos_token_id"] == load_tokenizer(model).eos_id
    assert said in caplog.text and "no tokenizer is written" in caplog.text
    assert not (tmp_path / "out").exists()


def _recorded_tokenizer(monkeypatch: Any, model_dir: Path, overrides: list[str]) -> str:
    """The data.tokenizer ``hf-to-keel`` records (the checkpoint writer is replaced by one that returns it)."""
    import engine.convert.hf as hf

    def record(state: Any, out_dir: Any, overrides: list[str], source: str, **_: Any) -> Any:
        return next(item.split("=", 1)[1] for item in overrides if item.startswith("data.tokenizer="))

    monkeypatch.setattr(hf, "write_keel_checkpoint", record)
    return str(hf.hf_to_keel(model_dir, "unused", ["model.preset=tiny-llama", *overrides]))


def test_hf_to_keel_records_the_tokenizer_as_an_absolute_path(tmp_path: Path, monkeypatch: Any) -> None:
    from engine.convert.hf import write_hf_state

    model_dir = tmp_path / "model"
    write_hf_state(model_dir, PRESET, {"model.norm.weight": torch.ones(4)})
    _train_bpe(tmp_path / "tok")
    monkeypatch.chdir(tmp_path)
    assert _recorded_tokenizer(monkeypatch, Path("model"), ["data.tokenizer=tok/tokenizer.json"]) == str(
        (tmp_path / "tok" / "tokenizer.json").resolve())
    assert _recorded_tokenizer(monkeypatch, Path("model"), ["data.tokenizer=tok"]) == str((tmp_path / "tok").resolve())
    assert _recorded_tokenizer(monkeypatch, Path("model"), ["data.tokenizer=byte"]) == "byte"
    with pytest.raises(ConfigError, match="data.tokenizer=nowhere: no such tokenizer"):
        _recorded_tokenizer(monkeypatch, Path("model"), ["data.tokenizer=nowhere"])
    _train_bpe(model_dir)  # an exported directory with its tokenizer: that file is recorded
    assert _recorded_tokenizer(monkeypatch, Path("model"), []) == str((model_dir / "tokenizer.json").resolve())


def test_gguf_to_keel_names_a_missing_or_foreign_file(tmp_path: Path) -> None:
    from engine.convert.gguf import gguf_to_keel

    with pytest.raises(ConfigError, match="missing.gguf: no such file"):
        gguf_to_keel(tmp_path / "missing.gguf", tmp_path / "out")
    (tmp_path / "text.gguf").write_text("not a model\n")
    with pytest.raises(ConfigError, match="text.gguf: not a GGUF file"):
        gguf_to_keel(tmp_path / "text.gguf", tmp_path / "out")


def test_hf_to_keel_help_names_data_tokenizer() -> None:
    import argparse

    from engine.convert.cli import register

    parser = argparse.ArgumentParser(prog="keel convert")
    subparsers = parser.add_subparsers()
    register(subparsers)
    assert "data.tokenizer=PATH" in subparsers.choices["hf-to-keel"].format_help()


def test_keel_to_hf_writes_the_checkpoint_tokenizer(tmp_path: Path) -> None:
    """hf-to-keel of a directory with its tokenizer.json, then keel-to-hf: transformers loads the tokenizer
    and the config stops generation at the tokenizer's EOS."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.convert.llama import hf_config_for

    fields = {k: v for k, v in hf_config_for(PRESET).items() if k not in ("architectures", "model_type", "torch_dtype")}
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**fields)).save_pretrained(tmp_path / "hf", safe_serialization=True)
    keel = load_tokenizer(str(_train_bpe(tmp_path / "hf")))
    launch(1, ["-m", "engine.convert", "hf-to-keel", str(tmp_path / "hf"), str(tmp_path / "keel"), "model.preset=tiny-llama"])
    launch(1, ["-m", "engine.convert", "keel-to-hf", str(tmp_path / "keel"), str(tmp_path / "back")])
    hf = _hf_tokenizer(tmp_path / "back")
    assert hf("What is 12 + 30?", add_special_tokens=False).input_ids == keel.encode("What is 12 + 30?")
    assert hf.chat_template == TEMPLATE
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    generation = json.loads((tmp_path / "back" / "generation_config.json").read_text())
    assert config["eos_token_id"] == generation["eos_token_id"] == keel.eos_id == hf.eos_token_id


def test_a_builtin_chat_template_is_said_and_survives_the_round_trip(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A model trained with data.chat_template=chatml was exported with no word about its template, and
    hf-to-keel of the export recorded 'auto': prompts would then be formatted otherwise."""
    from engine.cli import main

    assert main(["train", "sft", "run.train_steps=1", "data.num_samples=32", "data.tokenizer=builtin-sp",
                 "data.chat_template=chatml", "logging.progress=false", "logging.tensorboard=false",
                 f"run.output_dir={tmp_path / 'sft'}"]) == 0
    capsys.readouterr()
    assert main(["convert", "keel-to-hf", str(tmp_path / "sft"), str(tmp_path / "hf")]) == 0
    assert "trained with Keel's built-in 'chatml' chat template, which is not written as a Jinja" in \
        capsys.readouterr().err
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["keel_chat_template"] == "chatml"
    assert main(["convert", "hf-to-keel", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    saved = json.loads((tmp_path / "back" / "step_0000000" / "keel.json").read_text())["config"]
    assert saved["data"]["chat_template"] == "chatml" and saved["model"]["preset"] == "tiny-llama"
