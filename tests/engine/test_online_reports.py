"""What an online RL run reports: the panels of its ``curves.png`` and its closing summary."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from engine.config import load_config

GRPO_ONLY_LENGTH = ["reward_functions=[{name: length_penalty}]"]


def test_online_curves_draw_the_rewards_the_run_configured(tmp_path: Path) -> None:
    """curves.png always had a reward_synthetic_check panel (empty unless that was the reward) and none of the
    run's own rewards: a run rewarded by length_penalty logs reward_length_penalty, which was never drawn."""
    from engine.algorithms import grpo, ppo, reinforce

    step = grpo.create(load_config(grpo.CONFIG, None, GRPO_ONLY_LENGTH))
    assert step.curve_metrics() == ("reward", "reward_length_penalty", "kl", "response_length")
    assert grpo.create(load_config(grpo.CONFIG, None, [])).curve_metrics()[1] == "reward_synthetic_check"
    labelled = ["reward_functions=[{name: synthetic_check}, {name: length_penalty, label: brevity, weight: 0.1}]"]
    step = reinforce.create(load_config(reinforce.CONFIG, None, labelled))
    assert step.curve_metrics() == ("reward", "reward_synthetic_check", "reward_brevity", "kl", "response_length")
    model = tmp_path / "rm"  # a reward model is the component 'rm' (not read until training starts)
    step = ppo.create(load_config(ppo.CONFIG, None, ["reward_functions=[]", f"reward_model={model}"]))
    assert step.curve_metrics() == ("reward", "reward_rm", "kl", "value_loss", "response_length")


def test_the_online_summary_shows_the_held_out_result_and_the_critic_checkpoint(tmp_path: Path) -> None:
    """SFT and DPO summaries end with the validation result; online RL's said nothing of its held-out
    evaluation, and PPO's did not list the critic's checkpoint beside the policy's."""
    from engine.algorithms.ppo import PPOTrainConfig
    from engine.cli import _summary
    from engine.models.presets import PRESETS
    from engine.trainer import FitResult

    config = load_config(PPOTrainConfig, None, [f"run.output_dir={tmp_path}", "ppo.critic=init", "run.train_steps=4"])
    checkpoints = tmp_path / "checkpoints"
    trainer = SimpleNamespace(model=SimpleNamespace(preset=PRESETS["tiny-llama"]), best_validation=None,
                              step=SimpleNamespace(online=True, loss_name="policy_loss"),
                              layout=SimpleNamespace(describe=lambda: "TP1×PP1×DP1"),
                              held_out_results={2: {"reward": 0.25, "response_length": 9.0},
                                                4: {"reward": 0.5, "response_length": 7.5, "reward_synthetic_check": 0.5}},
                              critic_checkpoint=str(checkpoints / "critic" / "step_0000004"))
    result = FitResult(start_step=0, end_step=4, losses={1: 0.5, 4: 0.25},
                       checkpoint=str(checkpoints / "step_0000004"))
    text = _summary("ppo", config, trainer, result)
    assert "policy_loss 0.5000 -> 0.2500; 0 tokens/s\n" in text, text  # no metrics.jsonl: no reward to tell
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [  # a resumed run's 3..4
        {"step": 2, "split": "train", "reward": 0.1}, {"step": 3, "split": "train", "reward": 0.2},
        {"step": 3, "split": "validation", "reward": 0.9}, {"step": 4, "split": "train", "reward": 0.35}]))
    text = _summary("ppo", config, trainer, dataclasses.replace(result, start_step=2))
    assert "policy_loss 0.5000 -> 0.2500; 0 tokens/s; reward 0.2000 -> 0.3500\n" in text, text
    assert "held-out at iteration 4: reward 0.5000, response_length 7.5000, reward_synthetic_check 0.5000" in text
    assert "validation policy_loss" not in text, text
    assert f"checkpoint: {checkpoints / 'step_0000004'}\n" in text
    assert f"critic checkpoint: {checkpoints / 'critic' / 'step_0000004'}" in text, text

    from engine.algorithms.grpo import GRPOTrainConfig

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": s, "split": "train", "reward": 0.0, "tied_groups": t} for s, t in ((1, 1.0), (2, 0.5), (3, 1.0))]))
    grpo = load_config(GRPOTrainConfig, None, [f"run.output_dir={tmp_path}", "run.train_steps=3"])
    text = _summary("grpo", grpo, trainer, dataclasses.replace(result, end_step=3))
    assert "; reward 0.0000 -> 0.0000\n  2 of 3 iterations learned nothing from the reward: every prompt's " \
           "rollouts scored alike (tied_groups=1), so their advantages were 0\n" in text, text
    text = _summary("ppo", config, trainer, dataclasses.replace(result, end_step=3))
    assert "; reward 0.0000 -> 0.0000\n" in text and "learned nothing" not in text  # PPO's critic: advantages


def test_a_reward_function_reported_as_rm_beside_a_reward_model_is_refused(tmp_path: Path) -> None:
    """Its component was silently replaced by the reward model's scores (both are logged as reward_rm)."""
    import pytest

    from engine.algorithms import grpo
    from engine.config import ConfigError

    clash = ["reward_functions=[{name: length_penalty, label: rm}]", f"reward_model={tmp_path / 'rm'}"]
    with pytest.raises(ConfigError, match="'rm' would be overwritten by the reward model's component"):
        load_config(grpo.CONFIG, None, clash)
    assert load_config(grpo.CONFIG, None, clash[:1]).reward_functions[0].component == "rm"  # alone it is fine


def test_a_dict_rewards_named_parts_are_reported_beside_its_total() -> None:
    """A reward function returning {"short": .., "polite": ..} logged only the sum: its parts, documented as
    named sub-scores, were computed and dropped. They are now components '<name>/<key>' (not added to the
    total again), and a part a row leaves out is left out of the mean, not counted as NaN."""
    import math

    from engine.data.prompts import prompt_row
    from engine.rewards import RewardRunner
    from engine.rewards.config import RewardFunctionConfig
    from engine.sampling_phase import SamplingPhase, mean_present

    phase = SamplingPhase.__new__(SamplingPhase)
    with RewardRunner([RewardFunctionConfig("tests.engine.rewards.sample_rewards:parts", label="parts")],
                      workers=0) as runner:
        phase.rewards, phase.config = runner, SimpleNamespace(reward_model_weight=1.0)
        rows = [prompt_row({"prompt": "Say hi."}), prompt_row({"prompt": "Ask."})]
        totals, components, keep, _ = phase._score_on_main(rows, ["hi", "please, sir"], [1, 3], None)
    assert totals == [1.0, 1.0] and keep == [True, True]
    assert components == {"parts": [1.0, 1.0], "parts/short": [1.0, 0.0], "parts/polite": [0.0, 1.0]}
    assert mean_present([1.0, math.nan, 3.0], range(3)) == 2.0 and math.isnan(mean_present([math.nan], [0]))


def test_iterations_of_only_tied_groups_are_said_once_where_groups_are_compared(
        caplog: pytest.LogCaptureFixture) -> None:
    """grpo_tiny from its random start (or a base model that never answers) trained 60 iterations on advantages
    of 0 with 'policy_loss 0.0000 -> 0.0000' and no word."""
    from engine.algorithms import grpo, ppo
    from engine.online_trainer import TIED_ITERATIONS, TiedGroups

    def run(cls: type, tied: list[float], *overrides: str) -> list[str]:
        caplog.clear()
        watch = TiedGroups(load_config(cls, None, list(overrides)))
        with caplog.at_level("WARNING", logger="engine.online_trainer"):
            for step, share in enumerate(tied, 1):
                watch.tell(step, {"tied_groups": share, "reward": 0.0})
        return [record.getMessage() for record in caplog.records]

    all_tied = [1.0] * (2 * TIED_ITERATIONS + 3)
    said = run(grpo.CONFIG, all_tied)
    assert len(said) == 1 and said[0].startswith(f"iterations 1-{TIED_ITERATIONS}: every prompt's rollouts scored "
                                                 "alike (reward 0), so their advantages are 0"), said
    assert run(grpo.CONFIG, [1.0] * (TIED_ITERATIONS - 1) + [0.5] + [1.0] * (TIED_ITERATIONS - 1)) == []
    assert run(ppo.CONFIG, all_tied) == []  # PPO's critic gives advantages where the rewards tie
    # with GRPO's overlong penalty tied_groups is counted on the penalised rewards, so it is said there too
    assert run(grpo.CONFIG, all_tied, "grpo.overlong=penalty") == said


def test_grpo_logs_its_overlong_penalty_counts_ties_with_it_and_no_kl_without_a_reference() -> None:
    """The penalty changed the advantages but not the logged reward or tied_groups (a group told apart by it
    counted as tied), and grpo.kl=none logged a kl of 0.0 from the policy's log-probs against themselves."""
    from engine.algorithms import grpo
    from engine.algorithms.online import Iteration
    from engine.generation.base import Rollouts
    from engine.online_trainer import OnlineTrainer

    config = load_config(grpo.CONFIG, None, ["grpo.overlong=penalty", "grpo.overlong_cache=4", "grpo.kl=none",
                                             "rollout.max_new_tokens=8", "rollout.samples_per_prompt=2"])
    step = grpo.create(config)
    lengths = [3, 8, 2, 3]  # group 1: one rollout within the ramp (penalty -1 at the limit); group 2: no penalty
    tokens = [[5] * n for n in lengths]
    rollouts = Rollouts([[1]] * 4, tokens, [[-0.5] * n for n in lengths], ["stop", "length", "stop", "stop"])
    trainer = SimpleNamespace(step=step, config=config, phase=SimpleNamespace(take_failures=dict))
    it = Iteration([None] * 4, [[1]] * 4, rollouts, torch.tensor([1.0, 1.0, 0.0, 0.0]), {}, [True] * 4)
    logps = [[-0.5] * n for n in lengths]
    values = OnlineTrainer._rollout_metrics(trainer, it, logps, logps)  # type: ignore[arg-type]
    assert values["reward"] == 0.5 and values["overlong_penalty"] == -0.25
    assert values["tied_groups"] == 0.5  # group 1's penalty tells its rollouts apart; group 2 ties
    assert "kl" not in values and "kl" not in step.curve_metrics()
    advantages = step.advantages(it.scores, rollouts, logps, logps, keep=it.keep)["advantages"]
    assert advantages[0][0] > 0 > advantages[1][0] and advantages[2][0] == advantages[3][0] == 0.0
    with_kl = grpo.create(load_config(grpo.CONFIG, None, ["grpo.kl=loss"]))
    assert "kl" in with_kl.curve_metrics()
