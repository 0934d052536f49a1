"""Iterative DPO and SteerLM 2.0 end to end on gloo ranks, from the tiny examples shrunk further.

* Iterative DPO trains at TP2 while generating at TP1 (two replicas); its pairs are the best and the
  worst sample of each prompt (recomputed here from samples.jsonl), ties dropped and counted.
* SIGKILL in the sampling phase of iteration 2 (after its first chunk is on disk), then the same
  command: the run resumes from iteration 1's checkpoint, reuses the chunk on disk and ends with the
  same pairs (and losses) as an uninterrupted run; SIGTERM between two chunks stops the run cleanly
  and the same command again ends with the same pairs.
* SteerLM 2.0 trains at PP2 while generating at TP1, with a tiny regression reward model; its
  weights.jsonl equals the self-normalised importance weights recomputed here from samples.jsonl;
  iterative DPO scores with that reward model's goodness alone.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.helpers import REPO, keel_train, tiny_reward_model

SHRINK = ["data.seq_length=96", "model.init=layout_invariant", "rollout.prompts_per_iteration=4",
          "rollout.samples_per_prompt=3", "rollout.max_new_tokens=12", "rollout.eval_num_prompts=4",
          "data.micro_batch_size=2", "data.global_batch_size=4", "optimizer.lr=3e-3", "iterative.chunk_prompts=2",
          "logging.progress=false", "logging.tensorboard=false", "checkpoint.resume=auto"]
DPO = ["--config", str(REPO / "examples" / "iterative_dpo_tiny.yaml"), *SHRINK, "rollout.epochs=1",
       "reward_functions=[{name: tests.distributed.online_rewards:digit_share}]"]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _records(run: Path, split: str) -> list[dict]:
    return [r for r in _jsonl(run / "metrics.jsonl") if r["split"] == split]


def _check_pairs(iteration: Path) -> None:
    """pairs.jsonl: per prompt the first highest-scored sample against the first lowest-scored; ties counted."""
    groups: dict[int, list[dict]] = {}
    for sample in _jsonl(iteration / "samples.jsonl"):
        groups.setdefault(sample["prompt_index"], []).append(sample)
    expected, ties = [], 0
    for prompt in sorted(groups):
        scores = [s["score"] for s in groups[prompt]]
        if max(scores) == min(scores):
            ties += 1
            continue
        expected.append((prompt, scores.index(max(scores)), scores.index(min(scores))))
    pairs = _jsonl(iteration / "pairs.jsonl")
    assert [(p["prompt_index"], p["chosen_sample"], p["rejected_sample"]) for p in pairs] == expected
    summary = json.loads((iteration / "summary.json").read_text())
    assert (summary["pairs"], summary["ties"]) == (len(expected), ties)
    assert len(groups) == 4 and all(len(g) == 3 for g in groups.values())


def test_iterative_dpo_at_tp2_and_killed_in_sampling_resumes_to_the_same_pairs(tmp_path: Path) -> None:
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    args = [*DPO, "parallel.tensor=2", "rollout.generation_tensor=1", "rollout.eval_samples_per_prompt=3"]
    keel_train(2, [*args, f"run.output_dir={whole}"], algo="iterative-dpo")
    for k in (1, 2):
        _check_pairs(whole / "iterations" / f"iter_{k}")
    train = _records(whole, "train")
    assert [r["step"] for r in train] == [1, 2] and all(math.isfinite(r["dpo_loss"]) for r in train)
    assert sum(r["pairs"] for r in train) > 0 and all(r["optimizer_steps"] >= 1 or r["pairs"] == 0 for r in train)
    validation = _records(whole, "validation")
    assert [r["step"] for r in validation] == [0, 1, 2]  # held-out, before and after each iteration
    for record in validation:  # greedy answers and 3 samples per prompt (12 tokens at most), both scored
        assert 0 <= record["sampled_reward"] <= 1 and 0 < record["sampled_response_length"] <= 12
        component = [v for k, v in record.items() if k.startswith("sampled_reward_")]  # the total is float32
        assert component == [pytest.approx(record["sampled_reward"], rel=1e-6)]
    assert (whole / "curves.png").stat().st_size > 0
    failed = [r[f"reward_{kind}_tests.distributed.online_rewards:digit_share"] for r in train + validation
              for kind in ("errors", "timeouts")]  # counted for the samples and the held-out answers alike
    assert failed == [0.0] * 10

    # killed after the first chunk of iteration 2 (chunks 1-2 are iteration 1's), then the same command
    proc = keel_train(2, [*args, f"run.output_dir={killed}"], env={"KEEL_FAULT": "in-sample:3:KILL"}, check=False,
                      algo="iterative-dpo")
    assert proc.returncode != 0
    chunks = killed / "iterations" / "iter_2" / "chunks"
    assert sorted(p.name for p in chunks.glob("*.jsonl")) == ["chunk_00000.jsonl"]
    keel_train(2, [*args, f"run.output_dir={killed}"], algo="iterative-dpo")
    for k in (1, 2):
        name = f"iterations/iter_{k}/pairs.jsonl"
        assert (killed / name).read_text() == (whole / name).read_text(), k
    summary = json.loads((killed / "iterations" / "iter_2" / "summary.json").read_text())
    assert (summary["chunks_reused"], summary["chunks_generated"]) == (1, 1)
    resumed = {r["step"]: r["dpo_loss"] for r in _records(killed, "train")}
    assert resumed[2] == train[1]["dpo_loss"]
    # the held-out samples draw from fixed seeds: the resumed run's evaluation of the same policy is the same
    assert [r for r in _records(killed, "validation") if r["step"] == 2][-1]["sampled_reward"] == validation[2][
        "sampled_reward"]

    # a fresh run in the same directory (checkpoint.resume=none) samples afresh: it took up the earlier run's
    # iter_1 chunks as its own, made by another policy (here the same settings, so nothing else would tell)
    keel_train(1, [*DPO, f"run.output_dir={killed}", "checkpoint.resume=none", "iterative.iterations=1"],
               algo="iterative-dpo")
    summary = json.loads((killed / "iterations" / "iter_1" / "summary.json").read_text())
    assert (summary["chunks_reused"], summary["chunks_generated"]) == (0, 2)
    assert [p.name.split("-")[0] for p in killed.glob("iterations.earlier-*")] == ["iterations.earlier"]

    # SIGTERM (pre-emption) after the first chunk of iteration 1: a clean stop, then the same pairs
    stopped = tmp_path / "stopped"
    proc = keel_train(2, [*args, f"run.output_dir={stopped}"], env={"KEEL_FAULT": "in-sample:1:TERM"},
                      algo="iterative-dpo")
    assert "stopped on SIGTERM" in proc.stderr and not (stopped / "iterations" / "iter_1" / "pairs.jsonl").exists()
    # said as what it does in the sampling phase: it said "will checkpoint after the current step"
    assert "SIGTERM received: will stop after the chunk of samples being made (kept on disk" in proc.stderr
    keel_train(2, [*args, f"run.output_dir={stopped}"], algo="iterative-dpo")
    name = "iterations/iter_2/pairs.jsonl"
    assert (stopped / name).read_text() == (whole / name).read_text()


def _check_weights(iteration: Path, sigma: float) -> None:
    samples = {(s["prompt_index"], s["sample"]): s for s in _jsonl(iteration / "samples.jsonl")}
    weights = _jsonl(iteration / "weights.jsonl")
    by_prompt: dict[int, list[dict]] = {}
    for row in weights:
        by_prompt.setdefault(row["prompt_index"], []).append(row)
    for prompt, rows in by_prompt.items():
        log_w = []
        for row in rows:
            sample = samples[(prompt, row["sample"])]
            target = dict((name, float(value)) for name, value in (i.split(":") for i in sample["attributes"].split(",")))
            likelihood = sum(-((aim - sample["predicted"][name]) ** 2) / (2 * sigma**2)
                             - math.log(sigma * math.sqrt(2 * math.pi)) for name, aim in target.items())
            log_w.append(likelihood + sample["prior_logp"] - sample["proposal_logp"])
        top = max(log_w)
        total = sum(math.exp(v - top) for v in log_w)
        for row, value in zip(rows, log_w, strict=True):
            assert abs(row["log_weight"] - value) <= 1e-6 * max(1.0, abs(value)), (row, value)
            assert abs(row["weight"] - math.exp(value - top) / total) <= 1e-9
        assert abs(sum(r["weight"] for r in rows) - 1.0) <= 1e-9


def test_steerlm2_at_pp2_trains_on_the_self_normalised_weights(tmp_path: Path) -> None:
    reward_model = tiny_reward_model(tmp_path)
    run = tmp_path / "steerlm2"
    keel_train(2, ["--config", str(REPO / "examples" / "steerlm2_tiny.yaml"), *SHRINK, "parallel.pipeline=2",
                   "rollout.epochs=1", "iterative.iterations=1", "steerlm2.attribute_sigma=1.5",
                   f"reward_model={reward_model}", f"run.output_dir={run}"], algo="steerlm2")
    iteration = run / "iterations" / "iter_1"
    _check_weights(iteration, 1.5)
    samples = _jsonl(iteration / "samples.jsonl")
    for sample in samples:  # prompt i is conditioned on targets[i % 2]
        assert sample["attributes"].endswith("verbosity:4" if sample["prompt_index"] % 2 else "verbosity:0"), sample
    record = _records(run, "train")[0]
    assert math.isfinite(record["steerlm2_loss"]) and record["optimizer_steps"] == 3  # ceil(12 samples / 4)
    assert 1.0 <= record["effective_sample_size"] <= 3.0
    held_out = _records(run, "validation")
    assert [r["step"] for r in held_out] == [0, 1]
    assert all(math.isfinite(r["attribute_gap"]) and "response_length_target1" in r for r in held_out)

    # the iterative DPO recipe's scorer: the reward model's goodness (no reward function)
    scored = tmp_path / "iterative-dpo-rm"
    keel_train(1, [*DPO, "reward_functions=[]", f"reward_model={reward_model}", "iterative.iterations=1",
                   f"run.output_dir={scored}"], algo="iterative-dpo")
    iteration = scored / "iterations" / "iter_1"
    samples = _jsonl(iteration / "samples.jsonl")
    assert all(set(s["components"]) == {"rm"} and s["score"] == s["components"]["rm"] for s in samples)
    _check_pairs(iteration)
