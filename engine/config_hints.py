"""Keel's names of well-known settings of other frameworks (TRL, verl, OpenRLHF, transformers, Megatron-LM).

An unknown config key that is one of these is told Keel's setting of the same meaning, or that Keel has none,
instead of a guess by its first letters (:func:`engine.config.from_dict`).
"""

from __future__ import annotations

from typing import Optional

# Settings users of TRL, verl, OpenRLHF, Megatron-LM and transformers type under their own names:
# key -> (whose name it is, Keel's setting or None where there is none, a note). An unknown key found here is
# named by it rather than by a guess from its first letters (model.rope_theta is not model.rope_scaling_factor).
FOREIGN_KEYS: dict[str, tuple[str, Optional[str], str]] = {
    "grpo.beta": ("TRL", "grpo.kl_coef", ""),
    "grpo.kl_loss_coef": ("verl", "grpo.kl_coef", ""),
    "grpo.num_generations": ("TRL", "rollout.samples_per_prompt", ""),
    "rollout.num_generations": ("TRL", "rollout.samples_per_prompt", ""),
    "rollout.n": ("verl", "rollout.samples_per_prompt", ""),
    "rollout.n_samples_per_prompt": ("OpenRLHF", "rollout.samples_per_prompt", ""),
    "grpo.loss_type": ("TRL", "grpo.aggregation", "'grpo' is seq_mean_token_mean, 'dapo' token_mean, "
                       "'dr_grpo' seq_sum_constant"),
    "grpo.loss_agg_mode": ("verl", "grpo.aggregation", "'token-mean' is token_mean, 'seq-mean-token-mean' "
                           "seq_mean_token_mean, 'seq-mean-token-sum-norm' seq_sum_constant"),
    "grpo.kl_loss_type": ("verl", "grpo.kl_estimator", "low_var_kl is k3, kl is k1, mse is k2"),
    "grpo.clip_ratio_low": ("verl", "grpo.eps_low", ""),
    "grpo.clip_ratio_high": ("verl", "grpo.eps_high", ""),
    "grpo.max_completion_length": ("TRL", "rollout.max_new_tokens", ""),
    "reinforce.beta": ("TRL", "reinforce.kl_coef", ""),
    "reinforce.num_generations": ("TRL", "rollout.samples_per_prompt", ""),
    "ppo.init_kl_coef": ("OpenRLHF", "ppo.kl_coef", ""),
    "dpo.loss_type": ("TRL", "dpo.loss", "dpo (TRL's 'sigmoid', also accepted), ipo, hinge or rpo"),
    "dpo.rpo_alpha": ("TRL", "dpo.nll_weight", ""),
    "dpo.reference_free": ("TRL", None, "DPO is not supported without a reference: give dpo.reference, or "
                           "dpo.reference_logprobs written once by keel data ref-logprobs"),
    "model.rope_theta": ("transformers", "model.rotary_base", ""),
    "model.rms_norm_eps": ("transformers", "model.layernorm_epsilon", ""),
    "model.norm_epsilon": ("Megatron-LM", "model.layernorm_epsilon", ""),
}
