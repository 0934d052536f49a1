"""Reward models in Hugging Face's sequence-classification form, as TRL's ``RewardTrainer`` and OpenRLHF train them.

A ``LlamaForSequenceClassification`` (or Nemotron's) with one label is a Bradley-Terry reward model: the trunk
of the causal LM (the same ``model.*`` weights) and a ``score`` layer, ``hidden -> 1`` without a bias, read at
the last token of the sequence. Keel's reward model (:class:`engine.models.heads.RewardGPTModel`,
``rm.type=bt``) is the same trunk and a ``reward_head``, ``hidden -> 1`` with a bias, read at the end of the
response: the last token of the rendered conversation, the chat template's own end (SmolLM2's
``<|im_end|>`` and newline), which is where transformers reads a conversation rendered by
``apply_chat_template``. So ``hf-to-keel`` imports it exactly (``score`` as the head's weight, a zero bias),
as a reward-model checkpoint that ``reward_model=``, ``keel eval rewardbench --rm`` and ``ppo.critic`` take.

A model of several labels is refused: its labels have no known order of Keel's attributes.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from engine.config import ConfigError

logger = logging.getLogger(__name__)

SCORE = "score.weight"
# what a one-label sequence-classification model converts to: a Bradley-Terry reward model on pairs
REWARD_OVERRIDES = ("rm.type=bt", "data.format=pairs")


def reward_head(hf_config: dict[str, Any], hf_state: dict[str, torch.Tensor], source: str) -> Optional[torch.Tensor]:
    """The ``score`` weight ``[1, hidden]`` of a one-label sequence-classification model, None for a language
    model (``*ForCausalLM``); any other model, or weights neither has, is refused."""
    architectures = [str(name) for name in hf_config.get("architectures") or []]
    others = sorted(name for name in hf_state if not name.startswith(("model.", "lm_head.")))
    if SCORE in hf_state or any(name.endswith("ForSequenceClassification") for name in architectures):
        score = hf_state.get(SCORE)
        if score is None or score.ndim != 2:
            raise ConfigError(f"{source}: a sequence-classification model ({', '.join(architectures)}) without a "
                              f"2-D {SCORE}: save it with save_pretrained")
        if score.shape[0] != 1:
            raise ConfigError(f"{source}: a sequence-classification model of {score.shape[0]} labels: hf-to-keel "
                              "imports a one-label reward model (Bradley-Terry, as TRL's RewardTrainer trains it); "
                              "the labels of this one have no known order of Keel's attributes")
        others = [name for name in others if name != SCORE]
        if not others:
            return score
    if others or any(not name.endswith(("ForCausalLM", "ForSequenceClassification")) for name in architectures):
        raise ConfigError(f"{source}: architectures {architectures or 'unknown'} with weights "
                          f"{', '.join(others[:4]) or 'of a language model'}: hf-to-keel converts language models "
                          "(LlamaForCausalLM, NemotronForCausalLM) and one-label reward models "
                          "(*ForSequenceClassification) saved with save_pretrained")
    return None


def with_reward_head(state: dict[str, torch.Tensor], head: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The megatron state dict with Keel's ``reward_head`` from ``head`` (and a zero bias), when given."""
    if head is None:
        return state
    return {**state, "reward_head.weight": head.contiguous(), "reward_head.bias": torch.zeros(head.shape[0])}


def exported_outputs(path: Any, meta: dict[str, Any]) -> int:
    """What ``keel-to-hf`` writes for the checkpoint of ``meta``: 0, a causal LM (a policy); 1, a one-label
    sequence-classification model (a Bradley-Terry reward model). A regression reward model (its attribute
    heads carry biases, which transformers' ``score`` layer has not) and a PPO critic are refused."""
    from engine.checkpoint.dist import CheckpointError, scorer_kind

    kind = scorer_kind(meta)
    if kind is None:
        return 0
    rm_type = ((meta.get("config") or {}).get("rm") or {}).get("type", "regression")
    if meta.get("algorithm") == "rm" and rm_type == "bt":
        return 1
    what = "a regression reward model's attribute heads carry biases, which transformers' score layer has not" \
        if meta.get("algorithm") == "rm" else "a critic is a training companion of its policy"
    raise CheckpointError(f"{path} is a {kind} checkpoint: it cannot be exported by keel-to-hf, which writes "
                          f"policies (language models) and Bradley-Terry reward models; {what}")


def sequence_classification_state(state: dict[str, torch.Tensor], score: torch.Tensor, bias: Optional[torch.Tensor],
                                  source: Any) -> dict[str, torch.Tensor]:
    """The HF state dict of a one-label sequence-classification model from a converted causal LM's (``lm_head``
    left out) and Keel's reward head. A Bradley-Terry loss never moves the head's bias (it cancels in every
    pair), so it is 0; one that is not is said: transformers' scores then differ from Keel's by it."""
    if bias is not None and bool(bias.ne(0).any()):
        logger.warning("%s: the reward head's bias %s is not written (transformers' score layer has none): its "
                       "scores are Keel's minus it; preferences between responses are unchanged", source,
                       bias.tolist())
    return {**{k: v for k, v in state.items() if not k.startswith("lm_head.")}, SCORE: score.contiguous()}


def sequence_classification_config(architecture: str) -> dict[str, Any]:
    """``config.json`` keys of a one-label sequence-classification model of the causal LM ``architecture``."""
    return {"architectures": [architecture.replace("ForCausalLM", "ForSequenceClassification")], "num_labels": 1,
            "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}
