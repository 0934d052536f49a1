"""PPO with a critic (the HelpSteer2 recipe): ``keel train ppo``.

The actor starts from the SFT checkpoint (``checkpoint.load``); the critic starts from the reward
model (``ppo.critic``, default ``reward_model``) and reads its head at every position instead of
only at the end: ``V_t = w · head(h_t)`` with ``w`` the goodness weights of a regression model
(or the single BT output). Per rollout token ``t`` (formulas in :mod:`engine.advantages` and
:mod:`engine.losses`):

* reward ``r_t = -β·(log π_old(t) - log π_ref(t))``, plus the sequence's score at its last token;
* GAE with ``ppo.gamma`` (1) and ``ppo.lam`` (0.95) over the critic's values, returns
  ``R_t = A_t + V_t``; advantages whitened over the iteration's tokens (``ppo.whiten``);
* actor: clipped ratio loss ``-min(ρA, clip(ρ, 1±ε)A)``, token mean; the entropy is logged;
* critic: clipped value loss ``½·max((V-R)², (clip(V, V_old±ε_v) - R)²)``, token mean.

Actor and critic live on the same ranks. With ``ppo.swap_models`` (default) the model that is
not training keeps its optimizer state and gradient buffers in host memory
(:meth:`ModelRunner.offload`), so only one model's training state occupies the accelerator at
a time. The critic is checkpointed beside the actor (``<checkpoint.dir>/critic``) and resumes
with it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch

from engine.algorithms.base import Batch
from engine.algorithms.logprobs import per_token_logprobs, response_values
from engine.algorithms.online import OnlineStep, OnlineTrainConfig
from engine.config import ConfigError, doc
from engine.data.batching import to_device
from engine.generation.base import Rollouts

logger = logging.getLogger(__name__)

METRICS = ("policy_loss", "clip_fraction", "ratio_mean", "entropy")
CRITIC_METRICS = ("value_loss", "value_clip_fraction")


@dataclass
class PPOConfig:
    kl_coef: float = doc("β of the per-token KL penalty in the reward (HelpSteer2 recipe: 3e-3).", 3e-3)
    gamma: float = doc("Discount γ of GAE.", 1.0)
    lam: float = doc("λ of GAE.", 0.95)
    clip: float = doc("ε of the actor's ratio clip.", 0.2)
    value_clip: float = doc("ε_v of the critic's value clip.", 0.2)
    whiten: bool = doc("Whiten the advantages over each iteration's tokens.", True)
    critic: Optional[str] = doc(
        "Critic initialisation: a reward-model checkpoint (None or 'reward_model' = reward_model's, its head "
        "included), a policy checkpoint (its trunk, with a new one-output value head), or 'init' = the policy's "
        "trunk (checkpoint.load, else its seeded initialisation) with a new one-output value head.", None)
    critic_lr: Optional[float] = doc("Critic learning rate (None = optimizer.lr).", None)
    swap_models: bool = doc("Keep the idle model's optimizer state and gradients in host memory.", True)

    def __post_init__(self) -> None:
        if not (0 < self.gamma <= 1 and 0 <= self.lam <= 1 and 0 < self.clip < 1 and self.value_clip > 0):
            raise ConfigError("ppo: need 0 < gamma <= 1, 0 <= lam <= 1, 0 < clip < 1 and value_clip > 0")
        if self.kl_coef < 0:
            raise ConfigError(f"ppo.kl_coef={self.kl_coef} must be >= 0")


@dataclass
class PPOTrainConfig(OnlineTrainConfig):
    """``keel train ppo``: the shared online sections plus ``ppo``."""

    ppo: PPOConfig = field(default_factory=PPOConfig)
    ALGORITHM: ClassVar[str] = "ppo"

    def __post_init__(self) -> None:
        super().__post_init__()
        # unset, or named as the help names its default (ppo.critic=reward_model: "no such checkpoint" came after
        # the models were built): the reward model's checkpoint
        if self.ppo.critic is None or (self.ppo.critic == "reward_model" and not os.path.exists("reward_model")):
            self.ppo.critic = self.reward_model

    def check_checkpoints(self) -> None:
        """The critic's checkpoint exists (read before any model is built, as the others are)."""
        super().check_checkpoints()
        from engine.checkpoint.dist import locate

        if self.ppo.critic and self.ppo.critic != "init":
            locate(self.ppo.critic, "ppo.critic")

    def validate(self, world_size: int) -> None:
        super().validate(world_size)
        if not self.ppo.critic:
            raise ConfigError("keel train ppo needs a critic: set reward_model=<RM checkpoint> (the critic starts from "
                              "it), ppo.critic=<checkpoint>, or ppo.critic=init (a value head on the policy's trunk)")


class PPOStep(OnlineStep):
    name = "ppo"
    loss_name = "policy_loss"

    def __init__(self, config: PPOTrainConfig):
        self.config = config
        self.ppo = config.ppo
        self.uses_reference = self.ppo.kl_coef > 0

    def metric_names(self) -> tuple[str, ...]:
        return METRICS

    def curve_metrics(self) -> tuple[str, ...]:
        return ("reward", *self.reward_metrics(), *(("kl",) if self.uses_reference else ()), "value_loss",
                "response_length")

    def build_critic(self, config: Any, parallel: Any, resumed: Optional[Any] = None) -> Critic:
        return Critic(config, parallel, resumed)

    def advantages(self, scores: torch.Tensor, rollouts: Rollouts, logps: list[list[float]],
                   ref_logps: list[list[float]], values: Optional[list[list[float]]] = None,
                   keep: Optional[list[bool]] = None) -> dict[str, list[list[float]]]:
        from engine.advantages import gae, token_rewards, whiten

        assert values is not None, "PPO needs the critic's values"
        width = max(rollouts.lengths)

        def padded(rows: list[list[float]]) -> torch.Tensor:
            out = torch.zeros(len(rows), width)
            for i, row in enumerate(rows):
                out[i, : len(row)] = torch.tensor(row)
            return out

        kept = keep or [True] * len(rollouts.lengths)  # a skipped rollout (placeholder reward) is out of the whitening
        mask = padded([[1.0 if k else 0.0] * n for n, k in zip(rollouts.lengths, kept, strict=True)])
        kl = padded(logps) - padded(ref_logps)
        rewards = token_rewards(scores.float(), mask, kl, self.ppo.kl_coef)
        advantage, returns = gae(rewards, padded(values), mask, self.ppo.gamma, self.ppo.lam)
        if self.ppo.whiten and mask.sum() > 1:
            advantage = whiten(advantage, mask)

        def rows(tensor: torch.Tensor) -> list[list[float]]:
            return [tensor[i, :n].tolist() for i, n in enumerate(rollouts.lengths)]

        return {"advantages": rows(advantage), "returns": rows(returns), "old_values": values}

    def loss(self, batch: Batch, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        from engine.losses import aggregate, clipped_policy_loss

        logps, entropy = per_token_logprobs(output, batch["labels"], batch["loss_mask"], self.parallel,
                                            return_entropy=True)
        device = logps.device
        mask = batch["loss_mask"].to(device).float() * batch["keep"].to(device)
        per_token, clipped, ratio = clipped_policy_loss(logps.float(), batch["old_logps"].to(device),
                                                        batch["advantages"].to(device), mask, self.ppo.clip, self.ppo.clip)
        total, count = aggregate(per_token, mask, "token_mean")
        tokens = mask.sum()
        metrics = {
            "policy_loss": torch.stack([total.detach(), count.float()]),
            "clip_fraction": torch.stack([(clipped.float() * mask).sum(), tokens]),
            "ratio_mean": torch.stack([(ratio.detach() * mask).sum(), tokens]),
            "entropy": torch.stack([(entropy.detach().float() * mask).sum(), tokens]),
        }
        return total, count.to(torch.int), metrics


def critic_source(config: Any, resumed: Optional[Any] = None) -> tuple[Any, Optional[str], str]:
    """(reward-model config of the critic, the checkpoint its weights come from or None, what its head is): the
    ``resumed`` critic's (a run resumes the head it trained, whatever ``ppo.critic`` names now), else
    ``ppo.critic``'s: a reward model's or critic's checkpoint with its head; a policy checkpoint, or ``init`` (the
    policy's start), with a new one-output value head. A policy's checkpoint once gave a 5-output regression head
    (the reward model's default), weighed by the goodness weights, with no word."""
    from engine.algorithms.reward import RewardTrainConfig
    from engine.checkpoint import dist as ckpt
    from engine.config import from_dict

    fresh = "a new one-output value head"
    if resumed is None and config.ppo.critic == "init":
        rm_config = RewardTrainConfig(model=config.model)
        rm_config.rm.type = "bt"
        return rm_config, config.checkpoint.load, fresh
    path = resumed if resumed is not None else ckpt.locate(config.ppo.critic, "ppo.critic")
    meta = ckpt.read_meta(path)
    saved = dict(meta["config"])
    if ckpt.scorer_kind(meta) is None:  # a policy's: its trunk (its saved rm section, if any, is no head's)
        rm: dict[str, Any] = {"type": "bt"}
        head = f"{fresh} (a {meta.get('algorithm')} checkpoint: its trunk)"
    else:  # a critic's config is its PPO run's: its head is in its own record, or in its weights
        rm = dict(saved.get("rm") or {}) if meta.get("algorithm") == "rm" else dict(meta.get("rm") or _head_of(path))
        head = f"the {ckpt.scorer_kind(meta)}'s {rm.get('type', 'regression')} head"
    data = {"format": "pairs" if rm.get("type") == "bt" else "attributes"}
    return from_dict(RewardTrainConfig, {"model": saved["model"], "rm": rm, "data": data}, str(path)), str(path), head


def _head_of(path: Any) -> dict[str, Any]:
    """The ``rm`` section of a critic saved before critics recorded it, from its head's shape: 1 output, a
    value head; 5, the reward model's default regression head (a critic from a policy checkpoint had one)."""
    from megatron.core import dist_checkpointing

    from engine.checkpoint.dist import CheckpointError
    from engine.data.schemas import ATTRIBUTES

    shape = dist_checkpointing.load_tensors_metadata(str(path))["reward_head.weight"].global_shape
    if shape[0] == 1:
        return {"type": "bt"}
    if shape[0] == len(ATTRIBUTES):
        return {"type": "regression"}
    raise CheckpointError(f"{path}: a critic of {shape[0]} outputs, saved without its head's settings: resume it "
                          "with the Keel that wrote it, or start the critic afresh (ppo.critic=...)")


class Critic:
    """The value model: a trained :class:`~engine.runner.ModelRunner` of the reward model's architecture."""

    def __init__(self, config: Any, parallel: Any, resumed: Optional[Any] = None):
        from engine.algorithms.reward import RewardStep
        from engine.config import OptimizerConfig
        from engine.eval.scoring import GOODNESS_WEIGHTS
        from engine.runner import ModelRunner

        rm_config, source, head = critic_source(config, resumed)
        self.rm_settings = dataclasses.asdict(rm_config.rm)  # recorded with every save: the head to rebuild
        optimizer = dataclasses.replace(config.optimizer, lr=config.ppo.critic_lr or config.optimizer.lr)
        assert isinstance(optimizer, OptimizerConfig)
        self.config = dataclasses.replace(config, model=rm_config.model, optimizer=optimizer)
        self.rm_step = RewardStep(rm_config.rm)
        self.runner = ModelRunner.trained(self.config, parallel, self.rm_step.model_class())
        if source and resumed is None:  # a resumed critic is loaded whole by the trainer's resume (maybe_resume)
            left = self.runner.load_weights(source)  # from a policy checkpoint the value head stays new
            if left:
                logger.info("ppo: critic keys not in %s (initialised): %s", source, ", ".join(left))
        self.parallel = parallel
        attributes = rm_config.rm.attributes
        self.weights = torch.tensor([GOODNESS_WEIGHTS.get(a, 0.0) for a in attributes]) \
            if rm_config.rm.type == "regression" else torch.ones(1)
        logger.info("ppo: critic from %s, with %s (%d outputs)", source or "the policy's initialisation", head,
                    len(self.weights))
        self.value_clip = config.ppo.value_clip

    def _values(self, output: torch.Tensor) -> torch.Tensor:
        return (output.float() * self.weights.to(output.device)).sum(-1)  # [rows, seq]

    def values(self, sequences: list[list[int]], prompt_lengths: list[int], micro_batch_size: int) -> list[list[float]]:
        """``V_t`` at each response token's position (the state before the token), on every rank."""
        self.runner.set_training(False)
        values = response_values(self.runner, sequences, prompt_lengths, lambda out, batch: self._values(out),
                                 micro_batch_size)
        self.runner.set_training(True)
        return values

    def train(self, steps: list[list[Batch]]) -> dict[str, float]:
        """One optimizer step of the clipped value loss per entry of ``steps``; mean metrics."""
        from engine.parallel.collectives import from_last_stage, sum_over_data_parallel

        totals = torch.zeros(len(CRITIC_METRICS), 2, dtype=torch.float64)
        self.runner.advance_schedule()  # once per iteration, as the actor's
        for micro_batches in steps:
            self.runner.zero_grad()
            records = self.runner.run_schedule(micro_batches, self._forward_step, forward_only=False)
            step_totals = torch.zeros_like(totals)
            for record in records:
                for i, name in enumerate(CRITIC_METRICS):
                    step_totals[i] += record[name].detach().to("cpu", torch.float64)
            totals += from_last_stage(sum_over_data_parallel(step_totals, self.parallel), self.parallel)
            self.runner.optimizer_step(advance_schedule=False)
        return {name: float(totals[i, 0] / totals[i, 1]) if totals[i, 1] > 0 else float("nan")
                for i, name in enumerate(CRITIC_METRICS)}

    def _forward_step(self, data_iterator: Any, model: torch.nn.Module) -> tuple[torch.Tensor, Any]:
        from engine.algorithms.logprobs import lm_forward

        batch = to_device(next(data_iterator))
        return lm_forward(model, batch), lambda output: self._loss(batch, output)

    def _loss(self, batch: Batch, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        from engine.losses import aggregate, clipped_value_loss

        values = self._values(output)
        device = values.device
        mask = batch["loss_mask"].to(device).float() * batch["keep"].to(device)
        per_token, clipped = clipped_value_loss(values, batch["old_values"].to(device), batch["returns"].to(device),
                                                mask, self.value_clip)
        total, count = aggregate(per_token, mask, "token_mean")
        metrics = {"value_loss": torch.stack([total.detach(), count.float()]),
                   "value_clip_fraction": torch.stack([(clipped.float() * mask).sum(), mask.sum()])}
        return total, count.to(torch.int), metrics


CONFIG = PPOTrainConfig


def create(config: PPOTrainConfig) -> PPOStep:
    return PPOStep(config)
