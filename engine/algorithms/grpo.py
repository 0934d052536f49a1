"""GRPO (Shao et al. 2024) with the Dr. GRPO and DAPO options: ``keel train grpo``.

For each prompt, ``rollout.samples_per_prompt`` = G rollouts with outcome rewards ``r_i``;
every token of rollout ``i`` gets the advantage ``Â_i = (r_i - mean(r)) / (std(r) + ε)``
(``grpo.normalize_std=false``: ``r_i - mean(r)``, Dr. GRPO). Per token, with
``ρ = π_θ(t) / π_old(t)`` (``π_old``: the training model's log-probs recomputed before the
update), the loss is ``-min(ρÂ, clip(ρ, 1-ε_low, 1+ε_high)Â)`` (``grpo.eps_high`` > ``eps_low``
is DAPO's clip-higher), plus, with ``grpo.kl=loss``, ``β·KL_t`` with the k3 estimator
``π_ref/π_θ - log(π_ref/π_θ) - 1`` (``grpo.kl_estimator``: or k1 ``log π_θ - log π_ref``, or k2
``½(log π_θ - log π_ref)²``, verl's ``kl`` and ``mse``). ``grpo.kl=reward`` subtracts ``β·Σ_t(log π_old - log π_ref)``
from each rollout's reward instead; ``none`` drops the reference model entirely (DAPO).

``grpo.aggregation`` says how token losses become the step's loss (:func:`engine.losses.aggregate`):
``seq_mean_token_mean`` (GRPO: each rollout's token mean, then the mean over rollouts),
``token_mean`` (DAPO: all tokens of the step weigh the same) or ``seq_sum_constant``
(Dr. GRPO: each rollout's token sum over a constant, default ``rollout.max_new_tokens``).

Dynamic sampling (DAPO, ``grpo.dynamic_sampling``) drops groups whose rewards are all equal
(zero advantage) and samples more prompts until the iteration's groups are full, at most
``grpo.max_sampling_rounds`` rounds; the counts are logged. Overlong responses (no stop token
within ``rollout.max_new_tokens``) can be excluded from the loss (``grpo.overlong=filter``) or
given DAPO's soft penalty (``penalty``, over the last ``grpo.overlong_cache`` tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch

from engine.algorithms.base import Batch
from engine.algorithms.online import OnlineStep, OnlineTrainConfig
from engine.config import ConfigError, doc
from engine.generation.base import Rollouts

METRICS = ("policy_loss", "kl_loss", "clip_fraction", "ratio_mean")


@dataclass
class GRPOConfig:
    eps_low: float = doc("Lower clip range ε_low of the ratio.", 0.2)
    eps_high: float = doc("Upper clip range ε_high (DAPO's clip-higher: 0.28).", 0.2)
    kl: str = doc("'loss' (β·KL term, by grpo.kl_estimator), 'reward' (β·KL subtracted from the reward) or 'none' "
                  "(no reference).", "loss")
    kl_coef: float = doc("β of the KL term.", 0.04)
    kl_estimator: str = doc(
        "Per-token KL estimate of grpo.kl=loss: 'k3' (π_ref/π - log(π_ref/π) - 1, GRPO's; verl's low_var_kl), 'k1' "
        "(log π - log π_ref; verl's kl: as a loss term its gradient is 0 in expectation on the policy's own "
        "samples) or 'k2' (½(log π - log π_ref)²; verl's mse). Read by grpo.kl=loss only.", "k3")
    normalize_std: bool = doc("Divide advantages by the group's reward std (false: Dr. GRPO).", True)
    aggregation: str = doc("'seq_mean_token_mean' (GRPO), 'token_mean' (DAPO) or 'seq_sum_constant' (Dr. GRPO).",
                           "seq_mean_token_mean")
    aggregation_constant: Optional[int] = doc("Constant of seq_sum_constant (default: rollout.max_new_tokens).", None)
    dynamic_sampling: bool = doc("Drop groups with equal rewards and sample more prompts (DAPO).", False)
    max_sampling_rounds: int = doc("Most generation rounds per iteration with dynamic sampling.", 4)
    overlong: str = doc("Responses cut at rollout.max_new_tokens: 'keep', 'filter' (no loss) or 'penalty' (DAPO).",
                        "keep")
    overlong_cache: int = doc("Tokens before the limit where DAPO's soft overlong penalty starts.", 8)

    def __post_init__(self) -> None:
        if not 0 <= self.eps_low < 1:
            raise ConfigError(f"grpo.eps_low={self.eps_low} must be in [0, 1)")
        if self.eps_high < 0:
            raise ConfigError(f"grpo.eps_high={self.eps_high} must be >= 0")
        choices = {"kl": ("loss", "reward", "none"), "kl_estimator": ("k1", "k2", "k3"),
                   "overlong": ("keep", "filter", "penalty"),
                   "aggregation": ("seq_mean_token_mean", "token_mean", "seq_sum_constant")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"grpo.{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if self.kl_coef < 0:
            raise ConfigError(f"grpo.kl_coef={self.kl_coef} must be >= 0")
        if self.kl_estimator != "k3" and self.kl != "loss":  # grpo.kl=reward subtracts the sequence's k1 sum
            raise ConfigError(f"grpo.kl_estimator={self.kl_estimator} is read by grpo.kl=loss only, not "
                              f"grpo.kl={self.kl}: leave it unset, or set grpo.kl=loss")
        if self.max_sampling_rounds < 1:
            raise ConfigError(f"grpo.max_sampling_rounds={self.max_sampling_rounds} must be >= 1")


@dataclass
class GRPOTrainConfig(OnlineTrainConfig):
    """``keel train grpo``: the shared online sections plus ``grpo``."""

    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    ALGORITHM: ClassVar[str] = "grpo"
    GROUP_NEEDS: ClassVar[str] = "GRPO compares the rollouts of a prompt"

    def __post_init__(self) -> None:
        super().__post_init__()
        grpo, limit = self.grpo, self.rollout.max_new_tokens
        # the penalty's ramp is the last overlong_cache tokens of max_new_tokens: a longer one raised a ValueError
        # traceback in the first iteration, after the models were built
        if grpo.overlong == "penalty" and not 0 < grpo.overlong_cache <= limit:
            raise ConfigError(f"grpo.overlong_cache={grpo.overlong_cache} must be in 1..rollout.max_new_tokens={limit}: "
                              "the soft overlong penalty ramps over the last overlong_cache tokens of the limit")
        if grpo.aggregation_constant is not None and grpo.aggregation_constant < 1:
            raise ConfigError(f"grpo.aggregation_constant={grpo.aggregation_constant} must be >= 1")


class GRPOStep(OnlineStep):
    name = "grpo"
    loss_name = "policy_loss"

    def __init__(self, config: GRPOTrainConfig):
        self.config = config
        self.grpo = config.grpo
        self.uses_reference = self.grpo.kl != "none" and self.grpo.kl_coef > 0
        # sampling rounds per iteration with DAPO's dynamic sampling (read by the online trainer)
        self.dynamic_sampling = self.grpo.max_sampling_rounds if self.grpo.dynamic_sampling else None

    def metric_names(self) -> tuple[str, ...]:
        return METRICS

    def judges_by_max_new_tokens(self) -> str:
        return "" if self.grpo.overlong == "keep" else f"grpo.overlong={self.grpo.overlong}"

    def reward_shaping(self, rollouts: Rollouts) -> Optional[torch.Tensor]:
        """DAPO's soft overlong penalty under ``grpo.overlong=penalty``."""
        if self.grpo.overlong != "penalty":
            return None
        from engine.advantages import overlong_penalty

        lengths = torch.tensor(rollouts.lengths, dtype=torch.float32)
        return overlong_penalty(lengths, self.config.rollout.max_new_tokens, self.grpo.overlong_cache)

    def advantages(self, scores: torch.Tensor, rollouts: Rollouts, logps: list[list[float]],
                   ref_logps: list[list[float]], values: Optional[list[list[float]]] = None,
                   keep: Optional[list[bool]] = None) -> dict[str, list[list[float]]]:
        from engine.advantages import group_advantages, sequence_kl

        rewards = scores.clone().float()
        shaping = self.reward_shaping(rollouts)
        if shaping is not None:
            rewards = rewards + shaping
        if self.grpo.kl == "reward" and self.uses_reference:
            kl = sequence_kl(logps, ref_logps)
            rewards = rewards - self.grpo.kl_coef * kl
        advantage = group_advantages(rewards, self.config.rollout.samples_per_prompt, self.grpo.normalize_std,
                                     keep=keep)
        cut = [r == "length" for r in rollouts.finish_reasons]
        return {"advantages": [[0.0 if (self.grpo.overlong == "filter" and cut[i]) else float(advantage[i])] * len(tokens)
                               for i, tokens in enumerate(rollouts.tokens)]}

    def loss(self, batch: Batch, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        from engine.losses import aggregate, clipped_policy_loss, kl_penalty

        logps = self.token_logps(batch, output)
        device = logps.device
        mask = batch["loss_mask"].to(device).float() * batch["keep"].to(device)
        advantages = batch["advantages"].to(device)
        per_token, clipped, ratio = clipped_policy_loss(logps, batch["old_logps"].to(device), advantages, mask,
                                                        self.grpo.eps_low, self.grpo.eps_high)
        kl = kl_penalty(logps, batch["ref_logps"].to(device), self.grpo.kl_estimator) * mask
        if self.grpo.kl == "loss" and self.uses_reference:
            per_token = per_token + self.grpo.kl_coef * kl
        constant = self.grpo.aggregation_constant or self.config.rollout.max_new_tokens
        total, count = aggregate(per_token, mask, self.grpo.aggregation, constant)
        kl_total, _ = aggregate(kl, mask, self.grpo.aggregation, constant)
        tokens = mask.sum()
        metrics = {
            "policy_loss": torch.stack([total.detach(), count.float()]),
            "kl_loss": torch.stack([kl_total.detach(), count.float()]),
            "clip_fraction": torch.stack([(clipped.float() * mask).sum(), tokens]),
            "ratio_mean": torch.stack([(ratio.detach() * mask).sum(), tokens]),
        }
        return total, count.to(torch.int), metrics


CONFIG = GRPOTrainConfig


def create(config: GRPOTrainConfig) -> GRPOStep:
    return GRPOStep(config)
