"""megatron's linear layers through oneDNN on CPU (``engine/parallel/cpu_linear.py``): the products and
gradients of plain autograd in float64, the fall-back to megatron's own functions outside the common case
and for matrices too small to gain, and ``KEEL_CPU_LINEAR`` (auto: AMD CPUs only; onednn; torch)."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
import torch

from engine.parallel import cpu_linear

pytestmark = pytest.mark.skipif(not cpu_linear.available(), reason="this torch build has no oneDNN linear")


def _reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, grad: torch.Tensor) -> tuple[
        Any, ...]:
    x, weight = x.double().requires_grad_(), weight.double().requires_grad_()
    b = bias.double().requires_grad_() if bias is not None else None
    out = torch.nn.functional.linear(x, weight, b)
    out.backward(grad.double())
    return out, x.grad, weight.grad, (b.grad if b is not None else None)


@pytest.mark.parametrize("with_bias", [False, True])
def test_products_and_gradients_equal_float64_autograd(with_bias: bool) -> None:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, 48, generator=generator)  # megatron's [sequence, batch, hidden]
    weight = torch.randn(80, 48, generator=generator) / 7
    bias = torch.randn(80, generator=generator) if with_bias else None
    grad = torch.randn(5, 3, 80, generator=generator)
    xs, ws = x.clone().requires_grad_(), weight.clone().requires_grad_()
    bs = bias.clone().requires_grad_() if bias is not None else None
    out = cpu_linear.OneDnnLinear.apply(xs, ws, bs, False, None, True)
    out.backward(grad)
    ref_out, ref_x, ref_w, ref_b = _reference(x, weight, bias, grad)
    assert out.shape == (5, 3, 80) and out._base is None  # not a view: megatron's losses modify logits in place
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    assert xs.grad is not None and ws.grad is not None
    torch.testing.assert_close(xs.grad.double(), ref_x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ws.grad.double(), ref_w, rtol=1e-5, atol=1e-4)
    if bs is not None:
        assert bs.grad is not None
        torch.testing.assert_close(bs.grad.double(), ref_b, rtol=1e-5, atol=1e-4)


def test_frozen_weight_gets_no_gradient_but_the_input_does() -> None:
    x = torch.randn(4, 16, requires_grad=True)
    weight = torch.randn(8, 16)
    out = cpu_linear.OneDnnLinear.apply(x, weight, None, False, None, False)
    out.sum().backward()
    torch.testing.assert_close(x.grad, weight.sum(0).expand(4, 16), rtol=1e-5, atol=1e-5)


def test_install_routes_megatron_and_falls_back_outside_the_common_case(monkeypatch: pytest.MonkeyPatch) -> None:
    from megatron.core.tensor_parallel import layers

    monkeypatch.setenv(cpu_linear.ENV, "onednn")
    original = layers.linear_with_grad_accumulation_and_async_allreduce
    calls: list[str] = []
    try:
        assert cpu_linear.install()
        assert layers.linear_with_grad_accumulation_and_async_allreduce is not original
        def megatron(*args: Any, **kwargs: Any) -> torch.Tensor:
            calls.append("megatron")
            return torch.zeros(1)

        cpu_linear._ORIGINALS["linear_with_grad_accumulation_and_async_allreduce"] = megatron
        x, weight = torch.randn(2, 3, 256), torch.randn(1024, 256, requires_grad=True)
        common = dict(bias=None, gradient_accumulation_fusion=False, allreduce_dgrad=False, grad_output_buffer=None,
                      wgrad_deferral_limit=None, tp_group=None)
        out = layers.linear_with_grad_accumulation_and_async_allreduce(x, weight, sequence_parallel=False, **common)
        assert out.grad_fn.name() == "OneDnnLinearBackward" and calls == []
        layers.linear_with_grad_accumulation_and_async_allreduce(x, weight, sequence_parallel=True, **common)
        layers.linear_with_grad_accumulation_and_async_allreduce(x.double(), weight.double(), sequence_parallel=False,
                                                                 **common)
        small = torch.randn(64, 256, requires_grad=True)  # too small to gain: torch's GEMM
        layers.linear_with_grad_accumulation_and_async_allreduce(x, small, sequence_parallel=False, **common)
        assert calls == ["megatron", "megatron", "megatron"]
    finally:
        cpu_linear._ORIGINALS["linear_with_grad_accumulation_and_async_allreduce"] = original
        cpu_linear.uninstall()
    assert layers.linear_with_grad_accumulation_and_async_allreduce is original


@pytest.mark.parametrize(("choice", "vendor", "expected"), [
    ("auto", "AuthenticAMD", True), ("auto", "GenuineIntel", False), ("auto", "", False),
    ("onednn", "GenuineIntel", True), ("torch", "AuthenticAMD", False),
])
def test_default_kernel_follows_the_cpu_vendor(monkeypatch: pytest.MonkeyPatch, choice: str, vendor: str,
                                               expected: bool) -> None:
    monkeypatch.setenv(cpu_linear.ENV, choice)
    monkeypatch.setattr(cpu_linear, "cpu_vendor", lambda: vendor)
    assert cpu_linear.preferred() is expected


def test_unknown_kernel_choice_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_linear.ENV, "mkl")
    with pytest.raises(ValueError, match="KEEL_CPU_LINEAR='mkl': expected auto, onednn or torch"):
        cpu_linear.preferred()


def test_environment_keeps_torch_gemm() -> None:
    code = ("from engine.parallel import cpu_linear; from megatron.core.tensor_parallel import layers; "
            "f = layers.linear_with_grad_accumulation_and_async_allreduce; "
            "print(cpu_linear.install(), layers.linear_with_grad_accumulation_and_async_allreduce is f)")
    for value, expected in (("torch", "False True"), ("onednn", "True False")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "KEEL_CPU_LINEAR": value})
        assert out.stdout.strip() == expected, (value, out.stdout, out.stderr[-2000:])
