"""The row-block CPU cross entropy (``engine/parallel/cpu_cross_entropy.py``): loss and gradient against a
float64 reference written out here, megatron's own function on the same logits, what goes to megatron's
function instead, and the CPU layer's installation where ``GPTModel`` computes its loss."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from engine.parallel import cpu, cpu_cross_entropy
from tests.helpers import single_process_parallel, tiny_model_single_process


def _reference(logits: torch.Tensor, target: torch.Tensor, grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``logsumexp(x) - x_t`` and its gradient ``g * (softmax(x) - onehot(t))``, by hand."""
    x = logits.double()
    top = x.amax(dim=-1, keepdim=True)
    lse = top.squeeze(-1) + (x - top).exp().sum(dim=-1).log()
    loss = lse - x.gather(-1, target[..., None]).squeeze(-1)
    probs = (x - lse[..., None]).exp()
    onehot = torch.zeros_like(x).scatter_(-1, target[..., None], 1.0)
    return loss, grad_output.double()[..., None] * (probs - onehot)


def _inputs(seq: int, batch: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(seq, batch, vocab, generator=generator) * 4.0
    logits[0, 0, 3] = 60.0  # one near-certain token: its log-probability rounds to 0
    target = torch.randint(0, vocab, (seq, batch), generator=generator)
    return logits, target, torch.rand(seq, batch, generator=generator)


@pytest.mark.parametrize("block_bytes", [cpu_cross_entropy.BLOCK_BYTES, 3 * 4 * 1000 + 8])
def test_loss_and_gradient_equal_the_float64_reference(monkeypatch: pytest.MonkeyPatch, block_bytes: int) -> None:
    monkeypatch.setattr(cpu_cross_entropy, "BLOCK_BYTES", block_bytes)  # 3 rows a block: 37 rows end mid-block
    logits, target, grad_output = _inputs(37, 1, 1000, seed=1)
    expected_loss, expected_grad = _reference(logits, target, grad_output)
    leaf = logits.clone().requires_grad_(True)
    loss = cpu_cross_entropy.row_block_cross_entropy(leaf * 1.0, target)
    loss.backward(grad_output)
    assert loss.shape == target.shape and loss.dtype == torch.float32
    assert torch.allclose(loss.double(), expected_loss, rtol=1e-6, atol=2e-6)
    assert leaf.grad is not None and torch.allclose(leaf.grad.double(), expected_grad, rtol=0, atol=2e-6)
    assert float(expected_grad.abs().max()) > 0.5


def test_logits_are_overwritten_with_log_probabilities_as_megatron_does() -> None:
    logits, target, _ = _inputs(5, 2, 64, seed=2)
    work = logits.clone()
    cpu_cross_entropy.row_block_cross_entropy(work, target)
    assert torch.allclose(work, torch.log_softmax(logits, dim=-1), atol=1e-6)
    half = logits.bfloat16()
    loss = cpu_cross_entropy.row_block_cross_entropy(half, target)  # promoted to fp32, the input untouched
    assert loss.dtype == torch.float32 and torch.equal(half, logits.bfloat16())


def test_matches_megatrons_function_on_one_rank() -> None:
    from megatron.core import tensor_parallel

    logits, target, grad_output = _inputs(16, 3, 512, seed=3)
    with single_process_parallel():
        results = []
        for function in (cpu_cross_entropy.row_block_cross_entropy, tensor_parallel.vocab_parallel_cross_entropy.__wrapped__):
            leaf = logits.clone().requires_grad_(True)
            loss = function(leaf * 1.0, target)
            loss.backward(grad_output)
            results.append((loss, leaf.grad))
    (ours, our_grad), (theirs, their_grad) = results
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=2e-6)
    assert our_grad is not None and their_grad is not None
    assert torch.allclose(our_grad, their_grad, rtol=0, atol=2e-6)


def test_other_cases_go_to_megatrons_function(monkeypatch: pytest.MonkeyPatch) -> None:
    from megatron.core import parallel_state

    calls: list[float] = []

    def original(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        calls.append(label_smoothing)
        return torch.zeros(target.shape)

    wrapped = cpu_cross_entropy.make_cross_entropy(original)
    logits, target, _ = _inputs(4, 2, 32, seed=4)
    monkeypatch.setattr(parallel_state, "get_tensor_model_parallel_world_size", lambda: 1)
    assert float(wrapped(logits.clone(), target).min()) > 0 and calls == []
    wrapped(logits.clone(), target, 0.1)  # label smoothing
    wrapped(logits.clone(), torch.full_like(target, 32))  # an id past this rank's columns
    monkeypatch.setattr(parallel_state, "get_tensor_model_parallel_world_size", lambda: 2)
    wrapped(logits.clone(), target, 0.0)  # vocabulary split over ranks
    assert calls == [0.1, 0.0, 0.0]


def _model_loss_and_grads(model: Any, tokens: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    loss = model(tokens, positions, None, labels=labels)
    loss.sum().backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_cpu_layer_installs_it_where_gpt_model_computes_its_loss() -> None:
    from megatron.core import tensor_parallel

    with single_process_parallel():
        assert cpu.activate() and (tensor_parallel, "vocab_parallel_cross_entropy") in cpu.PATCHED
        installed = tensor_parallel.vocab_parallel_cross_entropy
        model = tiny_model_single_process()
        generator = torch.Generator().manual_seed(5)
        tokens = torch.randint(0, model.vocab_size, (2, 24), generator=generator)
        labels = torch.randint(0, model.vocab_size, (2, 24), generator=generator)
        with torch.no_grad():
            logits = model(tokens, torch.arange(24).expand_as(tokens), None)
        expected, _ = _reference(logits, labels, torch.ones(labels.shape))
        ours, our_grads = _model_loss_and_grads(model, tokens, labels)
        tensor_parallel.vocab_parallel_cross_entropy = installed.__wrapped__
        try:
            theirs, their_grads = _model_loss_and_grads(model, tokens, labels)
        finally:
            tensor_parallel.vocab_parallel_cross_entropy = installed
    assert torch.equal(ours, cpu_cross_entropy.row_block_cross_entropy(logits.clone(), labels))
    assert torch.allclose(ours.double(), expected, atol=2e-6)
    assert torch.allclose(ours, theirs, atol=2e-6)
    assert len(our_grads) == len(their_grads) > 0
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(our_grads, their_grads, strict=True))
