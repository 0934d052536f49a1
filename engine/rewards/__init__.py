"""Reward functions for online RL: a registry, built-ins, config, and a runner that never stalls.

::

    from engine.rewards import RewardFunctionConfig, RewardRunner

    with RewardRunner([RewardFunctionConfig("math_answer"),
                       RewardFunctionConfig("length_penalty", weight=0.1, kwargs={"target": 400})]) as runner:
        result = runner.score(prompts, responses, metadata)   # metadata[i]["answer"]: the reference
        result.add_component("rm", reward_model_scores, weight=0.5)
        advantages_from(result.totals); drop rows where not result.keep[i]; log result.metrics()

Importing this package imports neither torch nor megatron (worker processes import it).
"""

from engine.rewards.config import ON_ERROR, RewardFunctionConfig, parse_reward_configs
from engine.rewards.registry import RewardFunction, batched, registered_names, resolve_reward, reward_function
from engine.rewards.runner import RewardResult, RewardRunner, RowFailure
from engine.rewards.worker import RewardError

__all__ = [
    "ON_ERROR",
    "RewardError",
    "RewardFunction",
    "RewardFunctionConfig",
    "RewardResult",
    "RewardRunner",
    "RowFailure",
    "batched",
    "parse_reward_configs",
    "registered_names",
    "resolve_reward",
    "reward_function",
]
