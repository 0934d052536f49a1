"""hf-to-keel of models no preset describes: Llama 3.x RoPE scaling, another norm epsilon and untied
embeddings are read from ``config.json`` (the model equals transformers'), other RoPE scalings are refused, a
one-label sequence-classification model imports as a reward model (one of several labels is refused), and
keel-to-hf writes the scaling back.

Before, ``rope_scaling`` was not read at all: a Llama-3.1-style model converted with no word, and its
logits differed from transformers' by 1e-3 to 4e-3; a model whose rope_theta or epsilon matched no preset
was refused with advice to set model.* overrides that did not exist; a reward model lost its score head.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.config import ConfigError
from engine.convert.llama import check_hf_config, hf_model_overrides, hf_rope_scaling

SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}
# tiny-llama's shape with what no preset has: a norm epsilon of 1e-6, untied embeddings, Llama 3.1's scaling.
# With head_dim 16 and base 10000 the two slowest frequencies are scaled: one divided by 8, one smoothed.
SHAPE = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=176, vocab_size=512, max_position_embeddings=256, rope_theta=10000.0,
             rms_norm_eps=1e-6, tie_word_embeddings=False)


def _hf_llama(rope_scaling: Any = None, seed: int = 0) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**SHAPE, rope_scaling=rope_scaling)
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model.float().eval()


def _keel_logits(checkpoint: Path, tokens: torch.Tensor, drop_scaling: bool = False) -> torch.Tensor:
    """Logits ``[b, s, v]`` of the converted checkpoint (TP1), built from the model settings it stores."""
    from engine.checkpoint import dist as ckpt
    from engine.config import ModelConfig
    from engine.models.presets import resolve_preset
    from tests.helpers import single_process_parallel, tiny_model_single_process

    stored = json.loads((checkpoint / "keel.json").read_text())["config"]["model"]
    settings = {k: v for k, v in stored.items() if v is not None and k not in ("preset", "layer_spec")}
    if drop_scaling:
        settings.pop("rope_scaling_factor")
    with single_process_parallel() as parallel:
        model = tiny_model_single_process(stored["preset"], **settings).eval()
        preset = resolve_preset(ModelConfig(preset=stored["preset"], **settings))
        ckpt.load(checkpoint, [model], None, parallel, ckpt.model_signature(preset), load_optimizer=False)
        with torch.no_grad():
            return model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)


def test_a_llama3_scaled_model_of_no_preset_converts_to_the_same_model_and_back(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import load_file

    from engine.cli import main

    hf = _hf_llama(SCALING)
    hf_dir, keel_dir, back_dir = tmp_path / "hf", tmp_path / "keel", tmp_path / "back"
    hf.save_pretrained(hf_dir, safe_serialization=True)
    assert main(["convert", "hf-to-keel", str(hf_dir), str(keel_dir)]) == 0
    step = keel_dir / "step_0000000"
    model = json.loads((step / "keel.json").read_text())["config"]["model"]
    assert (model["rope_scaling_factor"], model["layernorm_epsilon"], model["tie_embeddings"]) == (8.0, 1e-6, False)

    tokens = torch.randint(0, 512, (2, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
    error = (_keel_logits(step, tokens) - expected).abs().max().item()
    # what the converter built before, with no scaling: another model, the gap 100 times as large
    unscaled = (_keel_logits(step, tokens, drop_scaling=True) - expected).abs().max().item()
    assert error <= 2e-6 and unscaled >= 1e-4, (error, unscaled)

    capsys.readouterr()
    assert main(["convert", "keel-to-hf", str(keel_dir), str(back_dir)]) == 0
    written = json.loads((back_dir / "config.json").read_text())
    assert hf_rope_scaling(written) == 8.0 and written["rms_norm_eps"] == 1e-6
    original, converted = load_file(str(hf_dir / "model.safetensors")), load_file(str(back_dir / "model.safetensors"))
    assert set(converted) == set(original) and all(torch.equal(converted[k], original[k]) for k in original)
    from transformers import LlamaForCausalLM

    reloaded = LlamaForCausalLM.from_pretrained(back_dir, attn_implementation="eager").float().eval()
    with torch.no_grad():  # transformers reads the scaling back
        assert (reloaded(tokens).logits - expected).abs().max().item() <= 2e-6


def test_other_rope_scalings_and_mismatches_are_refused_with_the_settings_to_use() -> None:
    from engine.models.presets import PRESETS

    base = _hf_llama().config.to_dict()
    assert hf_rope_scaling(base) is None
    for scaling, message in (({"rope_type": "yarn", "factor": 4.0}, "rope_type='yarn' is not supported"),
                             ({"type": "linear", "factor": 2.0}, "rope_type='linear' is not supported"),
                             (dict(SCALING, high_freq_factor=2.0), "high_freq_factor")):
        with pytest.raises(ConfigError, match=message):
            hf_rope_scaling(dict(base, rope_scaling=scaling))
    # a given preset that does not match says which model.* settings do
    with pytest.raises(ConfigError, match=r"set model.num_layers=2 model.tie_embeddings=False "
                                          r"model.rope_scaling_factor=8.0 model.layernorm_epsilon=1e-06$"):
        check_hf_config(dict(base, rope_scaling=SCALING), PRESETS["tiny-llama"])
    assert "model.rope_scaling_factor=8.0" in hf_model_overrides(dict(base, rope_scaling=SCALING))
    # what Keel's Llama does not build is refused, not dropped (biases, another activation, a sliding window)
    llama = PRESETS["tiny-llama"]
    for change, what in (({"attention_bias": True}, "attention_bias=True"), ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
                         ({"sliding_window": 64}, "sliding_window=64")):
        settings = dict(base, num_hidden_layers=4, rms_norm_eps=1e-5, tie_word_embeddings=True, **change)
        with pytest.raises(ConfigError, match=rf"Keel does not build {what} in a llama-family model: this one does not"):
            check_hf_config(settings, llama)
    check_hf_config(dict(base, num_hidden_layers=4, rms_norm_eps=1e-5, tie_word_embeddings=True, sliding_window=64,
                         use_sliding_window=False), llama)  # a window the model does not use
    with pytest.raises(ConfigError, match=r"rope_scaling_factor: config.json None vs preset 8.0\); set "
                                          r"model.rope_scaling_factor=null"):  # a remedy that can be typed
        check_hf_config(dict(base, num_hidden_layers=4, rms_norm_eps=1e-5, tie_word_embeddings=True),
                        dataclasses.replace(llama, rope_scaling_factor=8.0))
    assert not any("rope_scaling" in item for item in hf_model_overrides(base))


def test_a_one_label_sequence_classification_model_imports_as_a_reward_model_with_the_same_scores(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A reward model trained by TRL's RewardTrainer (LlamaForSequenceClassification, one label) became a policy,
    its score head dropped, with no word. Now it is a Bradley-Terry reward-model checkpoint whose scores of
    (prompt, response) rows, read where Keel reads them, are transformers' at the last token."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from engine.cli import main
    from engine.eval.scoring import load_scorer

    torch.manual_seed(0)
    hf = LlamaForSequenceClassification(LlamaConfig(**SHAPE, num_labels=1, pad_token_id=0)).float().eval()
    hf.save_pretrained(tmp_path / "rm")
    capsys.readouterr()
    assert main(["convert", "hf-to-keel", str(tmp_path / "rm"), str(tmp_path / "out")]) == 0
    assert f"use it with reward_model={tmp_path / 'out' / 'step_0000000'}" in capsys.readouterr().out
    meta = json.loads((tmp_path / "out" / "step_0000000" / "keel.json").read_text())
    assert (meta["algorithm"], meta["config"]["rm"]["type"]) == ("rm", "bt")
    rows = [("What is 2 + 2?", "It is 4."), ("Name a colour.", "Blue, as the sky on a clear day.")]
    scorer = load_scorer(str(tmp_path / "out"))
    try:
        ours = scorer.scalar(scorer.score(rows)).tolist()
        ids = [scorer.fit(prompt, response)[0] for prompt, response in rows]  # type: ignore[index]
    finally:
        scorer.parallel.shutdown()
    with torch.no_grad():  # one row at a time: the last token is the row's own last
        expected = [hf(torch.tensor([row])).logits[0, 0].item() for row in ids]
    assert ours == pytest.approx(expected, abs=1e-5), (ours, expected)
    assert abs(expected[0] - expected[1]) > 1e-3  # two rows told apart: a head read elsewhere would show
    assert main(["convert", "hf-to-keel", str(tmp_path / "rm"), str(tmp_path / "out")]) == 0  # its own output

    # and back: the same tensors, a model transformers loads as the sequence classifier it was
    from safetensors.torch import load_file

    assert main(["convert", "keel-to-hf", str(tmp_path / "out"), str(tmp_path / "back")]) == 0
    original, back = load_file(str(tmp_path / "rm" / "model.safetensors")), load_file(str(tmp_path / "back" / "model.safetensors"))
    assert set(back) == set(original) and all(torch.equal(back[k], original[k]) for k in original)
    reloaded = LlamaForSequenceClassification.from_pretrained(tmp_path / "back").float().eval()
    with torch.no_grad():
        assert [reloaded(torch.tensor([row])).logits[0, 0].item() for row in ids] == pytest.approx(expected, abs=1e-6)


def test_a_sequence_classification_model_of_several_labels_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from engine.cli import main

    torch.manual_seed(0)
    LlamaForSequenceClassification(LlamaConfig(**SHAPE, num_labels=3)).save_pretrained(tmp_path / "rm")
    capsys.readouterr()
    assert main(["convert", "hf-to-keel", str(tmp_path / "rm"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "a sequence-classification model of 3 labels: hf-to-keel imports a one-label reward model" in err, err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("scaled_by", ["rope_freqs", "scaling_type"])
def test_a_gguf_file_with_rope_scaling_is_refused(tmp_path: Path, scaled_by: str) -> None:
    """llama.cpp keeps Llama 3.1's scaling as a rope_freqs.weight tensor, which gguf-to-keel dropped: another model."""
    import gguf
    import numpy as np

    from engine.convert.gguf import read_gguf

    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    if scaled_by == "scaling_type":
        writer.add_string("llama.rope.scaling.type", "yarn")
    writer.add_tensor("token_embd.weight", np.ones((4, 8), dtype=np.float32))
    if scaled_by == "rope_freqs":
        writer.add_tensor("rope_freqs.weight", np.ones(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ConfigError, match="RoPE scaling .*gguf-to-keel reads unscaled Llama models only"):
        read_gguf(path)


def test_a_checkpoint_of_other_rope_or_norm_settings_loads_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """The RoPE and norm settings are not shapes: a context extension changes them on purpose, so they warn."""
    import dataclasses

    from engine.checkpoint import dist as ckpt
    from engine.models.presets import PRESETS

    preset = PRESETS["tiny-llama"]
    saved = {"model_signature": ckpt.model_signature(preset)}
    scaled = ckpt.model_signature(dataclasses.replace(preset, rope_scaling_factor=8.0, rotary_base=500000))
    with caplog.at_level("WARNING", logger="engine.checkpoint.dist"):
        ckpt.check_compatible(Path("ckpt"), saved, scaled)
    assert "model.rotary_base 10000 -> 500000; model.rope_scaling_factor None -> 8.0" in caplog.text
    caplog.clear()
    old = {"model_signature": {k: v for k, v in saved["model_signature"].items() if k not in ckpt.ENCODING_KEYS}}
    ckpt.check_compatible(Path("ckpt"), old, scaled)  # written before these were recorded: nothing to compare
    assert not caplog.text
    with pytest.raises(ckpt.CheckpointError, match="different model shape"):
        ckpt.check_compatible(Path("ckpt"), saved, ckpt.model_signature(dataclasses.replace(preset, num_layers=2)))


def test_model_settings_are_checked() -> None:
    from engine.config import ModelConfig

    with pytest.raises(ConfigError, match="model.rope_scaling_factor=1.0 must be above 1"):
        ModelConfig(rope_scaling_factor=1.0)
    with pytest.raises(ConfigError, match="model.layernorm_epsilon=0.0 must be > 0"):
        ModelConfig(layernorm_epsilon=0.0)


def test_weights_the_model_has_no_place_for_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A bias in the weights that config.json does not declare was dropped with no word."""
    from safetensors.torch import load_file, save_file

    from engine.cli import main

    hf = _hf_llama()
    hf.save_pretrained(tmp_path / "hf")
    weights = load_file(str(tmp_path / "hf" / "model.safetensors"))
    weights["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(weights, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    capsys.readouterr()
    assert main(["convert", "hf-to-keel", str(tmp_path / "hf"), str(tmp_path / "out")]) == 2
    assert "model has no place for: model.layers.0.self_attn.q_proj.bias" in capsys.readouterr().err
