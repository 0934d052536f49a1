"""REINFORCE with a leave-one-out baseline (RLOO, Ahmadian et al. 2024): ``keel train reinforce``.

The HelpSteer2-Preference policy recipe. For each prompt, ``rollout.samples_per_prompt`` = k
rollouts with rewards ``r_i`` minus ``β·KL_i``, where ``KL_i = Σ_t (log π_old(t) - log π_ref(t))``
over the rollout's tokens; the baseline of rollout ``i`` is the mean reward of the other k-1
rollouts of its prompt, and every token of rollout ``i`` gets the advantage
``A_i = r_i - mean_{j≠i} r_j``. No critic.

The policy gradient is taken through the clipped ratio surrogate
``-min(ρA, clip(ρ, 1-ε, 1+ε)A)`` with ``ρ = π_θ/π_old``: on fresh rollouts (``ρ = 1``) its
gradient is exactly REINFORCE's ``-A ∇log π_θ``, and further epochs over the same rollouts stay
near the sampling policy. ``reinforce.aggregation`` is as in GRPO (default ``token_mean``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch

from engine.algorithms.grpo import GRPOConfig, GRPOStep
from engine.algorithms.online import OnlineTrainConfig
from engine.config import ConfigError, doc
from engine.generation.base import Rollouts


@dataclass
class ReinforceConfig:
    kl_coef: float = doc("β: the KL penalty subtracted from each rollout's reward.", 0.01)
    clip: float = doc("ε of the ratio clip (only acts after the first epoch over a buffer).", 0.2)
    aggregation: str = doc("'token_mean', 'seq_mean_token_mean' or 'seq_sum_constant' (see grpo.aggregation).",
                           "token_mean")

    def __post_init__(self) -> None:
        if self.kl_coef < 0 or not 0 <= self.clip < 1:
            raise ConfigError(f"reinforce.kl_coef={self.kl_coef} must be >= 0 and reinforce.clip={self.clip} in [0, 1)")

    def as_grpo(self) -> GRPOConfig:
        """The shared clipped-surrogate settings: KL in the reward, no std normalisation."""
        return GRPOConfig(eps_low=self.clip, eps_high=self.clip, kl="reward" if self.kl_coef > 0 else "none",
                          kl_coef=self.kl_coef, normalize_std=False, aggregation=self.aggregation)


@dataclass
class ReinforceTrainConfig(OnlineTrainConfig):
    """``keel train reinforce``: the shared online sections plus ``reinforce``."""

    reinforce: ReinforceConfig = field(default_factory=ReinforceConfig)
    ALGORITHM: ClassVar[str] = "reinforce"
    GROUP_NEEDS: ClassVar[str] = "RLOO's baseline is the other rollouts of the prompt"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.reinforce.as_grpo()  # the aggregation name is checked now


class ReinforceStep(GRPOStep):
    name = "reinforce"

    def __init__(self, config: ReinforceTrainConfig):
        self.config = config  # type: ignore[assignment]
        self.grpo = config.reinforce.as_grpo()
        self.uses_reference = self.grpo.kl != "none"

    def advantages(self, scores: torch.Tensor, rollouts: Rollouts, logps: list[list[float]],
                   ref_logps: list[list[float]], values: Optional[list[list[float]]] = None,
                   keep: Optional[list[bool]] = None) -> dict[str, list[list[float]]]:
        from engine.advantages import rloo_advantages, sequence_kl

        rewards = scores.clone().float()
        if self.uses_reference:
            kl = sequence_kl(logps, ref_logps)
            rewards = rewards - self.grpo.kl_coef * kl
        advantage = rloo_advantages(rewards, self.config.rollout.samples_per_prompt,
                                    keep=keep)
        return {"advantages": [[float(advantage[i])] * len(tokens) for i, tokens in enumerate(rollouts.tokens)]}


CONFIG = ReinforceTrainConfig


def create(config: ReinforceTrainConfig) -> ReinforceStep:
    return ReinforceStep(config)
