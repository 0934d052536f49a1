"""Keel's local-spec pieces against megatron-core's originals: same results, bit for bit."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch


@pytest.mark.parametrize("rot_dim", [16, 8])
def test_rotary_matches_megatron(rot_dim: int) -> None:
    from megatron.core.models.common.embeddings import rope_utils

    from engine.models import rotary

    rotary.install()
    original = rotary._original
    assert original is not None and rope_utils._apply_rotary_pos_emb_bshd is rotary.apply_rotary_bshd
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(12, 3, 4, 16, generator=gen, requires_grad=True)
    freqs = torch.randn(12, 1, 1, rot_dim, generator=gen)
    ours = rotary.apply_rotary_bshd(t, freqs)
    again = rotary.apply_rotary_bshd(t, freqs)  # cos/sin from the cache
    theirs = original(t, freqs)
    assert torch.equal(ours, theirs) and torch.equal(again, theirs)
    grad = torch.randn(ours.shape, generator=gen)
    (ours_grad,) = torch.autograd.grad(ours, t, grad)
    (theirs_grad,) = torch.autograd.grad(theirs, t, grad)
    assert torch.equal(ours_grad, theirs_grad)
    other = torch.randn(12, 1, 1, rot_dim, generator=gen)  # a new frequency tensor is not served stale values
    assert torch.equal(rotary.apply_rotary_bshd(t, other), original(t, other))
    assert torch.equal(rotary.apply_rotary_bshd(t, freqs, rotary_interleaved=True),
                       original(t, freqs, rotary_interleaved=True))


@pytest.mark.parametrize("gated", [True, False])
def test_local_mlp_matches_megatron(gated: bool) -> None:
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.mlp import MLP, MLPSubmodules

    from engine.models.mlp import LocalMLP
    from tests.helpers import single_process_parallel

    with single_process_parallel():
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        config = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2, ffn_hidden_size=24,
                                   gated_linear_unit=gated, activation_func=F.silu if gated else F.gelu,
                                   add_bias_linear=True, use_cpu_initialization=True)
        submodules = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
        torch.manual_seed(0)
        ours = LocalMLP(config, submodules)
        theirs = MLP(config, submodules)
        theirs.load_state_dict(ours.state_dict())
        x = torch.randn(5, 2, 16, requires_grad=True)
        out, bias = ours(x)
        ref, ref_bias = theirs(x)
        assert torch.equal(out, ref) and torch.equal(bias, ref_bias)
        (grad,) = torch.autograd.grad(out.sum(), x)
        (ref_grad,) = torch.autograd.grad(ref.sum(), x)
        assert torch.equal(grad, ref_grad)
        assert ours._plain()
        config.glu_linear_offset = 1.0  # a case LocalMLP hands back to megatron
        assert not ours._plain()
        assert torch.equal(ours(x)[0], theirs(x)[0])


def test_swiglu_matches_autograd() -> None:
    import torch.nn.functional as F

    from engine.models.mlp import swiglu

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(7, 2, 10, generator=gen, requires_grad=True)
    grad = torch.randn(7, 2, 5, generator=gen)
    gate, up = torch.chunk(x, 2, dim=-1)
    reference = F.silu(gate) * up
    ours = swiglu(x)
    assert torch.equal(ours, reference)
    (ref_grad,) = torch.autograd.grad(reference, x, grad)
    (our_grad,) = torch.autograd.grad(ours, x, grad)
    assert torch.equal(our_grad, ref_grad)
    assert torch.autograd.gradcheck(swiglu, (x.detach().double().requires_grad_(),))


@pytest.mark.parametrize("override", [None, "0"])
def test_fp32_on_the_te_spec_says_once_that_te_multiplies_in_tf32(override: Any, monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Measured on an H200: TE's fp32 GEMMs run in TF32, so rollout and trainer log-probs differ by 2e-5."""
    from engine.models import builder

    builder._note_tf32.cache_clear()
    if override is None:
        monkeypatch.delenv("NVIDIA_TF32_OVERRIDE", raising=False)
    else:
        monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", override)
    with caplog.at_level(logging.INFO, logger="engine.models.builder"):
        builder._note_tf32()
        builder._note_tf32()
    said = [r.message for r in caplog.records if "TF32" in r.message]
    assert len(said) == (1 if override is None else 0), said


def test_layout_invariant_init_draws_each_full_tensor_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The layers share their checkpoint keys (the layer number is a prepended axis), and the full tensor of a
    key was drawn again for every layer: quadratic in depth, 34 s of SmolLM2-135M's build. Every parameter
    still gets its slice of that tensor."""
    from engine.models import init
    from tests.helpers import single_process_parallel, tiny_model_single_process

    drawn: list[str] = []
    full_tensor = init._full_tensor

    def counted(key: str, *args: Any) -> torch.Tensor:
        drawn.append(key)
        return full_tensor(key, *args)

    with single_process_parallel():
        model = tiny_model_single_process(num_layers=3)
        monkeypatch.setattr(init, "_full_tensor", counted)
        init.init_layout_invariant([model], 7, 0.02, 3, False)
    assert len(drawn) == len(set(drawn)) and any(key.startswith("decoder.layers.") for key in drawn), drawn
    weights = [layer.mlp.linear_fc1.weight for layer in model.decoder.layers]
    key = "decoder.layers.mlp.linear_fc1.weight"
    expected = full_tensor(key, (3, *weights[0].shape), 7, 0.02, 3, False)
    assert all(torch.equal(weight, expected[i]) for i, weight in enumerate(weights))
