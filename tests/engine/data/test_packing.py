"""Sequence packing: exact document boundaries, checked on a real tiny model."""

from __future__ import annotations

import pytest
import torch

from engine.data.packing import PackedSFTDataset, block_causal_mask, pack_lengths
from engine.data.sft import SFTDataset
from engine.data.synthetic import sft_conversations
from engine.data.tokenizers import load_tokenizer


def test_pack_lengths_best_fit_decreasing() -> None:
    lengths = [5, 3, 7, 2, 8, 1, 4]
    bins = pack_lengths(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 3 and bins == pack_lengths(lengths, 10)  # 30 tokens in 3 rows of 10: no waste


def test_block_causal_mask() -> None:
    segments = torch.tensor([[0, 0, 1, 1, 1, -1]])
    allowed = ~block_causal_mask(segments)[0, 0]
    want = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0],
                         [0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(allowed, want) and allowed.any(-1).all()  # no fully masked row (SDPA would give NaN)


def test_packed_samples_keep_documents_apart() -> None:
    tok = load_tokenizer("byte")
    rows = sft_conversations(40, seed=5)
    packed = PackedSFTDataset(rows, tok, 96)
    plain = SFTDataset(rows, tok, 96)
    assert len(packed) < len(plain) and len(packed.documents) == len(plain)
    assert packed.padding_stats()["padding_fraction"] < plain.padding_stats()["padding_fraction"]
    assert packed.padding_stats()["real_tokens"] == plain.padding_stats()["real_tokens"]
    batch = packed.collate([0, 1])
    assert batch["attention_mask"].shape == (2, 1, 96, 96) and batch["attention_mask"].dtype == torch.bool
    for row in range(2):
        segments, positions = batch["segment_ids"][row], batch["position_ids"][row]
        for segment in segments.unique().tolist():
            where = (segments == segment).nonzero().flatten()
            assert torch.equal(positions[where], torch.arange(len(where)))  # positions restart per document
    # the loss of a document never reaches into the next one: same loss tokens as unpacked
    assert sum(packed[i]["loss_mask"].sum() for i in range(len(packed))) == sum(
        plain[i]["loss_mask"].sum() for i in range(len(plain)))


def test_packed_logits_equal_documents_run_alone() -> None:
    """No token attends across a boundary: packed logits == each document's logits run alone."""
    from tests.helpers import single_process_parallel, tiny_model_single_process

    tok = load_tokenizer("builtin-sp")
    packed = PackedSFTDataset(sft_conversations(12, seed=2), tok, 96)
    index = max(range(len(packed)), key=lambda i: len(packed.bins[i]))
    assert len(packed.bins[index]) >= 3
    batch = packed.collate([index])
    with single_process_parallel():
        model = tiny_model_single_process("tiny-llama", seed=7).eval()
        with torch.no_grad():
            together = model(batch["tokens"], batch["position_ids"], batch["attention_mask"])
            leaky = model(batch["tokens"], batch["position_ids"], None)  # plain causal mask, for contrast
            start = 0
            for number, doc in enumerate(packed.bins[index]):
                ids = torch.tensor([packed.documents[doc][0][:-1]])
                alone = model(ids, torch.arange(ids.shape[1]).unsqueeze(0), None)
                end = start + ids.shape[1]
                torch.testing.assert_close(together[0, start:end], alone[0], rtol=1e-4, atol=1e-4)
                if number:
                    assert not torch.allclose(leaky[0, start:end], alone[0], atol=1e-3)
                start = end


def test_pack_is_refused_where_the_transformer_engine_spec_is_chosen(monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """TE's causal attention ignores the block mask: packed rows there would mix documents."""
    from engine.cli import main
    from engine.config import ConfigError, TrainConfig, load_config
    from engine.models import builder

    def validate(*overrides: str) -> None:
        load_config(TrainConfig, None, list(overrides)).validate(1)

    validate("data.pack=true")  # no CUDA here: the local spec, which applies the mask
    monkeypatch.setattr(builder, "transformer_engine_available", lambda: True)  # as on a GPU with TE
    for spec in ("auto", "te"):
        with pytest.raises(ConfigError, match=r"data.pack=true cannot run on the Transformer Engine layer spec"):
            validate("data.pack=true", f"model.layer_spec={spec}")
    validate("data.pack=true", "model.layer_spec=local")
    validate("data.pack=false")
    assert main(["train", "sft", "data.pack=true"]) == 2  # refused before any process group exists
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.pack=false" in err[0] and "model.layer_spec=local" in err[0]


@pytest.mark.gpu
def test_pack_is_refused_on_a_gpu_with_transformer_engine() -> None:
    from engine.config import ConfigError, TrainConfig, load_config
    from engine.models.builder import use_transformer_engine

    if not use_transformer_engine("auto"):
        pytest.skip("needs CUDA and Transformer Engine")
    with pytest.raises(ConfigError, match=r"data.pack=true cannot run on the Transformer Engine layer spec"):
        load_config(TrainConfig, None, ["data.pack=true"]).validate(1)
