"""MLP for the local layer spec.

megatron-core's ``MLP`` computes the gated unit as ``act(x_glu) * (x_linear +
config.glu_linear_offset)``; with the default offset of 0.0 the addition still copies
the whole ``x_linear`` half in every layer, forward and backward. ``LocalMLP`` keeps
megatron's module (same parameters, names and sharded state dict) and skips that copy
whenever the result is the same: no offset, no clamp, no per-token scale and no fused
bias-activation kernel. In every other case it defers to megatron. For SwiGLU the
backward also fills the fc1 output gradient in place (:func:`swiglu`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.mlp import MLP


class _SwiGLU(torch.autograd.Function):
    """``silu(gate) * up`` of ``x = [gate | up]`` whose backward writes both halves of the
    input gradient in place, instead of autograd's ``cat`` of two separate halves (the same
    operations otherwise, so the same numbers)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        gate, up = torch.chunk(x, 2, dim=-1)
        activated = F.silu(gate)
        ctx.save_for_backward(x, activated)
        return activated * up

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        x, activated = ctx.saved_tensors
        gate, up = torch.chunk(x, 2, dim=-1)
        grad_x = torch.empty_like(x)
        grad_gate, grad_up = torch.chunk(grad_x, 2, dim=-1)
        torch.mul(grad, activated, out=grad_up)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=grad_gate)
        return grad_x


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :F]) * x[..., F:]`` (see :class:`_SwiGLU`)."""
    return _SwiGLU.apply(x)


class LocalMLP(MLP):
    """megatron ``MLP`` without the zero-offset copy in the gated linear unit."""

    def _plain(self) -> bool:
        config = self.config
        return not (
            config.use_te_activation_func
            or config.bias_activation_fusion
            or config.activation_func_clamp_value is not None
            or config.glu_linear_offset != 0.0
        )

    def forward(  # type: ignore[override]
        self, hidden_states: torch.Tensor, per_token_scale: Optional[torch.Tensor] = None, **kwargs: Any
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if per_token_scale is not None or not self._plain():
            return super().forward(hidden_states, per_token_scale=per_token_scale, **kwargs)
        intermediate, bias = self.linear_fc1(hidden_states)
        if bias is not None:
            intermediate = intermediate + bias
        if self.config.gated_linear_unit and self.config.activation_func is F.silu:
            intermediate = swiglu(intermediate)
        elif self.config.gated_linear_unit:
            gate, linear = torch.chunk(intermediate, 2, dim=-1)
            intermediate = self.config.activation_func(gate) * linear
        else:
            intermediate = self.activation_func(intermediate)
        return self.linear_fc2(intermediate)


@dataclass
class LocalMLPSpec:
    """Spec for ``LocalMLP`` that megatron's ``build_module`` accepts.

    Deliberately not a ``ModuleSpec``: ``TransformerLayer`` dispatches ``ModuleSpec`` MLPs on
    their exact class and warns (once per layer) about any class it does not know. Built
    from this spec, ``LocalMLP`` takes the tensor-parallel group from ``parallel_state``,
    as megatron's ``MLP`` does when none is passed.
    """

    submodules: Any
    module: type = LocalMLP
    params: dict = field(default_factory=dict)
