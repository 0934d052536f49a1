"""Scalar heads on the GPT trunk: reward models (K attributes, or 1) and value heads.

``RewardGPTModel`` is megatron's ``GPTModel`` whose last pipeline stage returns, instead
of vocabulary logits, a linear head applied to the final hidden state of every position:
``[batch, seq, K]``. The algorithm picks the end-of-response position (the head is
linear, so head-then-select equals select-then-head). The head is an ordinary replicated
``nn.Linear``: no parallel logic. Under sequence parallelism the last stage's hidden
states are gathered along the sequence first; every tensor-parallel rank then computes
the same rewards, and the gather's backward keeps each rank's slice of the gradient.

All trunk parameter names are those of ``GPTModel`` (the language-model output layer is
kept, unused), so SFT checkpoints initialise reward models and reward checkpoints
initialise critics. An untied output layer is frozen (``requires_grad=False``): megatron's
DDP gives it no gradient buffer and the optimizer no state, so it costs the reward model
no gradient, reduction or update work. (A tied one is the embedding itself, or on later
pipeline stages its synchronised copy, and is left as it is.)
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.models.gpt import GPTModel


class RewardGPTModel(GPTModel):
    """GPT trunk + ``reward_head`` (``hidden -> num_outputs``) on the last stage."""

    def __init__(self, *args: Any, num_outputs: int = 1, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.num_outputs = num_outputs
        if self.post_process:
            self.reward_head = torch.nn.Linear(
                self.config.hidden_size, num_outputs, dtype=self.config.params_dtype,
                device=None if self.config.use_cpu_initialization else torch.cuda.current_device(),
            )
            torch.nn.init.normal_(self.reward_head.weight, std=self.config.init_method_std)
            torch.nn.init.zeros_(self.reward_head.bias)
            if not self.share_embeddings_and_output_weights:
                for param in self.output_layer.parameters():
                    param.requires_grad_(False)

    def _postprocess(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        if not self.post_process:
            return hidden_states
        if self.config.sequence_parallel:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            hidden_states = gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=False)
        rewards = self.reward_head(hidden_states)  # [s, b, K]
        return rewards.transpose(0, 1).contiguous()  # [b, s, K]


def select_end(rewards: torch.Tensor, end_index: torch.Tensor) -> torch.Tensor:
    """``rewards[b, end_index[b], :]`` → ``[batch, K]``."""
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    return rewards[rows, end_index.to(rewards.device).long()]
