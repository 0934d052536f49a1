"""Rewards, advantages and sampling filters of online RL, each a small pure function.

Per-token tensors are padded ``[batch, T]`` with a response mask ``[batch, T]`` (1 on
response tokens, 0 on prompt and padding); a row's response is one contiguous run that
may start anywhere. Per-sequence tensors are ``[batch]``; rollouts of one prompt are
consecutive (``[num_prompts * group_size]``). Math is fp32. The losses that consume
these are in ``engine/losses.py``; reference tests in ``tests/engine/test_rl_losses.py``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Optional, Union

import torch


def token_rewards(score: torch.Tensor, mask: torch.Tensor, kl_per_token: torch.Tensor, beta: float) -> torch.Tensor:
    """PPO / REINFORCE per-token rewards (Ziegler et al. 2019; Ouyang et al. 2022).

        ``r_t = -β KL_t + [t is the last response token] * score``

    ``score``: ``[batch]`` sequence scores (e.g. the normalised RM score); ``kl_per_token``:
    ``[batch, T]`` (e.g. :func:`engine.losses.kl_penalty` k1 of π_old against π_ref).
    Zero off the mask; a row without response tokens gets no score.
    """
    mask = mask.float()
    rewards = -beta * kl_per_token.float() * mask
    positions = torch.arange(mask.shape[-1], device=mask.device, dtype=torch.float32)
    last = (positions * mask).argmax(-1, keepdim=True)
    has_response = (mask.sum(-1, keepdim=True) > 0).float()
    return rewards.scatter_add(-1, last, score.float().view(-1, 1) * has_response)


def _check_contiguous(mask: torch.Tensor) -> None:
    """Each row's response must be one run of ones (at most one 0 -> 1 step)."""
    starts = (mask[:, 1:] > mask[:, :-1]).sum(-1) + (mask[:, 0] > 0).long()
    if bool((starts > 1).any()):
        rows = torch.nonzero(starts > 1).flatten().tolist()
        raise ValueError(f"response mask rows {rows} hold more than one run of response tokens; GAE needs each "
                         f"row's response to be contiguous")


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over each row's response tokens.

        ``δ_t = r_t + γ V_{t+1} - V_t``,  ``A_t = δ_t + γ λ A_{t+1}``,  ``R_t = A_t + V_t``

    where ``V_{t+1}`` and ``A_{t+1}`` are 0 after the last response token (the episode ends);
    ``rewards`` and ``values`` off the mask are ignored. Returns ``(advantages, returns)``,
    ``[batch, T]``, zero off the mask. Raises if a row's response is not contiguous.
    """
    mask = mask.float()
    _check_contiguous(mask)
    rewards = rewards.float() * mask
    values = values.float() * mask
    advantages = torch.zeros_like(values)
    columns = torch.nonzero(mask.sum(0) > 0).flatten().tolist()
    if not columns:
        return advantages, advantages.clone()
    next_advantage = torch.zeros_like(values[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in range(columns[-1], columns[0] - 1, -1):
        # a token after the response has mask 0, so its value and advantage do not flow back
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        next_value = values[:, t]
        advantages[:, t] = next_advantage
    return advantages, (advantages + values) * mask


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Masked whitening over all response tokens of the batch, as TRL's ``masked_whiten``.

        ``(x - μ) / sqrt(σ² + eps)`` (plus ``μ`` again when ``shift_mean`` is False)

    with ``μ`` the masked mean and ``σ²`` the *unbiased* (Bessel-corrected, ``/(n - 1)``)
    masked variance over the ``n`` response tokens. Zero off the mask. The statistics are
    those of this tensor only: whiten the gathered global batch for data-parallel-invariant
    advantages.
    """
    mask = mask.float()
    values = values.float()
    count = mask.sum()
    if count.item() < 2:
        raise ValueError(f"whitening needs at least 2 response tokens, got {int(count.item())}")
    mean = (values * mask).sum() / count
    variance = ((values - mean).pow(2) * mask).sum() / (count - 1)
    whitened = (values - mean) * torch.rsqrt(variance + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def sequence_kl(logps: list[list[float]], ref_logps: list[list[float]]) -> torch.Tensor:
    """``KL_i = Σ_t (log π_old(t) - log π_ref(t))`` per rollout: the sequence KL that REINFORCE and
    GRPO's ``kl=reward`` subtract from the reward (times β)."""
    return torch.tensor([sum(a - b for a, b in zip(lp, rp, strict=True)) for lp, rp in zip(logps, ref_logps, strict=True)],
                        dtype=torch.float32)


def _groups(scores: torch.Tensor, group_size: int, minimum: int) -> torch.Tensor:
    """``scores`` as ``[num_groups, group_size]``, with a message when it does not divide."""
    if group_size < minimum:
        raise ValueError(f"group size must be at least {minimum}, got {group_size}")
    if scores.dim() != 1 or scores.numel() % group_size:
        raise ValueError(f"expected flat scores of num_prompts * {group_size} rollouts, got shape {tuple(scores.shape)}")
    return scores.float().view(-1, group_size)


Keep = Optional[Union[torch.Tensor, Sequence[bool]]]  # a bool per rollout: False for one the rewards skipped


def _kept(keep: Keep, like: torch.Tensor) -> Optional[torch.Tensor]:
    """``keep`` (a bool per rollout, a tensor or a list) as a 0/1 float mask shaped like the groups ``like``;
    None when every rollout is kept, so the plain formulas run unchanged."""
    if keep is None:
        return None
    mask = torch.as_tensor(keep, dtype=torch.bool)
    return None if bool(mask.all()) else mask.float().view_as(like)


def rloo_advantages(scores: torch.Tensor, k: int, keep: Keep = None) -> torch.Tensor:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024) per sequence.

        ``A_i = r_i - 1/(k-1) Σ_{j != i} r_j`` over the k rollouts of the same prompt

    ``scores``: ``[num_prompts * k]``, each prompt's k rollouts consecutive. ``keep`` (bool per rollout):
    a rollout the rewards skipped is no sample of the prompt: the baseline is over the kept ones only (k is
    their number), a skipped rollout's advantage is 0, and so is every advantage of a group with fewer than
    2 kept rollouts (no one to leave out).
    """
    groups = _groups(scores, k, minimum=2)
    mask = _kept(keep, groups)
    if mask is None:
        others = (groups.sum(-1, keepdim=True) - groups) / (k - 1)
        return (groups - others).flatten()
    kept = mask.sum(-1, keepdim=True)
    others = ((groups * mask).sum(-1, keepdim=True) - groups * mask) / (kept - 1).clamp(min=1)
    return torch.where(kept >= 2, (groups - others) * mask, torch.zeros_like(groups)).flatten()


def group_advantages(scores: torch.Tensor, group_size: int, normalize_std: bool = True,
                     eps: float = 1e-6, keep: Keep = None) -> torch.Tensor:
    """GRPO's group-relative advantage per sequence (Shao et al. 2024).

        ``A_i = (r_i - mean(r)) / (std(r) + eps)``; Dr. GRPO (``normalize_std=False``): ``r_i - mean(r)``

    over the G = ``group_size`` rollouts of a prompt; ``std`` is the *sample* standard
    deviation (``/(G - 1)``, ``torch.std``'s default, as TRL's GRPO trainer). ``keep`` (bool per
    rollout): the mean and std are over the kept rollouts only (G is their number); a skipped rollout's
    advantage is 0, and so is every advantage of a group with fewer than 2 kept rollouts.
    """
    groups = _groups(scores, group_size, minimum=2)
    mask = _kept(keep, groups)
    if mask is None:
        centred = groups - groups.mean(-1, keepdim=True)
        if normalize_std:
            centred = centred / (groups.std(-1, keepdim=True) + eps)
        return centred.flatten()
    kept = mask.sum(-1, keepdim=True)
    centred = (groups - (groups * mask).sum(-1, keepdim=True) / kept.clamp(min=1)) * mask
    if normalize_std:
        centred = centred / ((centred.pow(2).sum(-1, keepdim=True) / (kept - 1).clamp(min=1)).sqrt() + eps)
    return torch.where(kept >= 2, centred, torch.zeros_like(groups)).flatten()


def dynamic_sampling_filter(scores: torch.Tensor, group_size: int, keep: Keep = None) -> torch.Tensor:
    """DAPO dynamic sampling (Yu et al. 2025): keep a group unless all its rewards are equal.

    A group whose rollouts are all right (or all wrong) has zero advantage and no gradient; so has one whose
    kept rollouts (``keep``, bool per rollout) are. Returns a bool ``[num_groups]``, True for the groups to keep.
    """
    groups = _groups(scores, group_size, minimum=1)
    mask = _kept(keep, groups)
    if mask is None:
        return groups.amax(-1) > groups.amin(-1)
    high = torch.where(mask > 0, groups, torch.full_like(groups, -math.inf)).amax(-1)
    low = torch.where(mask > 0, groups, torch.full_like(groups, math.inf)).amin(-1)
    return high > low


@dataclass
class DynamicSampling:
    """Accumulates kept groups over sampling rounds until ``target_groups`` or ``max_rounds``.

    Each round, pass :func:`dynamic_sampling_filter`'s keep mask (as bools) to
    :meth:`add_round`; it returns the indices of this round's groups to put in the batch
    (kept groups beyond the target are left out and counted as ``surplus``). Sample again
    while :attr:`done` is False; when it ends with :attr:`full` False, the round cap was hit.
    """

    target_groups: int
    max_rounds: int
    kept: int = 0
    dropped: int = 0
    surplus: int = 0
    rounds: int = 0

    def __post_init__(self) -> None:
        if self.target_groups < 1 or self.max_rounds < 1:
            raise ValueError(f"dynamic sampling needs target_groups >= 1 and max_rounds >= 1, got "
                             f"{self.target_groups} and {self.max_rounds}")

    @property
    def full(self) -> bool:
        """The batch has ``target_groups`` groups."""
        return self.kept >= self.target_groups

    @property
    def done(self) -> bool:
        """No more rounds: the batch is full or ``max_rounds`` rounds were sampled."""
        return self.full or self.rounds >= self.max_rounds

    def add_round(self, keep: Iterable[bool]) -> list[int]:
        """Record one round's keep mask; return the indices of its groups that join the batch."""
        if self.done:
            raise RuntimeError(f"dynamic sampling is done after {self.rounds} rounds with {self.kept} of "
                               f"{self.target_groups} groups; start a new DynamicSampling for the next batch")
        self.rounds += 1
        taken: list[int] = []
        for index, flag in enumerate(keep):
            if not flag:
                self.dropped += 1
            elif self.kept < self.target_groups:
                self.kept += 1
                taken.append(index)
            else:
                self.surplus += 1
        return taken


def overlong_penalty(lengths: torch.Tensor, max_length: int, cache_length: int) -> torch.Tensor:
    """DAPO soft overlong punishment (Yu et al. 2025), added to the sequence reward.

        ``0`` if ``|y| <= L_max - L_cache``; ``((L_max - L_cache) - |y|) / L_cache`` if
        ``L_max - L_cache < |y| <= L_max``; ``-1`` if ``|y| > L_max``
    """
    if not 0 < cache_length <= max_length:
        raise ValueError(f"overlong cache length must be in (0, max_length={max_length}], got {cache_length}")
    lengths = lengths.float()
    soft_start = max_length - cache_length
    ramp = (soft_start - lengths) / cache_length
    penalty = torch.where(lengths <= soft_start, torch.zeros_like(lengths), ramp)
    return torch.where(lengths > max_length, torch.full_like(lengths, -1.0), penalty)


def overlong_filter(lengths: torch.Tensor, max_length: int, stopped: torch.Tensor) -> torch.Tensor:
    """DAPO overlong filtering: bool ``[batch]``, False for truncated sequences (excluded from the loss).

    A sequence is truncated when it reached ``max_length`` tokens without a stop (EOS or
    stop string; ``stopped`` False). Multiply its response mask row by this to drop it.
    """
    return stopped.bool() | (lengths < max_length)
