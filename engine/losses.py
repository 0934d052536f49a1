"""Every loss Keel trains with, each a small pure function with its formula.

Losses return *per-item* values (per pair, per labelled attribute, ...); the algorithm
steps sum them and report the item count, and the trainer divides by the global count
(see ``engine/algorithms/base.py``). Reference tests in ``tests/engine/test_losses.py``
compute each formula independently.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

MISSING_LABEL = -100.0


def masked_mse(predictions: torch.Tensor, labels: torch.Tensor, missing: float = MISSING_LABEL) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared errors of a multi-attribute regression reward model, missing labels masked.

    ``predictions``, ``labels``: ``[batch, K]``; a label equal to ``missing`` is ignored.
    Returns ``(errors, present)`` where ``errors[i, k] = (p[i, k] - y[i, k])^2`` for present
    labels and 0 otherwise, and ``present`` is the 0/1 mask. The loss is
    ``sum(errors) / sum(present)`` (mean over present labels only).
    """
    present = (labels != missing).to(predictions.dtype)
    safe_labels = torch.where(present.bool(), labels.to(predictions.dtype), torch.zeros_like(predictions))
    errors = (predictions - safe_labels).pow(2) * present
    return errors, present


def bradley_terry(chosen: torch.Tensor, rejected: torch.Tensor, variant: str = "regular",
                  strength: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-pair Bradley-Terry losses for rewards ``r_c`` (chosen) and ``r_r`` (rejected).

    * regular: ``-log sigmoid(r_c - r_r)``
    * margin:  ``-log sigmoid(r_c - r_r - |l|)``
    * scaled:  ``|l| * -log sigmoid(r_c - r_r)``

    where ``l`` is the annotated preference strength (``strength``; needed by margin/scaled).
    ``-log sigmoid(x)`` is computed as ``softplus(-x)`` for stability.
    """
    diff = chosen.float() - rejected.float()
    if variant == "regular":
        return F.softplus(-diff)
    if strength is None:
        raise ValueError(f"Bradley-Terry variant {variant!r} needs the preference strength of each pair")
    magnitude = strength.float().abs()
    if variant == "margin":
        return F.softplus(-(diff - magnitude))
    if variant == "scaled":
        return magnitude * F.softplus(-diff)
    raise ValueError(f"unknown Bradley-Terry variant {variant!r}; use regular, margin or scaled")


def weighted_score(attributes: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Scalar score of a multi-attribute prediction: ``sum_k w_k * a_k`` (e.g. goodness)."""
    return (attributes.float() * weights.to(attributes.device).float()).sum(-1)


def preference_logit(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
                     reference_rejected: torch.Tensor) -> torch.Tensor:
    """``h = (log π(y_c) - log π_ref(y_c)) - (log π(y_r) - log π_ref(y_r))`` per pair (sequence log-probs)."""
    return (policy_chosen.float() - reference_chosen.float()) - (policy_rejected.float() - reference_rejected.float())


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float, variant: str = "dpo",
             label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair losses of the DPO family, with ``h`` from :func:`preference_logit`.

    * dpo (Rafailov et al. 2023), with label smoothing ε (conservative DPO):
      ``-(1-ε) log sigmoid(β h) - ε log sigmoid(-β h)``
    * ipo (Azar et al. 2023): ``(h - 1/(2β))^2``
    * hinge (SLiC-HF, Zhao et al. 2023; TRL's ``hinge``): ``max(0, 1 - β h)``
    * rpo uses the dpo term; its NLL term on the chosen response is :func:`chosen_nll`,
      added by the caller with its weight.
    """
    h = preference_logit(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    if variant in ("dpo", "rpo"):
        return (1.0 - label_smoothing) * F.softplus(-beta * h) + label_smoothing * F.softplus(beta * h)
    if variant == "ipo":
        return (h - 1.0 / (2.0 * beta)).pow(2)
    if variant == "hinge":
        return F.relu(1.0 - beta * h)
    raise ValueError(f"unknown DPO variant {variant!r}; use dpo, ipo, hinge or rpo")


def chosen_nll(policy_chosen: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """RPO's NLL term per pair: ``-log π(y_c) / |y_c|`` (mean over the chosen response's tokens)."""
    return -policy_chosen.float() / chosen_tokens.float().clamp_min(1.0)


# --- Online RL (PPO, REINFORCE/RLOO, GRPO, Dr. GRPO, DAPO) --------------------------------
#
# Per-token tensors are padded ``[batch, T]`` with a response mask ``[batch, T]`` (1 on
# response tokens, 0 on prompt and padding). Math is fp32. Advantages, rewards and
# sampling filters live in ``engine/advantages.py``.

KL_KINDS = ("k1", "k2", "k3")
AGGREGATION_MODES = ("token_mean", "seq_mean_token_mean", "seq_sum_constant")


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token estimate of ``KL(π || π_ref)`` from sampled tokens (Schulman, "Approximating KL").

    With ``log r = log π_ref(t) - log π(t)``:

    * k1: ``log π(t) - log π_ref(t)`` (unbiased, can be negative; PPO's reward penalty)
    * k2: ``(log π(t) - log π_ref(t))^2 / 2`` (biased, low variance)
    * k3: ``exp(log r) - log r - 1 = π_ref/π - log(π_ref/π) - 1`` (unbiased, >= 0; GRPO)

    No masking: the caller multiplies by the response mask (or aggregates with it).
    """
    log_ratio = logp.float() - ref_logp.float()
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.pow(2)
    if kind == "k3":
        return torch.exp(-log_ratio) + log_ratio - 1.0
    raise ValueError(f"unknown KL estimator {kind!r}; use one of {', '.join(KL_KINDS)}")


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                        eps_low: float = 0.2, eps_high: float = 0.2
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token, with DAPO's asymmetric (clip-higher) bounds.

    ``ρ_t = π_θ(t) / π_old(t) = exp(log π_θ(t) - log π_old(t))`` and

        ``loss_t = -min(ρ_t A_t, clip(ρ_t, 1 - ε_low, 1 + ε_high) A_t)``

    (Schulman et al. 2017; Yu et al. 2025 for ε_low != ε_high). ``advantages`` is
    ``[batch, T]`` (broadcast a per-sequence advantage with ``adv[:, None]``).

    Returns ``(loss, clipped, ratio)``, all ``[batch, T]`` and zero off the mask:
    ``clipped`` is 1 where the clipped term is the larger loss (the token gets no
    gradient), the usual clip-fraction numerator; ``ratio`` is ρ, detached.
    """
    mask = mask.float()
    advantages = advantages.float()
    ratio = torch.exp(logp.float() - old_logp.float())
    unclipped_loss = -ratio * advantages
    clipped_loss = -torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages
    loss = torch.maximum(unclipped_loss, clipped_loss) * mask
    clipped = (clipped_loss > unclipped_loss).float() * mask
    return loss, clipped.detach(), (ratio * mask).detach()


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss per token.

        ``loss_t = 0.5 * max((V_t - R_t)^2, (clip(V_t, V_old,t - c, V_old,t + c) - R_t)^2)``

    Returns ``(loss, clipped)``, ``[batch, T]``, zero off the mask; ``clipped`` is 1 where
    the clipped error is the larger (the value clip-fraction numerator).
    """
    mask = mask.float()
    values, old_values, returns = values.float(), old_values.float(), returns.float()
    clipped_values = torch.clamp(values, old_values - clip, old_values + clip)
    unclipped_error = (values - returns).pow(2)
    clipped_error = (clipped_values - returns).pow(2)
    loss = 0.5 * torch.maximum(unclipped_error, clipped_error) * mask
    clipped = (clipped_error > unclipped_error).float() * mask
    return loss, clipped.detach()


def aggregate(per_token_loss: torch.Tensor, mask: torch.Tensor, mode: str,
              constant: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum, count)`` of a micro-batch's per-token losses, so that ``Σ sums / Σ counts``
    over micro-batches and data-parallel ranks (what the trainer computes) is the loss of
    the whole global batch. With ``m`` the mask and ``|o_i| = Σ_t m_it``:

    * ``token_mean`` (DAPO's token-level loss): ``sum = Σ_i Σ_t m_it l_it``, ``count = Σ_i |o_i|``;
      globally ``Σ_tokens l / number of tokens``.
    * ``seq_mean_token_mean`` (GRPO, Shao et al. 2024): ``sum = Σ_i (Σ_t m_it l_it) / |o_i|``,
      ``count`` = number of sequences; globally the mean over sequences of each one's token mean.
    * ``seq_sum_constant`` (Dr. GRPO, Liu et al. 2025): ``sum = Σ_i (Σ_t m_it l_it) / C`` with
      ``C = constant`` (e.g. the maximum generation length, the same in every micro-batch),
      ``count`` = number of sequences; globally ``Σ_i Σ_t l_it / (C * number of sequences)``.

    All three compose exactly across micro-batches, since each item (token or sequence)
    sits in one micro-batch. Sequences without response tokens (e.g. removed by the overlong
    filter) are not counted. ``count`` is an fp32 tensor without gradient.
    """
    mask = mask.float()
    token_sums = (per_token_loss.float() * mask).sum(-1)
    lengths = mask.sum(-1)
    if mode == "token_mean":
        return token_sums.sum(), lengths.sum()
    sequences = (lengths > 0).float().sum()
    if mode == "seq_mean_token_mean":
        return (token_sums / lengths.clamp_min(1.0)).sum(), sequences
    if mode == "seq_sum_constant":
        if constant is None or constant <= 0:
            raise ValueError(f"aggregation 'seq_sum_constant' needs a positive constant (e.g. the maximum "
                             f"generation length), got {constant!r}")
        return token_sums.sum() / constant, sequences
    raise ValueError(f"unknown loss aggregation {mode!r}; use one of {', '.join(AGGREGATION_MODES)}")


def steerlm2_log_weights(target: torch.Tensor, predicted: torch.Tensor, prior_logps: torch.Tensor,
                         proposal_logps: torch.Tensor, sigma: float) -> torch.Tensor:
    """SteerLM 2.0 unnormalised log importance weights of ``n`` samples of one prompt.

    For target attributes ``a*`` (``[K]``), the reward model's predicted attributes ``μ_i``
    (``[n, K]``), the prior's sequence log-probs ``log P(y_i|x)`` and the proposal's
    ``log Q(y_i|a*,x)`` (``[n]``)::

        log P(a*|x,y_i) = Σ_k log N(a*_k; μ_ik, σ²) = Σ_k [-(a*_k - μ_ik)² / (2σ²) - log(σ √(2π))]
        log w_i         = log P(a*|x,y_i) + log P(y_i|x) - log Q(y_i|a*,x)
    """
    squared = (target.unsqueeze(0) - predicted).pow(2)
    likelihood = (-squared / (2 * sigma**2) - math.log(sigma * math.sqrt(2 * math.pi))).sum(-1)
    return likelihood + prior_logps - proposal_logps


def self_normalised_weights(log_weights: torch.Tensor) -> torch.Tensor:
    """``w̃_i = exp(log w_i) / Σ_j exp(log w_j)`` = ``softmax(log w)``, computed in log space."""
    return torch.softmax(log_weights, dim=-1)


def weighted_nll(logps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-sample terms of SteerLM 2.0's loss ``-Σ_i w̃_i log π_θ(y_i|a*,x)`` (``logps``: sequence log-probs).

    Minimising it over θ minimises ``KL(P̂(·|a*,x) || π_θ(·|a*,x))`` for the self-normalised estimate
    ``P̂ = Σ_i w̃_i δ(y_i)`` of the Bayes-optimal policy ``P(y|a*,x) ∝ P(a*|x,y) P(y|x)``
    (the KL differs from the loss by the entropy of ``P̂``, which does not depend on θ).
    """
    return -weights * logps
