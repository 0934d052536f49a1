"""Online RL end to end (GRPO and RLOO) on gloo ranks, from a seeded policy.

* The same iteration gives the same losses at training layouts TP1×DP2 and TP2 (generation at TP1:
  2 replicas, a layout different from TP2's training one); the first update's importance ratio is 1
  (the trainer's recomputed log-probs are the ratio's π_old) and the rollout log-probs equal the
  trainer's within 1e-5.
* SIGKILL in the middle of an iteration (rollouts made, nothing trained), then the same command:
  the following losses equal an uninterrupted run's, bitwise.
* A reward function that raises, returns NaN or hangs past its timeout is reported, counted in the
  metrics and handled per ``on_error`` while the run goes on (``raise``: one line on every rank, the
  run ends); RLOO trains with a KL reference.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from engine.algorithms import grpo
from engine.config import load_config
from tests.helpers import keel_train, tiny_reward_model

BASE = ["model.preset=tiny-llama", "data.tokenizer=builtin-sp", "data.seq_length=96", "model.init=layout_invariant",
        "reference=init", "rollout.prompts_per_iteration=4", "rollout.samples_per_prompt=4",
        "rollout.max_new_tokens=12", "rollout.eval_num_prompts=8", "data.micro_batch_size=2",
        "data.global_batch_size=16", "optimizer.lr=3e-3", "scheduler.type=constant", "scheduler.warmup_steps=0",
        "logging.progress=false", "logging.tensorboard=false", "checkpoint.resume=none", "reward_workers=0",
        "reward_functions=[{name: tests.distributed.online_rewards:digit_share}]"]


def _records(run: Path, split: str = "train") -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


def test_grpo_iteration_is_the_same_at_tp1_and_tp2(tmp_path: Path) -> None:
    runs, summaries = {}, {}
    for name, layout in (("dp2", "parallel.tensor=1"), ("tp2", "parallel.tensor=2")):
        runs[name] = tmp_path / name
        summaries[name] = keel_train(2, [*BASE, layout, "run.train_steps=2", "run.eval_interval=2",
                                         f"run.output_dir={runs[name]}"], algo="grpo").stdout
    dp2, tp2 = _records(runs["dp2"]), _records(runs["tp2"])
    assert [r["step"] for r in dp2] == [1, 2]
    for one, two in zip(dp2, tp2, strict=True):
        assert one["reward"] == two["reward"]  # the same rollouts
        assert abs(one["policy_loss"] - two["policy_loss"]) <= 1e-5 * max(1.0, abs(one["policy_loss"]))
        assert one["policy_loss"] != 0.0  # advantages are not all zero
        for record in (one, two):
            assert abs(record["ratio_mean"] - 1.0) <= 1e-6  # one update per iteration: π_θ = π_old
            assert record["rollout_logprob_diff_max"] <= 1e-5
            assert record["time_generate"] > 0 and record["time_refit"] > 0
    assert (runs["tp2"] / "curves.png").stat().st_size > 0
    # curves.png draws the run's own reward (logged under the function's name), each panel a metric the run logged
    curves = grpo.create(load_config(grpo.CONFIG, str(runs["tp2"] / "config.yaml"), [])).curve_metrics()
    assert curves[1] == "reward_tests.distributed.online_rewards:digit_share", curves
    assert all(key in tp2[-1] for key in curves), (curves, tp2[-1])
    held_out = _records(runs["tp2"], "validation")[-1]
    assert f"held-out at iteration 2: reward {held_out['reward']:.4f}, " in summaries["tp2"], summaries["tp2"]


def test_grpo_killed_mid_iteration_resumes_to_the_same_losses(tmp_path: Path) -> None:
    args = [*BASE, "run.train_steps=3", "checkpoint.save_interval=1"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    keel_train(1, [*args, f"run.output_dir={whole}"], algo="grpo")
    proc = keel_train(1, [*args, f"run.output_dir={killed}"], env={"KEEL_FAULT": "in-step:2:KILL"}, check=False,
                      algo="grpo")
    assert proc.returncode != 0
    keel_train(1, [*args, f"run.output_dir={killed}", "checkpoint.resume=auto"], algo="grpo")
    expected = {r["step"]: r["policy_loss"] for r in _records(whole)}
    resumed = {r["step"]: r["policy_loss"] for r in _records(killed)}
    assert resumed[2] == expected[2] and resumed[3] == expected[3], (expected, resumed)
    # SIGTERM in the middle of iteration 2: it is finished and checkpointed, and the line says so in iterations
    stopped = tmp_path / "stopped"
    proc = keel_train(1, [*args, f"run.output_dir={stopped}"], env={"KEEL_FAULT": "in-step:2:TERM"}, algo="grpo")
    assert "SIGTERM received: will checkpoint after the current iteration and exit" in proc.stderr, proc.stderr[-2000:]
    assert (stopped / "checkpoints" / "latest").read_text().strip() == "step_0000002"
    keel_train(1, [*args, f"run.output_dir={stopped}", "checkpoint.resume=auto"], algo="grpo")
    assert {r["step"]: r["policy_loss"] for r in _records(stopped)} == expected


def test_reinforce_goes_on_through_misbehaving_reward_functions(tmp_path: Path) -> None:
    run = tmp_path / "rloo"
    rewards = ("reward_functions=[{name: tests.distributed.online_rewards:digit_share}, "
               "{name: tests.distributed.online_rewards:flaky, weight: 0.5, timeout_seconds: 1, on_error: skip}]")
    proc = keel_train(1, [*BASE, rewards, "reward_workers=2", "run.train_steps=2", f"run.output_dir={run}"],
                      algo="reinforce")
    records = _records(run)
    assert len(records) == 2 and all(r["policy_loss"] == r["policy_loss"] for r in records)
    assert sum(r["skipped"] for r in records) > 0  # raised, NaN and hung rows were dropped from training
    assert "flaky" in proc.stderr  # each failure is reported with its function
    assert all(r["kl"] == r["kl"] for r in records)
    # every skipped rollout is a counted failure of flaky's; digit_share never failed
    flaky, digits = "tests.distributed.online_rewards:flaky", "tests.distributed.online_rewards:digit_share"
    failed = [r[f"reward_errors_{flaky}"] + r[f"reward_timeouts_{flaky}"] for r in records]
    assert failed == [r["skipped"] for r in records], records
    assert all(r[f"reward_errors_{digits}"] == r[f"reward_timeouts_{digits}"] == 0 for r in records)

    # on_error: raise ends the run on every rank with one line naming the function, the row and the fix
    refuses = "reward_functions=[{name: tests.distributed.online_rewards:refuses, on_error: raise}]"
    proc = keel_train(2, [*BASE, refuses, "run.train_steps=1", f"run.output_dir={tmp_path / 'raises'}"],
                      algo="reinforce", check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.count("keel: RewardError: reward function 'tests.distributed.online_rewards:refuses' "
                             "failed on row 0 (error): ValueError") == 2, proc.stderr[-3000:]
    assert "/engine/" not in proc.stderr and "set its on_error to 'zero' or 'skip'" in proc.stderr  # no traceback of ours


def test_grpo_scores_with_a_reward_model_and_ppo_trains_a_critic_from_it(tmp_path: Path) -> None:
    reward_model = tiny_reward_model(tmp_path)
    run = tmp_path / "grpo"
    keel_train(2, [*BASE, "parallel.tensor=2", "reward_functions=[]", f"reward_model={reward_model}",
                   "reward_model_mean=1.0", "reward_model_std=2.0", "run.train_steps=1", f"run.output_dir={run}"],
               algo="grpo")
    record = _records(run)[0]
    assert "reward_rm" in record and record["reward_rm"] == record["reward"]  # the model is the only component
    assert record["policy_loss"] != 0.0

    # PPO at TP2 (2 ranks): actor and critic co-located, each one's training state swapped out while the
    # other trains; killed mid-iteration and resumed, actor and critic continue to the same losses
    args = [*BASE, "parallel.tensor=2", f"reward_model={reward_model}", "run.train_steps=3", "ppo.critic_lr=3e-4",
            "checkpoint.save_interval=1"]
    whole, killed = tmp_path / "ppo", tmp_path / "ppo-killed"
    summary = keel_train(2, [*args, f"run.output_dir={whole}"], algo="ppo").stdout
    assert f"critic checkpoint: {whole / 'checkpoints' / 'critic' / 'step_0000003'}" in summary, summary
    records = _records(whole)
    assert abs(records[0]["ratio_mean"] - 1.0) <= 1e-6 and records[0]["rollout_logprob_diff_max"] <= 1e-5
    assert all(r["swapped_bytes"] > 0 and r["value_loss"] == r["value_loss"] for r in records)
    assert records[-1]["value_loss"] < records[0]["value_loss"]  # the critic fits the returns
    # killed between the two checkpoints of step 2 (the first one committed): saved policy-first, the run resumed
    # at a policy step without its critic and could not go on; keep_last=1 still keeps the step-1 critic
    killed_args = [*args, f"run.output_dir={killed}", "checkpoint.keep_last=1"]
    proc = keel_train(2, killed_args, env={"KEEL_FAULT": "saved:2:KILL"}, check=False, algo="ppo")
    assert proc.returncode != 0
    assert (killed / "checkpoints" / "latest").read_text().strip() == "step_0000001"
    keel_train(2, [*killed_args, "checkpoint.resume=auto"], algo="ppo")
    resumed = {r["step"]: (r["policy_loss"], r["value_loss"]) for r in _records(killed)}
    assert [resumed[s] for s in (2, 3)] == [(r["policy_loss"], r["value_loss"]) for r in records[1:]]


def test_grpo_dynamic_sampling_resamples_groups_with_equal_rewards(tmp_path: Path) -> None:
    dapo = ["grpo.dynamic_sampling=true", "grpo.max_sampling_rounds=3", "grpo.eps_high=0.28", "grpo.kl=none",
            "grpo.aggregation=token_mean", "grpo.overlong=penalty", "run.train_steps=1"]
    # an untrained policy never answers right: every group's rewards are equal (all 0), so each round drops all
    # of them, the cap of 3 rounds is reached and the batch is topped up with dropped groups
    flat = tmp_path / "flat"
    keel_train(1, [*BASE, *dapo, "reward_functions=[{name: synthetic_check}]", f"run.output_dir={flat}"], algo="grpo")
    record = _records(flat)[0]
    assert (record["dynamic_rounds"], record["dynamic_dropped"], record["dynamic_filled"]) == (3.0, 12.0, 4.0)
    # the batch trained on: 4 groups topped up, each all 0; tied_groups counts the rewards with the overlong penalty,
    # which tells apart the rollouts of one group (some stopped before the ramp, some in it)
    assert record["tied_groups"] == 0.75 and record["overlong_penalty"] < 0.0
    assert "kl" not in record  # grpo.kl=none: no reference, so no KL to log
    # a reward that varies within most groups: the batch is filled with groups whose rewards differ
    varied = tmp_path / "varied"
    keel_train(1, [*BASE, *dapo, f"run.output_dir={varied}"], algo="grpo")
    record = _records(varied)[0]
    assert record["dynamic_filled"] == 0.0 and record["dynamic_rounds"] < 3 and record["policy_loss"] != 0.0
    assert record["tied_groups"] == 0.0  # only groups whose rewards differ were kept


def test_the_learning_rate_schedule_counts_iterations(tmp_path: Path) -> None:
    """Advanced per optimizer step, a horizon of run.train_steps (iterations) ran out early: GRPO's default
    cosine logged lr 0.0013 at iteration 1 and 0.0 from iteration 2 on, with 8 optimizer steps an iteration."""
    run = tmp_path / "cosine"
    # 16 rollouts an iteration in optimizer steps of 4: four updates per iteration, all at the iteration's LR
    keel_train(1, [*BASE, "scheduler.type=cosine", "scheduler.warmup_steps=2", "optimizer.min_lr=0.0",
                   "data.global_batch_size=4", "run.train_steps=4", f"run.output_dir={run}"], algo="grpo")
    lrs = [r["lr"] for r in _records(run)]
    peak = 3e-3
    # warm-up over 2 iterations, then the cosine over the 4 + 1 of the horizon (the last iteration still trains)
    expected = [peak * 0.5, peak] + [peak * 0.5 * (1 + math.cos(math.pi * k / 3)) for k in (1, 2)]
    assert lrs == pytest.approx(expected, rel=1e-6), lrs
