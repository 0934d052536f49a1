"""Reference tests of the iterative recipes: best-vs-worst pairing with ties, SteerLM 2.0's self-normalised
importance weights and loss (computed here by hand with ``math``), the sample store, config errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from engine.algorithms.iterative_dpo import IterativeDPOTrainConfig, best_worst_pairs
from engine.algorithms.steerlm2 import SteerLM2TrainConfig, WeightedSamples, attribute_gap, prompt_weights
from engine.config import ConfigError, load_config
from engine.losses import weighted_nll
from engine.sampling_phase import SampleStore


def test_best_worst_pairs_take_the_first_extreme_and_drop_ties() -> None:
    scores = {
        7: [0.2, 0.9, 0.1, 0.9, 0.1],  # best: first 0.9 (sample 1); worst: first 0.1 (sample 2)
        3: [0.5, 0.5, 0.5],  # all equal: tie
        5: [None, 1.0, None, -2.0],  # skipped samples are left out
        9: [None, 0.4],  # one scored sample: nothing to pair, counted with the ties
        1: [-1.0, 3.0],
    }
    pairs, ties = best_worst_pairs(scores)
    assert pairs == [(1, 1, 0), (5, 1, 3), (7, 1, 2)]  # in prompt order
    assert ties == 2


def _by_hand(target: dict[str, float], predicted: list[dict[str, float]], prior: list[float], proposal: list[float],
             sigma: float) -> tuple[list[float], list[float]]:
    log_w = []
    for mu, p, q in zip(predicted, prior, proposal, strict=True):
        likelihood = 0.0
        for name, aim in target.items():
            density = math.exp(-((aim - mu[name]) ** 2) / (2 * sigma**2)) / (sigma * math.sqrt(2 * math.pi))
            likelihood += math.log(density)
        log_w.append(likelihood + p - q)
    top = max(log_w)
    total = sum(math.exp(v - top) for v in log_w)
    return log_w, [math.exp(v - top) / total for v in log_w]


def test_steerlm2_weights_are_the_self_normalised_importance_weights() -> None:
    names = ["helpfulness", "correctness", "coherence", "complexity", "verbosity"]
    target = {"helpfulness": 4, "verbosity": 1}
    rows = [[3.5, 3.0, 3.9, 2.0, 0.8], [2.0, 1.0, 3.0, 1.0, 3.7], [4.1, 4.0, 4.0, 2.5, 1.4]]
    prior, proposal = [-12.5, -30.25, -18.0], [-11.0, -25.5, -19.75]
    sigma = 0.7
    log_w, weights = prompt_weights(target, names, rows, prior, proposal, sigma)
    expected_log_w, expected = _by_hand({k: float(v) for k, v in target.items()},
                                        [dict(zip(names, r, strict=True)) for r in rows], prior, proposal, sigma)
    assert log_w == pytest.approx(expected_log_w, abs=1e-9)
    assert weights == pytest.approx(expected, abs=1e-12)
    assert sum(weights) == pytest.approx(1.0, abs=1e-12)
    # a wider likelihood leans less on the reward model: the weights move toward prior/proposal alone
    _, wide = prompt_weights(target, names, rows, prior, proposal, 100.0)
    _, none = _by_hand({}, [{}] * 3, prior, proposal, 1.0)
    assert wide == pytest.approx(none, abs=1e-3)
    # an attribute the model does not predict is left out of the likelihood
    _, partial = prompt_weights({"helpfulness": 4, "verbosity": 1}, ["helpfulness"], [[r[0]] for r in rows], prior,
                                proposal, sigma)
    assert partial == pytest.approx(_by_hand({"helpfulness": 4.0}, [{"helpfulness": r[0]} for r in rows], prior,
                                             proposal, sigma)[1], abs=1e-12)


def test_steerlm2_weights_leave_out_unscored_samples_and_stay_finite_for_large_log_probs() -> None:
    names = ["helpfulness"]
    log_w, weights = prompt_weights({"helpfulness": 2}, names, [[2.0], [float("nan")], [1.0]],
                                    [-4000.0, -1.0, -4003.0], [-2000.0, -1.0, -2001.0], 1.0)
    assert log_w[1] == float("-inf") and weights[1] == 0.0
    # log w: -2000 and -2002.5 -> weights e^0 : e^-2.5 (no underflow in log space)
    assert weights[0] == pytest.approx(1 / (1 + math.exp(-2.5)), rel=1e-12)
    assert weights[0] + weights[2] == pytest.approx(1.0)


def test_weighted_nll_and_attribute_gap() -> None:
    logps = torch.tensor([-3.0, -10.0, -0.5])
    weights = torch.tensor([0.2, 0.5, 0.3])
    assert weighted_nll(logps, weights).sum().item() == pytest.approx(0.2 * 3 + 0.5 * 10 + 0.3 * 0.5)
    assert attribute_gap({"helpfulness": 4, "verbosity": 0}, ["helpfulness", "verbosity"], [3.0, 1.5]) == 1.25


def test_weighted_samples_mask_the_response_and_carry_the_weight() -> None:
    data = WeightedSamples([([5, 6, 7, 8, 9], 3, 1.5), ([5, 6, 1], 2, 0.25), (list(range(20)), 2, 1.0)], 8, 0)
    assert len(data) == 2  # the 20-token sample does not fit
    batch = data.collate([0, 1])
    assert batch["tokens"][0].tolist() == [5, 6, 7, 8, 9, 0, 0, 0]
    assert batch["labels"][0, :4].tolist() == [6, 7, 8, 9]
    assert batch["loss_mask"][0].tolist() == [0, 0, 1, 1, 0, 0, 0, 0]  # labels 8, 9: the response tokens
    assert batch["loss_mask"][1].tolist() == [0, 1, 0, 0, 0, 0, 0, 0]
    assert batch["weight"].tolist() == [1.5, 0.25]


def test_sample_store_reads_only_complete_chunks(tmp_path: Path) -> None:
    store = SampleStore(str(tmp_path), 2, writes=True)
    store.write_chunk(0, [{"prompt_index": 4, "x": 1.0}])
    store.write_chunk(2, [{"prompt_index": 5, "x": 0.1 + 0.2}])
    (store.dir / "chunks" / "chunk_00001.jsonl.tmp").write_text('{"prompt_index": 9, "x"')  # killed mid-write
    done = store.done_chunks(3)
    assert sorted(done) == [0, 2] and done[2][0]["x"] == 0.1 + 0.2  # floats come back bitwise
    store.write_summary({"iteration": 2, "score_gap": float("nan"), "held_out": {"reward": [1.0, float("inf")]}})
    text = (tmp_path / "iterations" / "iter_2" / "summary.json").read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON: no pairs gives no gap, not NaN
    assert json.loads(text) == {"iteration": 2, "score_gap": None, "held_out": {"reward": [1.0, None]}}


def test_sample_store_refuses_chunks_that_other_inputs_made(tmp_path: Path) -> None:
    """Chunks were reused by prompt index alone: a rerun with another prompt file paired old responses with new
    prompts, and another reward mixed two rewards' scores in one iteration."""
    from engine.errors import ConfigError

    inputs = {"prompts": "abc", "sampling": [4, 8, 0.7, 0.9, 0, 8, 1234], "rewards": [[], "runs/rm", 1.0, 0.0, 1.0]}
    store = SampleStore(str(tmp_path), 1, writes=True)
    store.check_inputs(inputs)
    store.write_chunk(0, [{"prompt_index": 4}])
    store.check_inputs(dict(inputs))  # the same run started again
    with pytest.raises(ConfigError) as err:  # each setting named, with its two values
        store.check_inputs(dict(inputs, prompts="def", rewards=[[], "runs/rm2", 1.0, 0.0, 1.0],
                                sampling=[4, 8, 1.0, 0.9, 0, 8, 1234]))
    assert "iter_1 holds samples made with other settings than this run's (the prompts (rollout.prompts, " \
           "rollout.num_prompts, rollout.prompts_per_iteration, run.seed, the steerlm2 targets); reward_model: " \
           "\"runs/rm\" -> \"runs/rm2\"; rollout.temperature: 0.7 -> 1.0): rerun with the settings it was started " \
           "with" in str(err.value)
    named = {"name": "tests.distributed.online_rewards:digit_share", "weight": 1.0, "on_error": "zero"}
    other = SampleStore(str(tmp_path), 2, writes=True)
    other.check_inputs(dict(inputs, rewards=[[named], "runs/rm", 1.0, 0.0, 1.0]))
    with pytest.raises(ConfigError, match=r"\(reward_functions \(in its details\)\)"):  # equal first 60 characters
        other.check_inputs(dict(inputs, rewards=[[{**named, "on_error": "skip"}], "runs/rm", 1.0, 0.0, 1.0]))
    assert json.loads((store.dir / "inputs.json").read_text()) == inputs  # the first run's record stays


def test_the_first_iterations_samples_are_tied_to_the_starting_policy(tmp_path: Path) -> None:
    """A run killed while sampling its first iteration and started again with another ``checkpoint.load`` reused
    the chunks the other policy had made: ``inputs.json`` did not record where the policy came from."""
    from types import SimpleNamespace

    from engine.errors import ConfigError
    from engine.iterative_trainer import IterativeTrainer

    sft = tmp_path / "sft" / "checkpoints"
    sft.mkdir(parents=True)

    def inputs(iteration: int, *overrides: str) -> dict:
        config = load_config(IterativeDPOTrainConfig, None, list(overrides))
        trainer = SimpleNamespace(config=config, prompts=[SimpleNamespace(prompt="What is 2 + 2?")],
                                  step=SimpleNamespace(target=lambda index: None))
        return IterativeTrainer.sampling_inputs(trainer, iteration, [0])  # type: ignore[arg-type]

    (sft / "latest").write_text("step_0000010\n")
    first = inputs(1, f"checkpoint.load={sft}")
    assert first["policy"][0] == str(sft / "step_0000010")
    store = SampleStore(str(tmp_path / "run"), 1, writes=True)
    store.check_inputs(first)
    store.check_inputs(inputs(1, f"checkpoint.load={sft / 'step_0000010'}"))  # the same checkpoint, named directly
    (sft / "latest").write_text("step_0000020\n")  # the SFT run trained on: its directory names another policy
    with pytest.raises(ConfigError, match=r"\(checkpoint.load: .*/step_0000010\" -> .*/step_0000020\"\)"):
        store.check_inputs(inputs(1, f"checkpoint.load={sft}"))
    with pytest.raises(ConfigError, match=r"\(checkpoint.load: .*/step_0000010\" -> null; model.num_layers: null -> 3\)"):
        store.check_inputs(inputs(1, "model.num_layers=3"))  # from scratch, another shape
    later = SampleStore(str(tmp_path / "run"), 2, writes=True)  # the policy is the run's own checkpoint of iteration 1
    later.check_inputs(inputs(2, f"checkpoint.load={sft}"))
    later.check_inputs(inputs(2))
    old = {key: value for key, value in first.items() if key != "policy"}
    (store.dir / "inputs.json").write_text(json.dumps(old))  # recorded before the policy was
    store.check_inputs(inputs(1))


def test_configs_have_the_recipe_defaults_and_refuse_bad_fields() -> None:
    dpo = load_config(IterativeDPOTrainConfig, None, [])
    assert (dpo.rollout.samples_per_prompt, dpo.rollout.temperature, dpo.rollout.top_p) == (10, 0.7, 0.9)
    assert (dpo.rollout.epochs, dpo.optimizer.lr, dpo.dpo.beta, dpo.scheduler.type) == (3, 9e-8, 1e-3, "constant")
    steer = load_config(SteerLM2TrainConfig, None, ["reward_model=runs/rm/checkpoints"])
    assert (steer.iterative.iterations, steer.rollout.epochs, steer.optimizer.lr) == (2, 2, 1e-7)
    with pytest.raises(ConfigError, match="dpo.reference"):
        load_config(IterativeDPOTrainConfig, None, ["dpo.reference=runs/x"])
    with pytest.raises(ConfigError) as bad_target:  # a setting: not phrased as a data row's error
        load_config(SteerLM2TrainConfig, None, ["reward_model=x", "steerlm2.targets=[verbosity:2, loudness:3]"])
    assert str(bad_target.value).endswith("steerlm2.targets[1]='loudness:3': steerlm2.targets[1].loudness: expected "
                                          "an attribute among helpfulness, correctness, coherence, complexity, "
                                          "verbosity, got 'loudness'"), bad_target.value
    with pytest.raises(ConfigError, match="attribute_sigma"):
        load_config(SteerLM2TrainConfig, None, ["reward_model=x", "steerlm2.attribute_sigma=0"])
    with pytest.raises(ConfigError, match="nemotron"):
        load_config(SteerLM2TrainConfig, None, ["reward_model=x", "data.chat_template=plain"])
    with pytest.raises(ConfigError, match="reward_model"):
        load_config(SteerLM2TrainConfig, None, []).validate(1)
    assert load_config(IterativeDPOTrainConfig, None, ["rollout.eval_samples_per_prompt=4"]).rollout \
        .eval_samples_per_prompt == 4
    with pytest.raises(ConfigError, match=r"rollout.eval_samples_per_prompt=-1 must be >= 0"):
        load_config(IterativeDPOTrainConfig, None, ["rollout.eval_samples_per_prompt=-1"])
    with pytest.raises(ConfigError, match=r"eval_samples_per_prompt=2 does not apply to steerlm2"):
        load_config(SteerLM2TrainConfig, None, ["reward_model=x", "rollout.eval_samples_per_prompt=2"])


@pytest.mark.parametrize("cls", [IterativeDPOTrainConfig, SteerLM2TrainConfig])
def test_step_counts_that_a_round_does_not_use_are_refused(cls: type) -> None:
    """``run.train_steps`` was accepted and ignored (a round trains as many steps as its samples make), bar
    a cosine's horizon; ``run.eval_interval`` too. Both are refused with what to set; a cosine needs its horizon."""
    base = ["reward_model=runs/rm/checkpoints"]
    load_config(cls, None, base + ["run.seed=3"]).validate(1)
    with pytest.raises(ConfigError, match=r"run.train_steps=500 does not apply to .*iterative.iterations rounds"):
        load_config(cls, None, base + ["run.train_steps=500"]).validate(1)
    with pytest.raises(ConfigError, match=r"run.eval_interval=5 does not apply .*iterative.evaluate"):
        load_config(cls, None, base + ["run.eval_interval=5"]).validate(1)
    with pytest.raises(ConfigError, match=r"scheduler.type=cosine in .* needs scheduler.decay_steps"):
        load_config(cls, None, base + ["scheduler.type=cosine"]).validate(1)
    load_config(cls, None, base + ["scheduler.type=cosine", "scheduler.decay_steps=40"]).validate(1)
