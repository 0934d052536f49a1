"""Single-process pieces of generation: sampling options and filters, the KV-cache attention mask, the
resharding planner on hand-made shard descriptions, and ``keel reshard-plan``."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from engine.errors import ConfigError
from engine.generation.base import SamplingParams, backend_class, check_prompts
from engine.generation.native import filter_logits, pick_tokens
from engine.generation.reshard import Shard, build_plan
from tests.helpers import launch


def test_sampling_options_are_checked_and_unknown_ones_refused() -> None:
    with pytest.raises(ConfigError, match="unknown sampling option.*beam_width"):
        SamplingParams.from_dict({"temperature": 0.7, "beam_width": 4})
    with pytest.raises(ConfigError, match="top_p=0.0 must be in"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ConfigError, match="temperature=-1"):
        SamplingParams(temperature=-1)
    assert SamplingParams.from_dict({"stop_token_ids": [3, 4]}).stop_token_ids == (3, 4)
    with pytest.raises(ConfigError, match="unknown generation backend 'vllm'"):
        backend_class("vllm")


def test_prompt_without_room_is_refused_with_its_name() -> None:
    with pytest.raises(ConfigError, match="a.jsonl, line 2: the prompt has 8 tokens.*context of 8"):
        check_prompts([[1], [1] * 8], SamplingParams(), 8, names=["a.jsonl, line 1", "a.jsonl, line 2"])
    with pytest.raises(ConfigError, match="prompt 0: the prompt is empty"):
        check_prompts([[]], SamplingParams(), 8)


def test_top_k_and_top_p_keep_what_the_definitions_say() -> None:
    logits = torch.log(torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]]))
    # top-k 2: the two largest (0.4, 0.3); top-p 0.75: the smallest prefix of the sorted probabilities
    # reaching 0.75 is 0.4 + 0.3 + 0.15 = 0.85 (0.4 + 0.3 = 0.7 falls short)
    kept_k = torch.isfinite(filter_logits(logits, SamplingParams(temperature=1.0, top_k=2)))[0].tolist()
    kept_p = torch.isfinite(filter_logits(logits, SamplingParams(temperature=1.0, top_p=0.75)))[0].tolist()
    assert kept_k == [False, True, False, True, False]
    assert kept_p == [False, True, False, True, True]
    scaled = filter_logits(logits, SamplingParams(temperature=0.5))
    assert torch.allclose(scaled, logits * 2)
    draws = pick_tokens(logits.expand(4000, -1), SamplingParams(temperature=1.0, top_k=2),
                        [torch.Generator().manual_seed(i) for i in range(4000)])
    share = (draws == 1).float().mean().item()
    assert abs(share - 0.4 / 0.7) < 0.03 and set(draws.tolist()) == {1, 3}


def test_causal_chunk_onto_a_cache_sees_the_bottom_right_triangle() -> None:
    from megatron.core.transformer.enums import AttnMaskType

    from engine.models.attention import SDPACoreAttention

    attention = SDPACoreAttention.__new__(SDPACoreAttention)
    torch.nn.Module.__init__(attention)
    attention.attention_dropout = torch.nn.Dropout(0.0)
    attention.softmax_scale = None
    attention.attn_mask_type = AttnMaskType.causal
    torch.manual_seed(0)
    q, k, v = torch.randn(8, 2, 4, 16), torch.randn(8, 2, 2, 16), torch.randn(8, 2, 2, 16)
    full = attention(q, k, v, None)
    chunk = attention(q[5:], k, v, None)  # the last 3 queries onto 8 keys (5 cached)
    assert torch.allclose(chunk, full[5:], atol=1e-6)


def _shard(key: str, rank: int, offset: tuple[int, ...], shape: tuple[int, ...], param: str = "") -> Shard:
    return Shard(key, rank, (offset, shape), 0, 0, param, 0)


def test_planner_prefers_in_process_copies_balances_replicas_and_reports_gaps() -> None:
    # training: TP2 over rows of a [4, 3] tensor, two data-parallel replicas (ranks 0,1 and 2,3)
    train = [_shard("w", r, ((r % 2) * 2, 0), (2, 3)) for r in range(4)]
    # generation TP1: every rank wants the whole tensor
    gen = [_shard("w", r, (0, 0), (4, 3), param="w") for r in range(4)]
    plan = build_plan(train, gen, bucket_bytes=2**20, element_size=4)
    pieces = list(plan.pieces())
    assert sum(p.numel for p in pieces) == 4 * 12
    for piece in pieces:
        own_rows = (piece.dst % 2) * 2
        if piece.region[0][0] == own_rows:  # the destination holds this half itself: copied in-process
            assert piece.src == piece.dst
    remote = [p.src for p in pieces if p.src != p.dst]
    assert sorted(remote) == [0, 1, 2, 3]  # each replica rank sends once: load spread over both replicas
    with pytest.raises(ValueError, match="not covered"):
        build_plan(train[:1], gen[:1], 2**20, 4)


def test_reshard_plan_command_prints_the_plan() -> None:
    proc = launch(1, ["-m", "engine", "reshard-plan", "--model", "tiny-llama", "--train-tensor", "2",
                      "--generation-tensor", "1", "--limit", "3"])
    out = proc.stdout
    assert "training TP2×PP1×DP1 -> generation TP1 (2 replicas)" in out, out
    assert "transport collective; a run on one host with its weights in host memory (CPU) takes the host-shared" in out
    assert "decoder.layers.mlp.linear_fc1.weight" in out or "more" in out
    assert math.isfinite(float(out.split("MiB sent")[0].split(",")[-1].strip()))


def test_generation_tp_that_does_not_split_the_heads_is_refused() -> None:
    from engine.models.presets import PRESETS
    from engine.parallel.generation_layout import GenerationLayout
    from engine.parallel.layout import LayoutError

    with pytest.raises(LayoutError, match=r"KV heads\)=2 is not divisible by the generation tensor-parallel size 4"):
        GenerationLayout.for_world(4, 8).check_model(PRESETS["tiny-llama"])
    with pytest.raises(LayoutError, match="num_attention_heads=9 is not divisible by the generation tensor-parallel size 2"):
        GenerationLayout.for_world(2, 2).check_model(PRESETS["smollm2-135m"])
    with pytest.raises(LayoutError, match=r"size 3 does not divide the world size 4; pick one of 1, 2, 4 \("):
        GenerationLayout.for_world(3, 4)
    # with the model, the sizes offered are those it takes: 4 was offered for tiny-llama, then refused
    with pytest.raises(LayoutError, match=r"size 3 does not divide the world size 4; pick one of 1, 2 \(those that "
                                          r"divide the world size 4 and model tiny-llama's heads, KV heads"):
        GenerationLayout.for_world(3, 4, PRESETS["tiny-llama"])
    with pytest.raises(LayoutError, match=r"KV heads\)=2 is not divisible by the generation tensor-parallel size 4; "
                                          r"pick one of 1, 2 \("):
        GenerationLayout.for_world(4, 8, PRESETS["tiny-llama"])
    with pytest.raises(LayoutError, match=r"num_attention_heads=9 .* size 2; pick one of 1, 3 \("):
        GenerationLayout.for_world(2, 6, PRESETS["smollm2-135m"])


def test_shared_plan_writes_every_element_of_each_tp_copy_once_from_its_holder() -> None:
    from engine.generation.reshard import make_plan

    # training: TP2 over rows of a [4, 3] tensor, two data-parallel replicas (ranks 0,1 and 2,3)
    train = [_shard("w", r, ((r % 2) * 2, 0), (2, 3)) for r in range(4)]
    # generation TP2 (replicas {0, 1} and {2, 3}): TP rank t wants rows 2t..2t+1
    gen = [_shard("w", r, ((r % 2) * 2, 0), (2, 3), param="w") for r in range(4)]
    plan = make_plan(train, gen, [0, 1, 0, 1], bucket_bytes=2**20, element_size=4, shared=True)
    pieces = list(plan.pieces())
    assert sorted(p.group for p in pieces) == [0, 1]  # one write per shared copy, not one per replica
    assert all(p.src == p.dst for p in pieces)  # written in-process by a rank that holds the rows
    for piece in pieces:
        assert piece.region[0][0] == piece.group * 2 and piece.src % 2 == piece.group
    assert len({p.src for p in pieces}) == 2  # the two copies are written by different ranks
    assert "shared copy of TP rank" in plan.describe()


def test_refit_transport_choices_are_checked() -> None:
    from engine.algorithms.online import RolloutConfig
    from engine.generation.host_shared import local_obstacle, open_host_shared

    with pytest.raises(ConfigError, match="expected one of auto, collective, shared"):
        open_host_shared(object(), "shm")
    with pytest.raises(ConfigError, match="needs more than one rank"):
        open_host_shared(object(), "shared")
    assert open_host_shared(object(), "auto") is None  # one process refits in place
    with pytest.raises(ConfigError, match="rollout.refit_transport='fast'"):
        RolloutConfig(refit_transport="fast")

    class Mixed:
        name = "fake"

        def bind_weights(self, views: dict[str, torch.Tensor]) -> None: ...

        def weights_in_place(self) -> dict[str, torch.Tensor]:
            return {"a": torch.zeros(2), "b": torch.zeros(2, dtype=torch.bfloat16)}

    assert "does not expose its weights" in local_obstacle(object())
    assert local_obstacle(Mixed()) == "the generation weights mix dtypes"


def test_shared_copies_that_do_not_fit_give_a_message_and_leave_no_file(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from engine.generation.host_shared import HostSharedWeights

    made = tmp_path / "keel-refit-x-tp0"
    missing = tmp_path / "absent" / "keel-refit-x-tp1"
    message = HostSharedWeights._create(SimpleNamespace(nbytes=4096), [str(made), str(missing)])  # type: ignore[arg-type]
    assert "cannot reserve 2 x 0 MiB" in message and "--ipc=host" in message and "collective" in message
    assert not made.exists()
    assert HostSharedWeights._create(SimpleNamespace(nbytes=4096), [str(made)]) == ""  # type: ignore[arg-type]
    assert made.stat().st_size == 4096
