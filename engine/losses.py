"""Every loss Keel trains with, each a small pure function with its formula.

Losses return *per-item* values (per pair, per labelled attribute, ...); the algorithm
steps sum them and report the item count, and the trainer divides by the global count
(see ``engine/algorithms/base.py``). Reference tests in ``tests/engine/test_losses.py``
compute each formula independently.
"""

from __future__ import annotations

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
    * rpo uses the dpo term; its NLL term on the chosen response is :func:`chosen_nll`,
      added by the caller with its weight.
    """
    h = preference_logit(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    if variant in ("dpo", "rpo"):
        return (1.0 - label_smoothing) * F.softplus(-beta * h) + label_smoothing * F.softplus(beta * h)
    if variant == "ipo":
        return (h - 1.0 / (2.0 * beta)).pow(2)
    raise ValueError(f"unknown DPO variant {variant!r}; use dpo, ipo or rpo")


def chosen_nll(policy_chosen: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """RPO's NLL term per pair: ``-log π(y_c) / |y_c|`` (mean over the chosen response's tokens)."""
    return -policy_chosen.float() / chosen_tokens.float().clamp_min(1.0)
