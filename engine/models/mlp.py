"""MLP for the local layer spec.

megatron-core's ``MLP`` computes the gated unit as ``act(x_glu) * (x_linear +
config.glu_linear_offset)``; with the default offset of 0.0 the addition still copies
the whole ``x_linear`` half in every layer, forward and backward. ``LocalMLP`` keeps
megatron's module (same parameters, names and sharded state dict) and skips that copy
whenever the result is the same: no offset, no clamp, no per-token scale and no fused
bias-activation kernel. In every other case it defers to megatron.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from megatron.core.transformer.mlp import MLP


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
        if self.config.gated_linear_unit:
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
