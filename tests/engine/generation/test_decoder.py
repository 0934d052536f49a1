"""The cached decoder's weight products on one rank: oneDNN-packed weights give the plain products'
tokens and log-probs, are rebuilt for every batch from the live parameters, and are dropped by
``release()``; megatron's own modules (the TE spec's path) decode the same tokens."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from engine.generation.base import SamplingParams
from engine.generation.decoder import pack_weight

PROMPTS = [[5, 17, 33], [40, 41, 42, 43, 44, 45, 46], [100], [9] * 11]
PARAMS = SamplingParams(max_new_tokens=6)


@pytest.fixture(scope="module")
def backends() -> Iterator[dict[str, Any]]:
    """Three TP1 native backends of a widened tiny-llama sharing one set of random weights: packed, plain,
    megatron."""
    from engine.config import TrainConfig, load_config
    from engine.generation.native import NativeBackend
    from engine.parallel.generation_layout import GenerationParallelState
    from tests.helpers import single_process_parallel

    with single_process_parallel():
        # every weight at least MIN_PACKED_ELEMENTS, so that every product is a packed one
        config = load_config(TrainConfig, None, ["model.preset=tiny-llama", "model.hidden_size=256",
                                                 "model.ffn_hidden_size=1024", "precision.dtype=fp32"])
        generator = torch.Generator().manual_seed(7)
        built: dict[str, Any] = {}
        for name, decoder in (("packed", "cached"), ("plain", "cached"), ("megatron", "megatron")):
            backend = NativeBackend(config, GenerationParallelState.initialize(1), max_batch_size=4, decoder=decoder)
            if name == "plain":
                backend.decoder.pack_weights = False
            built[name] = backend
        for name, param in built["packed"].params.items():
            value = 1.0 + 0.1 * torch.randn(param.shape, generator=generator) if "norm" in name \
                else 0.05 * torch.randn(param.shape, generator=generator)
            for backend in built.values():
                backend.update_weights([(name, value)])
        yield built


def test_packing_is_used_on_this_cpu_and_released(backends: dict[str, Any]) -> None:
    packed = backends["packed"]
    if pack_weight(torch.zeros(256, 256)) is None:
        pytest.skip("this torch build has no oneDNN linear")
    packed.generate(PROMPTS, PARAMS)
    weights = sum(p.numel() * p.element_size() for n, p in packed.params.items() if n.endswith("weight") and "norm" not in n)
    assert packed.stats["packed_weight_bytes"] == weights
    assert backends["plain"].generate(PROMPTS, PARAMS) is not None
    assert backends["plain"].stats["packed_weight_bytes"] == 0
    packed.release()
    assert packed.decoder.packed_bytes() == 0 and packed.decoder.cache == []


def test_small_weights_are_not_packed() -> None:
    assert pack_weight(torch.zeros(64, 512)) is None
    assert pack_weight(torch.zeros(256, 256)) is not None or not torch.backends.mkldnn.is_available()


def test_packed_plain_and_megatron_decoding_agree(backends: dict[str, Any]) -> None:
    runs = {name: backend.generate(PROMPTS, PARAMS) for name, backend in backends.items()}
    for name in ("plain", "megatron"):
        assert runs[name].tokens == runs["packed"].tokens, name
        diff = max(abs(a - b) for x, y in zip(runs[name].logprobs, runs["packed"].logprobs, strict=True)
                   for a, b in zip(x, y, strict=True))
        assert diff <= 1e-5, (name, diff)


def test_weights_written_in_place_are_used_by_the_next_batch(backends: dict[str, Any]) -> None:
    """Refit writes into the parameters; the packed copies must follow (they are rebuilt per batch)."""
    packed, plain = backends["packed"], backends["plain"]
    before = packed.generate(PROMPTS, PARAMS)
    with torch.no_grad():
        for backend in (packed, plain):
            backend.params["embedding.word_embeddings.weight"].mul_(-1.0)
    after, reference = packed.generate(PROMPTS, PARAMS), plain.generate(PROMPTS, PARAMS)
    assert after.tokens == reference.tokens
    assert after.tokens != before.tokens
